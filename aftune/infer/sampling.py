"""Sampling: the committed per-step key and the token rule (pure functions of both).

A verifier recomputes every emitted token from the logits, the key (which must follow
from the seed) and the settings, so both are pure, and `sample` is jitted once with
the generation functions (`generate.GenFns`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sampling_key(seed: int, batch_id: int, t: int) -> jax.Array:
  """The sampling key of generation step t: fold_in(fold_in(key(seed), batch_id), t).

  Row b of the batch then samples with fold_in(that key, b) (see `sample`).
  """
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), batch_id), t)


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
