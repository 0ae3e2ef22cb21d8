"""Generation (KV-cached decoding) as pure per-layer-block functions, jitted once (`GenFns`).

Serving is recorded and audited per (generation step, layer block) cell, exactly like
training, so decoding is a composition of the same kind of block functions:

  step 0 (prefill):  x_{k+1}, cache_k = block_prefill(spec_k, params_k, frozen_k, x_k,
                                                      {"attn_mask": mask}, max_total_len)
                     x_0 = prompt ids [B,P] (left-padded); x_K = logits [B,V] of the
                     last prompt position
  step t >= 1:       x_{k+1}, cache_k = block_decode(spec_k, params_k, frozen_k, x_k, cache_k,
                                                     decode_ctx(mask, t, max_total_len))
                     x_0 = the token emitted at step t-1 [B,1]; x_K = logits [B,V]
  every step t:      token_t = sample(x_K, sampling_key(seed, batch_id, t), temperature,
                                      top_k, top_p), replaced by pad_id where the sequence
                     had already finished before step t.

A verifier of cell (t, k) rebuilds block k's KV cache with these very functions from the
revealed inputs of block k (prefill input, then decode inputs of steps 1..t-1) and
replays step t. Everything else that a block function reads (`attn_mask`, `decode_ctx`)
is an integer function of the committed prompt batch and t.

Padding: prompts are LEFT-padded to the longest one (P), so the last prompt position is
column P-1 for every sequence and the token generated at step t-1 is written to cache
slot P+t-1 for every sequence; RoPE positions skip the padding
(the model family's `context`), so a sequence's tokens do not depend on its padding or its
batch mates, up to floating-point round-off (kernels need not be batch-invariant: the
batch composition is committed).

`generate_plain` composes the same per-block math into one jitted prefill and one
jitted decode of the whole model: the unaudited baseline for tokens/s comparisons.

A dishonest server's deviations enter through `ServeHooks` (aftune/attacks/serving.py),
called at fixed points of the loop; the honest server's hooks are the identity.
See docs/generate.md.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Protocol
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aftune.infer import sampling
from aftune.model import blocks as grid
from aftune.model import family

PyTree = Any
# cache of one layer block: decoder-layer unit name -> {"k", "v": [B, S, G, K]}
BlockCache = dict[str, dict[str, jax.Array]]
Observer = Callable[[int, list, list, jax.Array, jax.Array, jax.Array], None]


# ---------------------------------------------------------------------------------
# Contexts (integer functions of the committed prompt batch and the step).


def left_pad(prompts_tokens: Sequence[Sequence[int]], pad_id: int,
             width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to the longest (or to `width`): (ids int32 [B,P], attn_mask int32 [B,P])."""
  if not prompts_tokens:
    raise ValueError("no prompts")
  lengths = [len(p) for p in prompts_tokens]
  if min(lengths) < 1:
    raise ValueError("every prompt needs at least one token")
  b, p = len(prompts_tokens), max(lengths)
  if width is not None:
    if width < p:
      raise ValueError(f"prompt width {width} < longest prompt {p}")
    p = int(width)
  ids = np.full((b, p), pad_id, np.int32)
  mask = np.zeros((b, p), np.int32)
  for i, toks in enumerate(prompts_tokens):
    ids[i, p - len(toks):] = np.asarray(toks, np.int32)
    mask[i, p - len(toks):] = 1
  return ids, mask


def prefill_ctx(attn_mask_BxP: Any) -> dict[str, jax.Array]:
  """The context of `block_prefill`: the left-padded prompt mask (positions derive from it)."""
  return {"attn_mask": jnp.asarray(attn_mask_BxP, jnp.int32)}


def decode_ctx(attn_mask_BxP: Any, t: int, max_total_len: int) -> dict[str, jax.Array]:
  """The context of `block_decode` at generation step t >= 1 (input: the token of step t-1).

  Returns:
    positions [B,1] int32: RoPE position of the new token (prompt length + t - 1);
    slot [] int32: the cache slot it is written to (P + t - 1, the same for all rows);
    kv_mask [B,S] bool: valid cache slots (real prompt tokens, then slots P..P+t-1).
  """
  mask = np.asarray(attn_mask_BxP).astype(np.int32)
  b, p = mask.shape
  if t < 1 or p + t - 1 >= max_total_len:
    raise ValueError(f"decode step {t} outside 1..{max_total_len - p} (prompt {p}, "
                     f"max_total_len {max_total_len})")
  gen = np.arange(max_total_len - p) <= t - 1
  kv_mask = np.concatenate([mask.astype(bool), np.broadcast_to(gen, (b, gen.size))], axis=1)
  positions = (mask.sum(axis=1, dtype=np.int32) + (t - 1))[:, None]
  return {"positions": jnp.asarray(positions, jnp.int32),
          "slot": jnp.asarray(p + t - 1, jnp.int32),
          "kv_mask": jnp.asarray(kv_mask)}


