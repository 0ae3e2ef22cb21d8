r"""Client: writes the job-spec fields it agrees to, computed from its own config and data.

  python -m experiments.agree --config configs/finetune.py:tiny --out agreed.json
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from aftune import errors
from aftune.audit import client as audit
from aftune.train import job as job_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py:tiny", "Run sheet.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", "agreed.json", "Where to write the agreed fields.")


def main(argv):
  del argv
  with errors.exit_on_input_error():
    agreed = audit.agreed_fields(job_lib.build_job(_CONFIG.value, placed=False))
    with open(_OUT.value, "x") as f:  # never overwrite an agreement (FileExistsError: exit 2)
      json.dump(agreed, f, indent=2, sort_keys=True)
  print(f"wrote {_OUT.value}: base model {agreed['base_model_hash'][:16]}…, "
        f"dataset root {agreed['dataset_root'][:16]}…")


if __name__ == "__main__":
  app.run(main)
