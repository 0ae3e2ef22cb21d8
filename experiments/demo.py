r"""The main job: audited fine-tune of the built-in default, then challenge, open, verify.

  python -m experiments.demo --workdir workdirs/demo

Prints the verdict (PASS expected) in a few minutes on 2 CPU cores; every file the three
roles exchange is left in <workdir>/audit/.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from aftune import audit
from aftune import demo

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py:tiny", "Run sheet.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "The provider's workdir.")
_STRATEGY = flags.DEFINE_string("strategy", "stratified", "Challenge strategy.")


def main(argv):
  del argv
  verdict = demo.run(_CONFIG.value, _WORKDIR.value, strategy=_STRATEGY.value)
  print(audit.render_markdown(verdict))
  print(f"files: {_WORKDIR.value}/audit/")
  sys.exit(0 if verdict["passed"] else 1)


if __name__ == "__main__":
  app.run(main)
