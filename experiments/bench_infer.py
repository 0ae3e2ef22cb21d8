r"""Serving overhead: recorded vs plain vs blocked generation, one process, interleaved.

  python -m experiments.bench_infer --workdir workdirs/demo --prompts 8 --serve.max_new_tokens=32
  python -m experiments.bench_infer --config configs/finetune.py:small50m --prompts 8

With --workdir, the final model of that audited run (checked against its commitment);
otherwise the random-init model of --config. Prints tokens/s of each variant and the
ratios (recorded / plain is the headline), the bytes committed per generated token and
the verification time of single (block, step) cells.
"""

import json
from pathlib import Path

from absl import app
from absl import flags
from ml_collections import config_flags

from aftune.bench import infer as bench_infer
from aftune.infer import serving

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py:tiny",
                                          "Run sheet of the random-init model (without --workdir).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "An audited training run: serve its final model.")
_PROMPTS = flags.DEFINE_integer("prompts", 8, "Batch size (prompts from the training data).")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_len", 64, "Longest prompt taken.")
_SERVE = config_flags.DEFINE_config_file("serve", "configs/serve.py:greedy",
                                         "Serving run sheet (sampling settings).", lock_config=True)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed batches per variant.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed batches per variant (compilation).")
_CELLS = flags.DEFINE_integer("verify_cells", 6, "Cells whose verification is timed.")
_JSON = flags.DEFINE_string("json", None, "Also write the results here.")


def main(argv):
  del argv
  if _WORKDIR.value:
    model = serving.load_from_training(_WORKDIR.value)
    train_path = json.loads((Path(_WORKDIR.value) / "config.json").read_text())["data"]["train_path"]
    label = f"final model of {_WORKDIR.value}"
  else:
    model = bench_infer.random_init_model(_CONFIG.value)
    train_path, label = _CONFIG.value.data.train_path, "random init"
  prompts = bench_infer.bench_prompts(model, train_path, _PROMPTS.value, _MAX_PROMPT.value)
  sheet = _SERVE.value
  r = bench_infer.bench_infer(model, prompts, max_new_tokens=sheet.max_new_tokens,
                              temperature=sheet.temperature, top_k=sheet.top_k, top_p=sheet.top_p,
                              rounds=_ROUNDS.value, warmup=_WARMUP.value,
                              verify_cells=_CELLS.value, label=label,
                              activation_interval=int(sheet.activation_interval))
  print(bench_infer.format_infer_bench(r))
  if _JSON.value:
    Path(_JSON.value).write_text(bench_infer.to_json(r))


if __name__ == "__main__":
  app.run(main)
