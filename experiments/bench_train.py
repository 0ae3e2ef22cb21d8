r"""Times the blocked (auditable) training step against the plain single-jit step.

  python -m experiments.bench_train --config configs/finetune.py:tiny --steps 20 --warmup 3
  python -m experiments.bench_train --config configs/finetune.py:small50m --steps 10 --warmup 2 \
      --json /tmp/bench_small50m.json

Both variants (and, with torch installed, a plain transformers step of the same
architecture: aftune/bench/torch_ref.py) run on one job (same model, batches and step
keys; torch: same architecture and batches, its own random init), interleaved in rounds
after an untimed warmup that absorbs compilation; the report gives each variant's median
s/step, steps/s and tokens/s, the blocked/plain ratio, and the process's peak RSS. Read
the ratio against the IQR/median column: on a shared CPU single timings are noisy.
The library does the work (`aftune.bench.bench_train`); this file only parses flags.
"""

import json
from pathlib import Path

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from aftune.bench import timing as bench
from aftune.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py:tiny", "Run sheet.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per variant.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per variant first (compilation).")
_ROUND_STEPS = flags.DEFINE_integer("round_steps", 2,
                                    "Consecutive steps of one variant before switching.")
_JSON = flags.DEFINE_string("json", None, "Also write the results here as JSON.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time a plain transformers step of the same "
                           "architecture when torch is installed (the CPU speed baseline).")


def main(argv):
  trainer.apply_platform(_CONFIG.value)  # threads, GPU flags, a mesh's devices: before JAX
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.info("JAX %s on %s: %s", jax.__version__, jax.default_backend(), jax.devices())
  config_flag = flags.FLAGS["config"]
  overrides = " ".join(f"--config.{k}={v}" for k, v in
                       sorted(config_flags.get_override_values(config_flag).items()))
  config_name = " ".join(filter(None, [config_flags.get_config_filename(config_flag), overrides]))
  result = bench.bench_train(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value,
                             round_steps=_ROUND_STEPS.value, config_name=config_name,
                             torch=_TORCH.value)
  print(bench.format_train_bench(result), flush=True)
  if _JSON.value:
    out = {**result.to_json(), "config": json.loads(_CONFIG.value.to_json_best_effort())}
    Path(_JSON.value).write_text(json.dumps(out, indent=2, sort_keys=True, default=str) + "\n")
    logging.info("wrote %s", _JSON.value)


if __name__ == "__main__":
  app.run(main)
