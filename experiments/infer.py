r"""Provider: serves prompts from an audited fine-tuned model, with a signed record.

  python -m experiments.infer --workdir workdirs/demo --prompts prompts.txt \
      --out workdirs/demo/served/batch_0 --max_new_tokens 32

--prompts: a text file (one user message per line) or JSONL of {"prompt": ...} or
{"messages": [...]}; the chat template is the job's. The served model must hash to the
final model of the job's signed commitment. The record (spec.json, leaves.bin,
tensors.safetensors.zst, commitment.json) is what the audit commands take (--record).
"""

import sys

from absl import app
from absl import flags

from aftune import inference

_WORKDIR = flags.DEFINE_string("workdir", None, "The audited training run.", required=True)
_PROMPTS = flags.DEFINE_string("prompts", None, "Prompts file (txt or jsonl).", required=True)
_OUT = flags.DEFINE_string("out", None, "The record directory (must not exist).", required=True)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Generation steps at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0: off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1: off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (committed).")
_BATCH_ID = flags.DEFINE_integer("batch_id", 0, "Served batch number (committed).")
_I_A = flags.DEFINE_integer("activation_interval", 1, "Store every I_A-th block's outputs.")
_NO_RECORD = flags.DEFINE_bool("no_record", False, "Serve without recording (baseline).")


def main(argv):
  del argv
  try:
    model = inference.load_from_training(_WORKDIR.value)
    prompts = inference.read_prompts(_PROMPTS.value, model.tokenizer, model.template)
    settings = inference.ServeSettings(
        max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, seed=_SEED.value, batch_id=_BATCH_ID.value,
        stop_tokens=(model.tokenizer.eos_id,), pad_id=model.tokenizer.pad_id,
        activation_interval=_I_A.value)
    out = inference.serve(model, prompts, settings, _OUT.value, record=not _NO_RECORD.value,
                          key_path=f"{_WORKDIR.value}/provider_key.pem")
  except (ValueError, OSError) as e:  # bad prompts file, model not matching its commitment, ...
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for toks in out["result"].tokens:
    print(repr(model.tokenizer.decode(toks)))
  if out["commitment"] is not None:
    print(f"record: {_OUT.value} (root {out['commitment']['merkle_root'][:16]}…)")


if __name__ == "__main__":
  app.run(main)
