r"""Recording overhead: plain vs blocked vs blocked+recording, one process, interleaved.

  python -m experiments.bench_record --config configs/finetune.py:small50m \
      --config.audit.steps_per_block=8 --config.audit.units_per_block=4 \
      --config.audit.checkpoint_interval=8 --config.audit.activation_interval=1

Prints the ratios (recorded / plain is the headline; with torch installed, every variant
against a plain transformers step of the same architecture, aftune/bench/torch_ref.py),
bytes stored per step by category and the hash throughput of aftune's hashing vs raw BLAKE3.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from aftune.bench import record as bench_record
from aftune.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py:tiny", "Run sheet.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 16, "Timed steps per variant.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per variant (compilation).")
_ROUND = flags.DEFINE_integer("round_steps", 4, "Steps per variant per round.")
_JSON = flags.DEFINE_string("json", None, "Also write the results here.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time a plain transformers step of the same "
                           "architecture when torch is installed (the CPU speed baseline).")


def main(argv):
  trainer.apply_platform(_CONFIG.value)  # threads, GPU flags, a mesh's devices: before JAX
  del argv
  r = bench_record.bench_record(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value,
                                round_steps=_ROUND.value, torch=_TORCH.value)
  print(bench_record.format_record_bench(r))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(r, f, indent=2, default=str)


if __name__ == "__main__":
  app.run(main)
