"""Model behaviour that HF parity does not pin down: causality, padding, LoRA init."""

import jax.numpy as jnp
import numpy as np

from aftune.model import llama as model_lib


def _logits(units, tokens, attn_mask):
  ctx = {"positions": model_lib.positions_from_mask(attn_mask), "attn_mask": attn_mask, "key": None}
  x = tokens
  for unit in units.values():
    x = unit(x, ctx)
  return x


def _cfg(**kw):
  return model_lib.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                               num_heads=4, num_kv_heads=2, **kw)


def test_causal_future_tokens_do_not_change_past_logits():
  units = model_lib.build_units(_cfg(), seed=0)
  mask = jnp.ones((1, 8), bool)
  a = jnp.arange(8)[None] % 50
  b = a.at[0, 5:].set(7)
  la, lb = _logits(units, a, mask), _logits(units, b, mask)
  np.testing.assert_array_equal(la[0, :5], lb[0, :5])
  assert not np.allclose(la[0, 5:], lb[0, 5:])


def test_right_padding_does_not_change_real_positions():
  units = model_lib.build_units(_cfg(), seed=0)
  toks = jnp.arange(6)[None] + 3
  short = _logits(units, toks, jnp.ones((1, 6), bool))
  padded_toks = jnp.concatenate([toks, jnp.zeros((1, 4), toks.dtype)], axis=1)
  padded = _logits(units, padded_toks, jnp.arange(10)[None] < 6)
  np.testing.assert_allclose(short[0], padded[0, :6], atol=1e-5)


def test_lora_starts_as_the_base_model():
  base = model_lib.build_units(_cfg(), seed=0)
  lora = model_lib.build_units(_cfg(lora=model_lib.LoRAConfig(rank=2)), seed=0)
  toks, mask = jnp.arange(8)[None], jnp.ones((1, 8), bool)
  np.testing.assert_array_equal(_logits(base, toks, mask), _logits(lora, toks, mask))
  assert lora["layer_0"].self_attn.q_proj.lora_a is not None
  assert lora["layer_0"].self_attn.k_proj.lora_a is None


def test_llama3_rope_scaling_changes_only_low_frequencies():
  plain = model_lib.rope_inv_freq(_cfg())
  scaled = model_lib.rope_inv_freq(_cfg(rope_scaling=model_lib.RopeScaling(
      factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)))
  assert scaled[0] == plain[0]  # highest frequency untouched
  np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)  # lowest divided by factor


def test_gqa_equals_repeated_kv_heads():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
  mask = model_lib.causal_mask(jnp.ones((2, 5), bool))
  out = model_lib.attention(q, k, v, mask)
  ref = model_lib.attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask)
  np.testing.assert_allclose(out, ref, atol=1e-6)
