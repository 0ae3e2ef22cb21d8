"""Sampling: the committed per-step key and the token rule (pure functions of both).

A verifier recomputes every emitted token from the logits, the key (which must follow
from the seed) and the settings, so both are pure, and `sample` is jitted once with
the generation functions (`generate.GenFns`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sampling_key(seed: int, batch_id: int, t: int) -> jax.Array:
  """The sampling key of generation step t: fold_in(fold_in(key(seed), batch_id), t).

  Row b of the batch then samples with fold_in(that key, b) (see `sample`).
  """
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), batch_id), t)


def request_key(seed: int, t: int) -> jax.Array:
  """The sampling key of one served request at generation step t (`experiments.serve`).

  It depends on the request's own seed and t only, never on the batch the request was put
  in or its row there, so a client can check its own tokens alone (per-request audits).
  """
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), REQUEST_STREAM), t)


# Separates request keys from batch keys (`sampling_key(seed, batch_id, t)`) of the same seed.
REQUEST_STREAM = 0x5E4E


def request_keys(seeds, t: int) -> jax.Array:
  """Stacked `request_key(seed, t)` of every row: a key array [B] (one jitted call)."""
  seeds = np.asarray(seeds, np.int64)
  if seeds.ndim != 1 or seeds.min(initial=0) < 0 or seeds.max(initial=0) >= 1 << 32:
    raise ValueError(f"request seeds are ints in 0..2**32-1, got {seeds!r}")
  hi, lo = (seeds >> 32).astype(np.uint32), (seeds & 0xFFFFFFFF).astype(np.uint32)
  return _request_keys(hi, lo, np.uint32(t))


@jax.jit
def _request_keys(seed_hi_B, seed_lo_B, t):
  def one(hi, lo):
    # jax.random.key(seed) as threefry seeds it: (seed >> 32, seed & 0xFFFFFFFF).
    key = jax.random.wrap_key_data(jnp.stack([hi, lo]), impl="threefry2x32")
    return jax.random.fold_in(jax.random.fold_in(key, REQUEST_STREAM), t)
  return jax.vmap(one)(seed_hi_B, seed_lo_B)


def sample_rows(logits_BxV: jax.Array, keys_B: jax.Array, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """`sample` with one key per row (row b draws as `sample(logits[b:b+1], keys[b])`)."""
  one = lambda l_V, k: sample(l_V[None], k, temperature, top_k, top_p)[0]
  return jax.vmap(one)(logits_BxV, keys_B)


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """Samples one token per row (int32 [B]); a pure function of (logits, key, settings).

  temperature == 0: greedy (argmax, lowest id on ties; top_k/top_p ignored). Otherwise
  logits / temperature, then top-k (top_k > 0: keep logits >= the k-th largest), then
  top-p (keep the smallest prefix of the sorted distribution whose mass reaches top_p;
  the most likely token always stays), then a categorical draw with key fold_in(key, b)
  for row b.
  """
  if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, "
                     f"top_p={top_p}")
  logits = logits_BxV.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  b, v = logits.shape
  neg_inf = jnp.asarray(-jnp.inf, jnp.float32)
  l = logits / jnp.asarray(temperature, jnp.float32)
  if 0 < top_k < v:
    kth_Bx1 = jax.lax.top_k(l, top_k)[0][:, -1:]
    l = jnp.where(l < kth_Bx1, neg_inf, l)
  if top_p < 1.0:
    sorted_BxV = -jnp.sort(-l, axis=-1)
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < jnp.asarray(top_p, jnp.float32)
    thr_Bx1 = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    l = jnp.where(l < thr_Bx1, neg_inf, l)
  row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))
  return jax.vmap(jax.random.categorical)(row_keys, l).astype(jnp.int32)