# ---------------------------------------------------------------------------------
# Per-block functions.


def block_prefill(spec: grid.BlockSpec, params: PyTree, frozen: PyTree, x_in: jax.Array,
                  batch_ctx: Mapping[str, jax.Array], max_total_len: int) -> tuple[jax.Array, BlockCache]:
  """Generation step 0 of one layer block over the left-padded prompt.

  Args:
    spec: the block's static spec.
    params, frozen: the block's pytrees (as `grid.BlockedParams`; LoRA adapters un-merged).
    x_in: prompt ids int32 [B,P] for the first block, else the previous block's output.
    batch_ctx: `prefill_ctx(mask)`: {"attn_mask": [B,P]} (1 = real token, left padding).
    max_total_len: S, the static KV cache length (>= P + max_new_tokens).

  Returns:
    (x_out, cache): x_out is [B,P,D] activations (compute dtype); after the final norm
    only the last column goes on ([B,1,D]); the last block returns fp32 logits [B,V] of
    position P-1. cache maps each cached unit of the block (the family's decoder
    layers) to {"k","v": [B,S,G,K]}.
  """
  fam = family.get(spec.arch)
  ctx = {**fam.context(batch_ctx), "key": None}
  x, cache = x_in, {}
  for name, graphdef in zip(spec.unit_names, spec.graphdefs):
    unit = nnx.merge(graphdef, params[name], frozen[name])
    x, c = fam.prefill_unit(name, unit, x, ctx, max_total_len)
    if c is not None:
      cache[name] = c
  return x, cache


def block_decode(spec: grid.BlockSpec, params: PyTree, frozen: PyTree, x_in: jax.Array,
                 cache: BlockCache, pos_ctx: Mapping[str, jax.Array]) -> tuple[jax.Array, BlockCache]:
  """Generation step t >= 1 of one layer block: one new token per sequence.

  Args:
    x_in: token ids int32 [B,1] for the first block, else [B,1,D] activations.
    cache: this block's cache from the previous step (DONATED by `GenFns.decode`).
    pos_ctx: `decode_ctx(mask, t, max_total_len)`.

  Returns:
    (x_out [B,1,D], or fp32 logits [B,V] for the last block; the updated cache).
  """
  fam = family.get(spec.arch)
  ctx = {**pos_ctx, "key": None}
  x, new_cache = x_in, {}
  for name, graphdef in zip(spec.unit_names, spec.graphdefs):
    unit = nnx.merge(graphdef, params[name], frozen[name])
    x, c = fam.decode_unit(name, unit, x, ctx, cache.get(name))
    if c is not None:
      new_cache[name] = c
  return x, new_cache


# ---------------------------------------------------------------------------------
# Jitted once.


class GenFns:
  """The jitted generation functions, built once and shared by serving, the provider's
  regeneration, the verifier's replay, the benchmarks and the program fingerprint."""

  def __init__(self):
    # Static: the block spec(s) and the cache length (shapes), the sampling settings.
    self.prefill = jax.jit(block_prefill, static_argnums=(0, 5))
    # The cache is donated: decoding updates it in place instead of copying it per token.
    self.decode = jax.jit(block_decode, static_argnums=0, donate_argnums=4)
    self.sample = jax.jit(sampling.sample, static_argnums=(2, 3, 4))
    self.sample_rows = jax.jit(sampling.sample_rows, static_argnums=(2, 3, 4))
    self.plain_prefill = jax.jit(plain_prefill, static_argnums=(0, 5))
    self.plain_decode = jax.jit(plain_decode, static_argnums=0, donate_argnums=4)


@functools.cache
def default_fns() -> GenFns:
  """The process's GenFns: one set of compiled programs for serving and verification."""
  return GenFns()


