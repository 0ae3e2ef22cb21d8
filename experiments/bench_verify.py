r"""Audit cost: verifying one cell vs the training time it represents; a 10% audit vs training.

  python -m experiments.bench_verify --config configs/finetune.py:tiny
  python -m experiments.bench_verify --config configs/finetune.py:small50m \
      --config.audit.units_per_block=4 --num_step_blocks=2
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from aftune.bench import verify as bench_verify

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py:tiny", "Run sheet.",
                                          lock_config=True)
_BLOCKS = flags.DEFINE_integer("num_step_blocks", 2, "Step blocks to record and audit.")
_FRACTION = flags.DEFINE_float("audit_fraction", 0.1, "Share of a run's cells an audit checks.")
_JSON = flags.DEFINE_string("json", None, "Also write the results here.")


def main(argv):
  del argv
  r = bench_verify.bench_verify(_CONFIG.value, num_step_blocks=_BLOCKS.value,
                                audit_fraction=_FRACTION.value)
  print(bench_verify.format_verify_bench(r))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(r, f, indent=2)


if __name__ == "__main__":
  app.run(main)
