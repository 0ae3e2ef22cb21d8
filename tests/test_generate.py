"""Blocked KV-cached generation: cache == recompute, batch independence, parity with HF
greedy generate, sampling, stop tokens, layer-block invariance, LoRA merging.

The model is a tiny random checkpoint from tests/hf_fixtures.py (O(1) logits, so greedy
comparisons are not decided by near-ties).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aftune.infer import generate as G
from aftune.infer import sampling
from aftune.model import blocks as grid
from aftune.model import hf_llama as H
from aftune.model import llama as M

S = 24  # one KV cache length for most tests: fewer compilations
PROMPTS = [[5, 17, 3], [9, 1, 44, 60, 7, 7, 100, 23, 8], [120, 3, 3, 64, 11], [77]]


@pytest.fixture(scope="module")
def llama(tiny_hf, tmp_path_factory):
  """(cfg, units, path) of a tiny Llama checkpoint."""
  path = tmp_path_factory.mktemp("llama")
  tiny_hf.write_tiny_checkpoint(path, "llama", seed=11)
  cfg, units = H.load_hf_model(path)
  return cfg, units, path


def _blocked(cfg, units, b_l):
  return grid.split_into_blocks(cfg, units, b_l)


def _gen(blocked, prompts, **kw):
  kw.setdefault("max_total_len", S)
  return G.generate(blocked.specs, blocked.trainable, blocked.frozen, prompts, **kw)


def _bits_equal(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------


def test_cached_decode_equals_full_recompute(tiny_hf, llama):
  cfg, units, _ = llama
  blocked = _blocked(cfg, units, 2)
  trace = G.TraceCollector()
  n = 7
  res = _gen(blocked, PROMPTS[:3], max_new_tokens=n, observer=trace)
  assert res.num_steps == n and all(len(t) == n for t in res.tokens)
  assert res.finish_reasons == ["length"] * 3
  p = res.prompt_ids.shape[1]
  # Shapes of what crosses block boundaries (3 blocks: [embed, l0], [l1, norm], [head]).
  s0, s1 = trace.steps[0], trace.steps[1]
  assert [x.shape for x in s0.block_inputs] == [
      (3, p), (3, p, tiny_hf.HIDDEN), (3, 1, tiny_hf.HIDDEN)]
  assert [x.shape for x in s1.block_inputs] == [
      (3, 1), (3, 1, tiny_hf.HIDDEN), (3, 1, tiny_hf.HIDDEN)]
  assert s0.logits.shape == (3, tiny_hf.VOCAB) and s0.logits.dtype == jnp.float32
  assert s0.block_outputs[-1] is s0.logits
  # Non-cached forward of the whole left-padded sequence (prompt + generated tokens).
  full_ids = np.concatenate([res.prompt_ids, res.token_array[:, :-1]], axis=1)
  full_mask = np.concatenate([res.attn_mask, np.ones((3, n - 1), np.int32)], axis=1)
  ref = tiny_hf.forward_logits(grid.merge_units(blocked), full_ids, full_mask)
  for t, rec in enumerate(trace.steps):
    np.testing.assert_allclose(np.asarray(rec.logits), ref[:, p - 1 + t], rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.asarray(rec.tokens), res.token_array[:, t])
    assert _bits_equal(jax.random.key_data(rec.key), jax.random.key_data(sampling.sampling_key(0, 0, t)))
  assert float(np.abs(ref).max()) > 1.0  # logits are not near zero
  # A longer cache changes nothing but padding slots.
  longer = _gen(blocked, PROMPTS[:3], max_new_tokens=n, max_total_len=S + 9)
  assert longer.tokens == res.tokens


def test_batch_independence_with_different_padding(llama):
  cfg, units, _ = llama
  blocked = _blocked(cfg, units, 3)
  n = 8
  together = _gen(blocked, PROMPTS, max_new_tokens=n)
  reordered = _gen(blocked, [PROMPTS[3], PROMPTS[0], PROMPTS[2]], max_new_tokens=n, pad_id=99)
  assert reordered.tokens == [together.tokens[3], together.tokens[0], together.tokens[2]]
  for i, prompt in enumerate(PROMPTS):
    alone = _gen(blocked, [prompt], max_new_tokens=n)
    assert alone.tokens[0] == together.tokens[i], i
  assert len({tuple(t) for t in together.tokens}) == len(PROMPTS)


def test_layer_block_size_does_not_change_logits(llama):
  cfg, units, _ = llama
  runs = {}
  for b_l in (1, 3):
    trace = G.TraceCollector()
    res = _gen(_blocked(cfg, units, b_l), PROMPTS[:3], max_new_tokens=6, temperature=0.9, top_k=20,
               top_p=0.95, seed=7, batch_id=3, observer=trace)
    assert len(trace.steps[0].block_outputs) == (5 if b_l == 1 else 2)
    runs[b_l] = (res, [np.asarray(s.logits) for s in trace.steps])
  (r1, l1), (r3, l3) = runs[1], runs[3]
  assert r1.tokens == r3.tokens
  assert len(l1) == len(l3) == 6
  assert all(_bits_equal(a, b) for a, b in zip(l1, l3))
  # The single-jit baseline gives the same tokens here (close, not necessarily bitwise).
  blocked = _blocked(cfg, units, 3)
  plain = G.generate_plain(blocked.specs, blocked.trainable, blocked.frozen, PROMPTS[:3],
                           max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.95, seed=7,
                           batch_id=3, max_total_len=S)
  assert plain.tokens == r3.tokens


def test_stop_tokens_and_max_new_tokens(llama):
  cfg, units, _ = llama
  blocked = _blocked(cfg, units, 3)
  free = _gen(blocked, PROMPTS[:3], max_new_tokens=6)
  assert [len(t) for t in free.tokens] == [6, 6, 6] and free.num_steps == 6
  short = _gen(blocked, PROMPTS[:3], max_new_tokens=2)
  assert short.tokens == [t[:2] for t in free.tokens] and short.finish_reasons == ["length"] * 3
  # Stop at the token sequence 0 emits at step 1: it ends there, the others run on.
  stop = free.tokens[0][1]
  expect = [t[:t.index(stop) + 1] if stop in t else t for t in free.tokens]
  res = _gen(blocked, PROMPTS[:3], max_new_tokens=6, stop_tokens=[stop], pad_id=0)
  assert res.tokens == expect and len(res.tokens[0]) <= 2
  assert res.finish_reasons == ["stop" if stop in t else "length" for t in free.tokens]
  for i, t in enumerate(expect):  # finished rows emit pad, which does not disturb the rest
    assert np.all(res.token_array[i, len(t):] == 0)
  # All sequences stop: generation ends early.
  stops = {t[1] for t in free.tokens}
  res = _gen(blocked, PROMPTS[:3], max_new_tokens=6, stop_tokens=sorted(stops))
  assert res.num_steps <= 2 and res.finish_reasons == ["stop"] * 3
  assert all(t[-1] in stops and len(t) <= 2 for t in res.tokens)


def test_argument_checks(llama):
  cfg, units, _ = llama
  blocked = _blocked(cfg, units, 3)
  with pytest.raises(ValueError, match="max_total_len"):
    _gen(blocked, PROMPTS, max_new_tokens=20, max_total_len=20)
  with pytest.raises(ValueError, match="at least one token"):
    _gen(blocked, [[1, 2], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="decode step"):
    G.decode_ctx(np.ones((1, 4)), 5, 8)
  ctx = G.decode_ctx(np.array([[0, 0, 1, 1], [1, 1, 1, 1]]), 2, 8)
  assert ctx["positions"].tolist() == [[3], [5]] and int(ctx["slot"]) == 5
  assert ctx["kv_mask"].astype(int).tolist() == [[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]]


# ---------------------------------------------------------------------------------
# Sampling (pure, no model).


def _logits(b=6, v=50, seed=0):
  return jnp.asarray(3.0 * np.random.default_rng(seed).standard_normal((b, v)), jnp.float32)


def test_sampling_settings():
  logits = _logits()
  greedy = np.asarray(jnp.argmax(logits, -1))
  key = sampling.sampling_key(1, 2, 3)
  assert np.array_equal(G.default_fns().sample(logits, key, 0.0, 0, 1.0), greedy)
  assert np.array_equal(G.default_fns().sample(logits, key, 0.0, 5, 0.5), greedy)  # temperature 0 wins
  order = np.argsort(-np.asarray(logits), axis=-1)
  for t in range(30):
    k = sampling.sampling_key(1, 2, t)
    assert np.array_equal(G.default_fns().sample(logits, k, 1.0, 1, 1.0), greedy)  # top_k = 1
    assert np.array_equal(G.default_fns().sample(logits, k, 1.5, 0, 1e-6), greedy)  # tiny top_p
    tok = np.asarray(G.default_fns().sample(logits, k, 2.0, 4, 1.0))
    assert all(tok[i] in order[i, :4] for i in range(len(tok)))  # never outside the top-k
  # Same key -> same sample; another key -> (eventually) another.
  a = G.default_fns().sample(logits, key, 1.0, 0, 1.0)
  assert np.array_equal(a, G.default_fns().sample(logits, key, 1.0, 0, 1.0))
  assert any(not np.array_equal(a, G.default_fns().sample(logits, sampling.sampling_key(1, 2, t), 1.0, 0, 1.0))
             for t in range(4, 8))
  with pytest.raises(ValueError):
    G.default_fns().sample(logits, key, -1.0, 0, 1.0)
  with pytest.raises(ValueError):
    G.default_fns().sample(logits, key, 1.0, 0, 0.0)


def test_sampling_distribution_top_p_and_temperature():
  probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
  rows = 4000
  logits = jnp.asarray(np.tile(np.log(probs), (rows, 1)))
  key = sampling.sampling_key(0, 0, 0)
  freq = np.bincount(np.asarray(G.default_fns().sample(logits, key, 1.0, 0, 1.0)), minlength=4) / rows
  np.testing.assert_allclose(freq, probs, atol=0.03)  # temperature 1: the softmax itself
  # top_p = 0.75: the smallest prefix reaching 0.75 is {0, 1}; renormalised 5:3.
  tok = np.asarray(G.default_fns().sample(logits, key, 1.0, 0, 0.75))
  assert set(np.unique(tok)) == {0, 1}
  assert abs(np.mean(tok == 0) - 0.625) < 0.03
  # top_k = 3 renormalises over {0, 1, 2}.
  tok = np.asarray(G.default_fns().sample(logits, key, 1.0, 3, 1.0))
  assert set(np.unique(tok)) == {0, 1, 2}
  # Higher temperature flattens, lower sharpens.
  hot = np.bincount(np.asarray(G.default_fns().sample(logits, key, 3.0, 0, 1.0)), minlength=4) / rows
  cold = np.bincount(np.asarray(G.default_fns().sample(logits, key, 0.3, 0, 1.0)), minlength=4) / rows
  assert cold[0] > freq[0] + 0.2 and hot[0] < freq[0] - 0.1 and hot[3] > freq[3] + 0.05


def test_sampling_key_derivation():
  k = sampling.sampling_key(42, 7, 3)
  expect = jax.random.fold_in(jax.random.fold_in(jax.random.key(42), 7), 3)
  assert _bits_equal(jax.random.key_data(k), jax.random.key_data(expect))
  assert _bits_equal(jax.random.key_data(k), jax.random.key_data(sampling.sampling_key(42, 7, 3)))
  datas = {np.asarray(jax.random.key_data(sampling.sampling_key(s, b, t))).tobytes()
           for s, b, t in [(42, 7, 3), (42, 7, 4), (42, 8, 3), (43, 7, 3)]}
  assert len(datas) == 4


# ---------------------------------------------------------------------------------
# LoRA: un-merged adapters as trained vs merged kernels.


def test_merge_lora(tiny_hf, tmp_path):
  tiny_hf.write_tiny_checkpoint(tmp_path, "qwen3", seed=5)
  lora = M.LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
  cfg, units = H.load_hf_model(tmp_path, lora=lora, seed=1)
  blocked = _blocked(cfg, units, 2)
  rng = np.random.default_rng(0)
  # Trained-looking adapters: lora_b is zero at init.
  blocked.trainable = jax.tree.map(
      lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), blocked.trainable)
  merged = grid.merge_lora(blocked)
  assert not any(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(
      nnx.state(grid.merge_units(merged)), is_leaf=lambda v: isinstance(v, nnx.Variable)))
  # Same structure as a model built without LoRA, same block cut.
  plain_cfg = dataclasses.replace(cfg, lora=None)
  for spec in merged.specs:
    ref_spec, ref_t, ref_f = grid.abstract_block(plain_cfg, 2, spec.index)
    assert spec.unit_names == ref_spec.unit_names and spec.graphdefs == ref_spec.graphdefs
    assert jax.tree.structure(merged.trainable[spec.index]) == jax.tree.structure(ref_t)
  # The merged kernel is W + scale * A @ B.
  lin = grid.merge_units(blocked)["layer_0"].self_attn.q_proj
  want = lin.kernel[...] + 2.0 * (lin.lora_a[...] @ lin.lora_b[...])
  got = merged.trainable[0]["layer_0"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Logits close (not bitwise), tokens equal; adapters matter.
  outs = {}
  for name, b in (("unmerged", blocked), ("merged", merged), ("base", _blocked(*H.load_hf_model(
      tmp_path, lora=lora, seed=1), 2))):
    trace = G.TraceCollector()
    res = _gen(b, PROMPTS[:2], max_new_tokens=5, observer=trace)
    outs[name] = (res.tokens, np.stack([np.asarray(s.logits) for s in trace.steps]))
  (tu, lu), (tm, lm), (tb, lb) = outs["unmerged"], outs["merged"], outs["base"]
  assert tu == tm
  scale = float(np.abs(lu).max())
  print(f"\nLORA merged vs unmerged: max|diff| = {float(np.abs(lu - lm).max()):.3g} (max|logit| {scale:.3g})")
  assert float(np.abs(lu - lm).max()) < 1e-4 * scale
  assert float(np.abs(lu - lb).max()) > 1e-2 * scale


# ---------------------------------------------------------------------------------
# Parity with Hugging Face transformers' greedy generate.


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_matches_transformers(tiny_hf, hf, tmp_path, arch):
  torch, transformers = hf
  config = tiny_hf.write_tiny_checkpoint(tmp_path, arch, seed=21)
  eos, n = config["eos_token_id"], 10
  prompts = [[1, 40, 9, 77, 5, 13, 90], [1, 64, 3]]
  cfg, units = H.load_hf_model(tmp_path)
  res = _gen(_blocked(cfg, units, 2), prompts, max_new_tokens=n, stop_tokens=[eos], pad_id=0)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32, attn_implementation="eager")
  model.eval()
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(res.prompt_ids, dtype=torch.long),
                         attention_mask=torch.tensor(res.attn_mask, dtype=torch.long),
                         max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=eos,
                         pad_token_id=0)
  p = res.prompt_ids.shape[1]
  for i in range(len(prompts)):
    ref = out[i, p:].tolist()
    ref = ref[:ref.index(eos) + 1] if eos in ref else ref
    assert res.tokens[i] == ref, (arch, i, res.tokens[i], ref)
  assert sum(len(t) for t in res.tokens) >= n  # something was generated