# ---------------------------------------------------------------------------------
# A server's deviations.


class ServeHooks(Protocol):
  """Where a dishonest server deviates; `Honest` is the identity at every point.

  served(model) -> model: the weights really served (and the model hash claimed).
  generate(run, *args, **kwargs) -> GenerationResult: how the batch is run; `run` is
    `generate` itself (e.g. another batch composition, stopping early).
  block_out(t, k, x) -> x: block k's output at generation step t, before it goes on.
  sample_keys(t, key) -> (key sampled with, key committed).
  tokens(t, tokens_B, vocab_size) -> tokens_B: the tokens emitted at step t.
  """

  def served(self, model: Any) -> Any:
    ...

  def generate(self, run: Callable[..., "GenerationResult"], *args, **kwargs) -> "GenerationResult":
    ...

  def block_out(self, t: int, k: int, x: jax.Array) -> jax.Array:
    ...

  def sample_keys(self, t: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    ...

  def tokens(self, t: int, tokens_B: np.ndarray, vocab_size: int) -> np.ndarray:
    ...


class Honest:
  """The honest server (the base class of every serving attack)."""

  def served(self, model):
    return model

  def generate(self, run, *args, **kwargs):
    return run(*args, **kwargs)

  def block_out(self, t, k, x):
    return x

  def sample_keys(self, t, key):
    return key, key

  def tokens(self, t, tokens_B, vocab_size):
    return tokens_B


# ---------------------------------------------------------------------------------
# The generation loop.


@dataclasses.dataclass
class GenerationResult:
  """Generated tokens and the committed batch they came from.

  Attributes:
    tokens: per prompt, the generated ids, up to and including the first stop token.
    finish_reasons: per prompt, "stop" or "length".
    token_array: int32 [B, num_steps]: emitted token of every step (pad_id once finished).
    prompt_ids, attn_mask: int32 [B,P]: the left-padded prompt batch fed to step 0.
    num_steps: generation steps run (<= max_new_tokens; stops when all are done).
    max_total_len: S, the KV cache length.
    seconds: wall time of the generation loop (compile included on a first call).
  """
  tokens: list[list[int]]
  finish_reasons: list[str]
  token_array: np.ndarray
  prompt_ids: np.ndarray
  attn_mask: np.ndarray
  num_steps: int
  max_total_len: int
  seconds: float = 0.0


@dataclasses.dataclass
class StepRecord:
  """What `TraceCollector` keeps of one generation step (device arrays, not fetched)."""
  t: int
  block_inputs: list[jax.Array]
  block_outputs: list[jax.Array]
  logits: jax.Array
  tokens: jax.Array
  key: jax.Array


class TraceCollector:
  """An observer that keeps every step's boundary tensors (for tests and small audits)."""

  def __init__(self):
    self.steps: list[StepRecord] = []

  def __call__(self, t, block_inputs, block_outputs, logits, tokens, key):
    self.steps.append(StepRecord(t, list(block_inputs), list(block_outputs), logits, tokens, key))


def _check_args(prompts_tokens, max_new_tokens, pad_id, max_total_len, prompt_width=None):
  ids, mask = left_pad(prompts_tokens, pad_id, prompt_width)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  p = ids.shape[1]
  s = p + max_new_tokens if max_total_len is None else int(max_total_len)
  if p + max_new_tokens > s:
    raise ValueError(f"max_total_len {s} < longest prompt {p} + max_new_tokens {max_new_tokens}")
  return ids, mask, s


def _loop(prefill_fn, decode_fn, prompts_tokens, *, max_new_tokens, temperature, top_k, top_p, seed,
          batch_id, stop_tokens, pad_id, max_total_len, observer, fns: GenFns,
          hooks: ServeHooks, row_seeds=None, row_max_new_tokens=None,
          prompt_width=None) -> GenerationResult:
  start = time.perf_counter()
  ids, mask, s = _check_args(prompts_tokens, max_new_tokens, pad_id, max_total_len, prompt_width)
  b = ids.shape[0]
  limit = np.full(b, max_new_tokens, np.int64)
  if row_max_new_tokens is not None:
    limit = np.asarray(row_max_new_tokens, np.int64)
    if limit.shape != (b,) or limit.min() < 1 or limit.max() > max_new_tokens:
      raise ValueError(f"row_max_new_tokens must be {b} values in 1..{max_new_tokens}")
  if row_seeds is not None and len(row_seeds) != b:
    raise ValueError(f"row_seeds must have {b} values, got {len(row_seeds)}")
  stop = np.asarray(sorted(set(int(x) for x in stop_tokens)), np.int32)
  done = np.zeros(b, bool)
  stopped = np.zeros(b, bool)
  lengths = np.zeros(b, np.int64)
  emitted_all = []
  emitted = np.zeros(b, np.int32)  # the tokens of the previous step (set at every step)
  logits, ins, outs = prefill_fn(jnp.asarray(ids), prefill_ctx(mask), s)
  for t in range(max_new_tokens):
    if t > 0:
      logits, ins, outs = decode_fn(jnp.asarray(emitted[:, None]), decode_ctx(mask, t, s), t)
    if row_seeds is None:
      key_used, key = hooks.sample_keys(t, sampling.sampling_key(seed, batch_id, t))
      raw = np.asarray(fns.sample(logits, key_used, temperature, top_k, top_p))
    else:  # one key per row: a request's tokens depend on its own seed only
      key_used, key = hooks.sample_keys(t, sampling.request_keys(row_seeds, t))
      raw = np.asarray(fns.sample_rows(logits, key_used, temperature, top_k, top_p))
    raw = hooks.tokens(t, raw, logits.shape[-1])
    emitted = np.where(done, np.int32(pad_id), raw).astype(np.int32)
    if observer is not None:
      observer(t, ins, outs, logits, jnp.asarray(emitted), key)
    emitted_all.append(emitted)
    lengths += ~done
    hit = ~done & np.isin(emitted, stop)
    stopped |= hit
    done |= hit | (lengths >= limit)
    if done.all():
      break
  token_array = np.stack(emitted_all, axis=1)
  tokens = [token_array[i, :lengths[i]].tolist() for i in range(b)]
  reasons = ["stop" if x else "length" for x in stopped]
  return GenerationResult(tokens, reasons, token_array, ids, mask, token_array.shape[1], s,
                          time.perf_counter() - start)


def generate(specs: Sequence[grid.BlockSpec], params_list: Sequence[PyTree],
             frozen_list: Sequence[PyTree], prompts_tokens: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, batch_id: int = 0, stop_tokens: Sequence[int] = (), pad_id: int = 0,
             max_total_len: int | None = None, observer: Observer | None = None,
             hooks: ServeHooks | None = None, fns: GenFns | None = None,
             row_seeds: Sequence[int] | None = None,
             row_max_new_tokens: Sequence[int] | None = None,
             prompt_width: int | None = None) -> GenerationResult:
  """Blocked generation: per-block jitted prefill/decode calls, then `sample`.

  Args:
    specs, params_list, frozen_list: the blocked model (`grid.BlockedParams` fields).
    prompts_tokens: one list of ids per prompt (non-empty); the batch is left-padded.
    max_new_tokens: at most this many generation steps.
    temperature, top_k, top_p: see `sampling.sample` (temperature 0: greedy).
    seed, batch_id: step t samples with `sampling.sampling_key(seed, batch_id, t)`.
    stop_tokens: a sequence is finished once it emits one (the stop token is kept in
      `tokens`); afterwards it emits pad_id, which is still fed through the model.
    pad_id: left padding of prompts and the token of finished sequences.
    max_total_len: KV cache length S (static shape); default P + max_new_tokens.
    observer: called once per step t (after the token is known) as
      observer(t, block_inputs, block_outputs, logits, tokens, key): block_inputs[k] /
      block_outputs[k] are the tensors entering / leaving block k at that step (device
      arrays; block_inputs[0] is the ids, block_outputs[-1] is `logits` [B,V] fp32),
      tokens the emitted int32 [B] (pad_id for rows finished before t), key the step key.
    hooks: a dishonest server's deviations (None: honest).
    fns: the jitted functions (default: the process's).
    row_seeds: one seed per row (served requests): row b samples step t with
      `sampling.request_key(row_seeds[b], t)` (the observer gets the [B] key array);
      None: the batch key `sampling_key(seed, batch_id, t)`.
    row_max_new_tokens: a row is finished after this many tokens (its own limit, at most
      max_new_tokens; finish reason "length"); None: max_new_tokens for every row.
    prompt_width: left-pad the prompts to this width P (a shape bucket) instead of the
      longest prompt.

  Returns:
    GenerationResult.
  """
  fns = fns or default_fns()
  hooks = hooks or Honest()
  specs = tuple(specs)
  state: dict[str, list] = {}

  def prefill_fn(ids, ctx, s):
    state["caches"] = [None] * len(specs)
    ins, outs, x = [], [], ids
    for k, (spec, p, f) in enumerate(zip(specs, params_list, frozen_list)):
      ins.append(x)
      x, state["caches"][k] = fns.prefill(spec, p, f, x, ctx, s)
      x = hooks.block_out(0, k, x)
      outs.append(x)
    return x, ins, outs

  def decode_fn(tok, ctx, t):
    ins, outs, x = [], [], tok
    for k, (spec, p, f) in enumerate(zip(specs, params_list, frozen_list)):
      ins.append(x)
      x, state["caches"][k] = fns.decode(spec, p, f, x, state["caches"][k], ctx)
      x = hooks.block_out(t, k, x)
      outs.append(x)
    return x, ins, outs

  return _loop(prefill_fn, decode_fn, prompts_tokens, max_new_tokens=max_new_tokens,
               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, batch_id=batch_id,
               stop_tokens=stop_tokens, pad_id=pad_id, max_total_len=max_total_len, observer=observer,
               fns=fns, hooks=hooks, row_seeds=row_seeds, row_max_new_tokens=row_max_new_tokens,
               prompt_width=prompt_width)


# ---------------------------------------------------------------------------------
# The unaudited baseline: one jit for the prefill and one for a decode step.


def plain_prefill(specs: tuple[grid.BlockSpec, ...], params_list, frozen_list, ids_BxP, batch_ctx,
                  max_total_len: int):
  """The whole model's prefill in one XLA program: (logits [B,V], caches per block)."""
  x, caches = ids_BxP, []
  for spec, p, f in zip(specs, params_list, frozen_list):
    x, c = block_prefill(spec, p, f, x, batch_ctx, max_total_len)
    caches.append(c)
  return x, caches


def plain_decode(specs: tuple[grid.BlockSpec, ...], params_list, frozen_list, tok_Bx1, caches,
                 pos_ctx):
  """The whole model's decode step in one XLA program: (logits [B,V], caches)."""
  x, new = tok_Bx1, []
  for spec, p, f, c in zip(specs, params_list, frozen_list, caches):
    x, c = block_decode(spec, p, f, x, c, pos_ctx)
    new.append(c)
  return x, new


def generate_plain(specs: Sequence[grid.BlockSpec], params_list: Sequence[PyTree],
                   frozen_list: Sequence[PyTree], prompts_tokens: Sequence[Sequence[int]], *,
                   max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, seed: int = 0, batch_id: int = 0,
                   stop_tokens: Sequence[int] = (), pad_id: int = 0,
                   max_total_len: int | None = None, fns: GenFns | None = None) -> GenerationResult:
  """Same arguments and semantics as `generate`, without per-block calls, observer or hooks.

  Tokens agree with `generate` up to XLA fusing the whole model differently (in fp32 on
  a tiny model they are equal; nothing guarantees it bitwise).
  """
  fns = fns or default_fns()
  specs = tuple(specs)
  params_list, frozen_list = list(params_list), list(frozen_list)
  state: dict[str, Any] = {}

  def prefill_fn(ids, ctx, s):
    x, state["caches"] = fns.plain_prefill(specs, params_list, frozen_list, ids, ctx, s)
    return x, [], []

  def decode_fn(tok, ctx, t):
    del t
    x, state["caches"] = fns.plain_decode(specs, params_list, frozen_list, tok, state["caches"], ctx)
    return x, [], []

  return _loop(prefill_fn, decode_fn, prompts_tokens, max_new_tokens=max_new_tokens,
               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, batch_id=batch_id,
               stop_tokens=stop_tokens, pad_id=pad_id, max_total_len=max_total_len, observer=None,
               fns=fns, hooks=Honest())


def blocked_kwargs(blocked: grid.BlockedParams) -> dict[str, Any]:
  """specs / params_list / frozen_list of a BlockedParams, for `generate(**...)`."""
  return {"specs": blocked.specs, "params_list": blocked.trainable, "frozen_list": blocked.frozen}
