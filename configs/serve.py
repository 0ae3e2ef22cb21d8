"""Serving run sheets: how a batch of prompts is generated and recorded.

Run (after an audited fine-tune in W; prints the completions and the record's root):

  python -m experiments.infer --workdir W --prompts prompts.txt --out W/served/b0 \
      --serve configs/serve.py:greedy

Variants:
  greedy   temperature 0 (argmax), 32 new tokens: the default and the benchmark's setting.
  sample   temperature 0.8, top-p 0.95: a sampled generation (the keys are committed).

Override any field: --serve.max_new_tokens=4 --serve.activation_interval=2

`server` is the HTTP server's part (`experiments.serve`, `aftune/infer/engine.py`): each
request brings its own max_tokens, sampling settings and seed; these are the batching and
the limits. Override as --serve.server.max_batch=4.
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
  c.server = ml_collections.ConfigDict()
  c.server.max_batch = 8  # rows per batch at most; batches are padded to 1, 2, 4 or 8 rows
  c.server.batch_window_s = 0.02  # the first request of a batch waits this long for others
  c.server.max_tokens_cap = 64  # the largest max_tokens a request may ask for
  c.server.default_max_tokens = 16
  c.server.prompt_bucket = 16  # prompt widths are padded up to a multiple of this
  c.server.max_prompt_tokens = 512
  c.server.activation_interval = 1  # I_A of every served batch
  c.server.record = True  # False: the unaudited baseline (no record, no receipts)
  if variant == "greedy":
    pass
  elif variant == "sample":
    c.temperature = 0.8
    c.top_p = 0.95
  else:
    raise ValueError(f"unknown variant {variant!r}: greedy, sample")
  return c
