"""Serving run sheets: how a batch of prompts is generated and recorded.

Run (after an audited fine-tune in W; prints the completions and the record's root):

  python -m experiments.infer --workdir W --prompts prompts.txt --out W/served/b0 \
      --serve configs/serve.py:greedy

Variants:
  greedy   temperature 0 (argmax), 32 new tokens: the default and the benchmark's setting.
  sample   temperature 0.8, top-p 0.95: a sampled generation (the keys are committed).

Override any field: --serve.max_new_tokens=4 --serve.activation_interval=2
"""

import ml_collections


def get_config(variant: str = "greedy") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.max_new_tokens = 32  # generation steps at most (rows stop early at the tokenizer's EOS)
  c.temperature = 0.0  # 0: greedy (argmax, lowest id on ties)
  c.top_k = 0  # keep the k most likely tokens; 0: off
  c.top_p = 1.0  # nucleus sampling mass; 1: off
  c.seed = 0  # sampling seed: step t of batch b samples with fold_in(fold_in(key(seed), b), t)
  c.batch_id = 0  # the served batch's number (committed)
  c.activation_interval = 1  # I_A: store every I_A-th block's outputs (the rest is replayed)
  c.record = True  # False: serve without recording (the unaudited baseline)
  if variant == "greedy":
    pass
  elif variant == "sample":
    c.temperature = 0.8
    c.top_p = 0.95
  else:
    raise ValueError(f"unknown variant {variant!r}: greedy, sample")
  return c
