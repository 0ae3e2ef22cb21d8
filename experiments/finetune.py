r"""Fine-tunes a model with the blocked (auditable) step; resumes if the workdir has a run.

  python -m experiments.finetune --config configs/finetune.py:tiny --workdir /tmp/aftune_tiny

The library does the work (`aftune.train.train`); this file only parses flags.
"""

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from aftune import errors
from aftune import provenance
from aftune.train import trainer as train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py:tiny", "Run sheet.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run's files go.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with errors.exit_on_input_error():  # a wrong config, a workdir of another job, bad data
    train.apply_platform(_CONFIG.value)  # before the first JAX call starts the backend
    logging.info("JAX %s on %s: %s (intra-op pool %d)", jax.__version__, jax.default_backend(),
                 jax.devices(), provenance.intra_op_threads())
    result = train.train(_CONFIG.value, _WORKDIR.value)
  if result.losses:
    logging.info("done: %d steps, final loss %.4f", result.step, result.losses[-1])
  else:
    logging.info("nothing to do: %s already holds all %d steps", _WORKDIR.value, result.step)


if __name__ == "__main__":
  app.run(main)
