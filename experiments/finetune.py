r"""Fine-tunes a model with the blocked (auditable) step; resumes if the workdir has a run.

  python -m experiments.finetune --config configs/finetune.py:tiny --workdir /tmp/aftune_tiny

Several processes (one per host; here 2 on one machine, 2 CPU devices each), each started
with its id; the workdir is shared:

  python -m experiments.finetune --config configs/finetune.py:tiny_fsdp --workdir W \
      --coordinator localhost:12355 --num_processes 2 --process_id 0   # and 1

The library does the work (`aftune.train.train`); this file only parses flags.
"""

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from aftune import errors
from aftune import provenance
from aftune.train import multihost
from aftune.train import trainer as train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py:tiny", "Run sheet.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run's files go.", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0, for a run of "
                                   "several processes (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run "
                                      "(default: $JAX_NUM_PROCESSES, else 1).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id "
                                   "(default: $JAX_PROCESS_ID).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with errors.exit_on_input_error():  # a wrong config, a workdir of another job, bad data
    n = multihost.process_count_from(_NUM_PROCESSES.value)
    train.apply_platform(_CONFIG.value, num_processes=n)  # before JAX starts its backend
    multihost.initialize(_COORDINATOR.value, n, _PROCESS_ID.value)
    logging.info("JAX %s on %s: %s (intra-op pool %d)", jax.__version__, jax.default_backend(),
                 jax.devices(), provenance.intra_op_threads())
    result = train.train(_CONFIG.value, _WORKDIR.value)
  if result.losses:
    logging.info("done: %d steps, final loss %.4f", result.step, result.losses[-1])
  else:
    logging.info("nothing to do: %s already holds all %d steps", _WORKDIR.value, result.step)


if __name__ == "__main__":
  app.run(main)
