"""Tests for aftune.hf_import: logit parity with transformers, config mapping, LoRA, errors.

The parity tests compare aftune's fp32 logits with transformers' eager fp32 logits on the
real (non-pad) positions of a right-padded batch of tiny random checkpoints written by
tests/hf_fixtures.py. Run with -s to see the measured max |diff| per config (recorded in
docs/hf_import.md).
"""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from aftune.model import blocks as grid
from aftune.model import hf_llama as H
from aftune.model import llama as M

REPO = Path(__file__).resolve().parents[1]
PARITY_TOL = 1e-4  # fp32 round-off; measured figures are ~1e-5 (docs/hf_import.md)


@pytest.fixture
def batch(tiny_hf):
  """(tokens, mask) [2, 12] int64: random tokens, the second sequence right-padded by 4."""
  seed, b, t, pad = 1, 2, 12, 4
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, tiny_hf.VOCAB, (b, t)).astype(np.int64)
  mask = np.ones((b, t), np.int64)
  mask[1, t - pad:] = 0  # right padding on the second sequence
  return tokens, mask


def _hf_logits(hf, path, tokens, mask, position_ids=None, dtype="float32"):
  torch, transformers = hf
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path), dtype=getattr(torch, dtype), attn_implementation="eager")
  model.eval()
  kw = {} if position_ids is None else {"position_ids": torch.tensor(position_ids)}
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), **kw)
  return model, out.logits.float().numpy()


PARITY_CASES = {
    "llama": dict(arch="llama"),
    "llama_tied": dict(arch="llama", tied=True),
    "llama3_rope": dict(arch="llama", llama3_rope=True),
    "llama3_rope_tied": dict(arch="llama", llama3_rope=True, tied=True),
    "llama3_rope_parameters_dict": dict(arch="llama", llama3_rope=True, rope_format="parameters"),
    "llama_bias": dict(arch="llama", bias=True),
    "llama_sharded": dict(arch="llama", sharded=True),
    "llama_bf16_checkpoint": dict(arch="llama", dtype="bfloat16"),
    "qwen2": dict(arch="qwen2"),
    "qwen2_tied": dict(arch="qwen2", tied=True),
    "qwen3": dict(arch="qwen3"),
    "qwen3_tied_sharded": dict(arch="qwen3", tied=True, sharded=True),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logit_parity_with_transformers(tiny_hf, hf, batch, tmp_path, case):
  kw = PARITY_CASES[case]
  tiny_hf.write_tiny_checkpoint(tmp_path, seed=len(case), **kw)
  tokens, mask = batch
  cfg, units = H.load_hf_model(tmp_path)
  ours = tiny_hf.forward_logits(units, tokens, mask)
  model, ref = _hf_logits(hf, tmp_path, tokens, mask)
  real = mask.astype(bool)
  diff = float(np.abs(ours - ref)[real].max())
  scale = float(np.abs(ref[real]).max())
  print(f"\nPARITY {case}: max|diff| = {diff:.3g} (max|logit| = {scale:.3g})")
  assert ours.shape == ref.shape == (2, 12, tiny_hf.VOCAB)
  assert diff < PARITY_TOL, (case, diff)
  assert scale > 1.0  # the comparison is not between near-zero logits
  # The rotary frequencies are HF's, and llama3 scaling really changes them here.
  hf_inv_freq = model.model.rotary_emb.inv_freq.numpy()
  np.testing.assert_allclose(M.rope_inv_freq(cfg), hf_inv_freq, rtol=1e-6)
  if kw.get("llama3_rope"):
    assert cfg.rope_scaling == M.RopeScaling(8.0, 1.0, 4.0, 16)
    plain = M.rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    assert np.all(np.abs(plain - hf_inv_freq) > 1e-3 * plain)


def test_left_padding_parity(tiny_hf, hf, batch, tmp_path):
  """Left padding with the position ids aftune derives from the mask."""
  tiny_hf.write_tiny_checkpoint(tmp_path, "qwen3", seed=3)
  tokens, _ = batch
  mask = np.ones_like(tokens)
  mask[1, :5] = 0
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  _, units = H.load_hf_model(tmp_path)
  ours = tiny_hf.forward_logits(units, tokens, mask)
  _, ref = _hf_logits(hf, tmp_path, tokens, mask, position_ids=positions)
  diff = float(np.abs(ours - ref)[mask.astype(bool)].max())
  print(f"\nPARITY qwen3_left_padding: max|diff| = {diff:.3g}")
  assert diff < PARITY_TOL


def test_bf16_compute_close_to_transformers_bf16(tiny_hf, hf, batch, tmp_path):
  """dtype="bfloat16": fp32 params, bf16 compute; error vs fp32 comparable to HF's own bf16."""
  tiny_hf.write_tiny_checkpoint(tmp_path, "llama", seed=4)
  tokens, mask = batch
  cfg, units = H.load_hf_model(tmp_path, dtype="bfloat16")
  assert cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"
  assert units["layer_0"].self_attn.q_proj.kernel[...].dtype == np.float32
  ours = tiny_hf.forward_logits(units, tokens, mask)
  _, ref32 = _hf_logits(hf, tmp_path, tokens, mask)
  _, ref16 = _hf_logits(hf, tmp_path, tokens, mask, dtype="bfloat16")
  real = mask.astype(bool)
  ours_err = float(np.abs(ours - ref32)[real].max())
  hf_err = float(np.abs(ref16 - ref32)[real].max())
  print(f"\nBF16 compute: aftune vs HF fp32 {ours_err:.3g}; HF bf16 vs HF fp32 {hf_err:.3g}; "
        f"aftune vs HF bf16 {float(np.abs(ours - ref16)[real].max()):.3g}")
  assert ours_err < max(2.0 * hf_err, 0.05)


# ---------------------------------------------------------------------------------
# Weights, tying, LoRA (no transformers needed).


def test_params_are_checkpoint_weights_transposed(tiny_hf, tmp_path):
  conf = tiny_hf.write_tiny_checkpoint(tmp_path, "qwen2", seed=5)
  t = tiny_hf.tiny_tensors(conf, seed=5)
  cfg, units = H.load_hf_model(tmp_path)
  assert list(units) == list(cfg.unit_names)
  assert (cfg.arch, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.qk_norm) == ("qwen2", True, False, False, False)
  attn = units["layer_1"].self_attn
  np.testing.assert_array_equal(attn.k_proj.kernel[...], t["model.layers.1.self_attn.k_proj.weight"].T)
  np.testing.assert_array_equal(attn.k_proj.bias[...], t["model.layers.1.self_attn.k_proj.bias"])
  assert attn.o_proj.bias is None
  np.testing.assert_array_equal(units["embed"].embedding[...], t["model.embed_tokens.weight"])
  np.testing.assert_array_equal(units["final_norm"].norm.scale[...], t["model.norm.weight"])
  np.testing.assert_array_equal(units["lm_head"].kernel[...], t["lm_head.weight"].T)
  # Every HF tensor maps to exactly one parameter.
  assert set(H.weight_mapping(cfg)) == set(t)


def test_bf16_checkpoint_upcast_exactly(tiny_hf, tmp_path):
  import ml_dtypes
  conf = tiny_hf.write_tiny_checkpoint(tmp_path, "llama", dtype="bfloat16", sharded=True)
  t = tiny_hf.tiny_tensors(conf)
  _, units = H.load_hf_model(tmp_path)
  got = units["layer_0"].mlp.down_proj.kernel[...]
  assert got.dtype == np.float32
  want = t["model.layers.0.mlp.down_proj.weight"].astype(ml_dtypes.bfloat16).astype(np.float32).T
  np.testing.assert_array_equal(got, want)


def test_tied_and_untied_embeddings(tiny_hf, batch, tmp_path):
  tiny_hf.write_tiny_checkpoint(tmp_path, "llama", tied=True)
  tokens, mask = batch
  cfg, units = H.load_hf_model(tmp_path)
  assert cfg.tie_embeddings and units["lm_head"].kernel is None
  np.testing.assert_array_equal(units["lm_head"].tied_embedding[...], units["embed"].embedding[...])
  with pytest.raises(ValueError, match="tied"):  # full fine-tuning needs an untied head
    grid.split_into_blocks(cfg, units, 2)
  cfg_u, units_u = H.load_hf_model(tmp_path, untie_embeddings=True)
  assert not cfg_u.tie_embeddings
  np.testing.assert_array_equal(units_u["lm_head"].kernel[...], units_u["embed"].embedding[...].T)
  np.testing.assert_allclose(tiny_hf.forward_logits(units_u, tokens, mask),
                             tiny_hf.forward_logits(units, tokens, mask),
                             rtol=0, atol=1e-6)
  blocked = grid.split_into_blocks(cfg_u, units_u, 2)  # full fine-tuning: head is its own Param
  assert "kernel" in blocked.trainable[-1]["lm_head"]
  # untie_embeddings on an untied checkpoint changes nothing.
  d2 = tmp_path / "untied"
  tiny_hf.write_tiny_checkpoint(d2, "llama")
  assert H.load_hf_model(d2, untie_embeddings=True)[0] == H.load_hf_model(d2)[0]


def test_tied_checkpoint_with_equal_lm_head_is_accepted(tiny_hf, tmp_path):
  conf = tiny_hf.write_tiny_checkpoint(tmp_path, "qwen2", tied=True)
  t = tiny_hf.tiny_tensors(conf)
  t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
  tiny_hf.write_tensors(tmp_path, t)
  cfg, _ = H.load_hf_model(tmp_path)
  assert cfg.tie_embeddings
  t["lm_head.weight"][0, 0] += 1.0
  tiny_hf.write_tensors(tmp_path, t)
  with pytest.raises(H.HFImportError, match=r"model\.safetensors: .*'lm_head\.weight' differs"):
    H.load_hf_model(tmp_path)


def test_lora_import(tiny_hf, batch, tmp_path):
  conf = tiny_hf.write_tiny_checkpoint(tmp_path, "qwen3", seed=7)
  t = tiny_hf.tiny_tensors(conf, seed=7)
  tokens, mask = batch
  lora = M.LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
  cfg0, units0 = H.load_hf_model(tmp_path)
  cfg, units = H.load_hf_model(tmp_path, lora=lora, seed=11, dropout_rate=0.1)
  assert cfg.lora == lora and cfg.dropout_rate == 0.1
  assert cfg == dataclasses.replace(cfg0, lora=lora, dropout_rate=0.1)
  fresh = M.build_units(cfg, 11)
  for i in range(tiny_hf.LAYERS):
    layer, ref = units[f"layer_{i}"], fresh[f"layer_{i}"]
    for lin, ref_lin, hf_name in ((layer.self_attn.q_proj, ref.self_attn.q_proj, "self_attn.q_proj"),
                                  (layer.self_attn.v_proj, ref.self_attn.v_proj, "self_attn.v_proj"),
                                  (layer.mlp.down_proj, ref.mlp.down_proj, "mlp.down_proj")):
      np.testing.assert_array_equal(lin.kernel[...], t[f"model.layers.{i}.{hf_name}.weight"].T)
      np.testing.assert_array_equal(lin.lora_a[...], ref_lin.lora_a[...])  # fresh init from seed
      assert float(np.abs(lin.lora_a[...]).max()) > 0
      np.testing.assert_array_equal(lin.lora_b[...], 0.0)
    assert layer.self_attn.k_proj.lora_a is None
  np.testing.assert_array_equal(tiny_hf.forward_logits(units, tokens, mask),
                                tiny_hf.forward_logits(units0, tokens, mask))
  blocked = grid.split_into_blocks(cfg, units, 3)
  import jax
  for block in blocked.trainable:  # only adapters train
    for path, _ in jax.tree_util.tree_leaves_with_path(block):
      assert str(path[-1].key) in ("lora_a", "lora_b"), path


def test_inv_freq_buffers_are_checked_and_skipped(tiny_hf, tmp_path):
  conf = tiny_hf.write_tiny_checkpoint(tmp_path, "llama", llama3_rope=True)
  t = tiny_hf.tiny_tensors(conf)
  cfg = H.config_from_hf(conf)
  name = "model.layers.0.self_attn.rotary_emb.inv_freq"
  t[name] = M.rope_inv_freq(cfg)
  tiny_hf.write_tensors(tmp_path, t)
  H.load_hf_model(tmp_path)
  t[name] = M.rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
  tiny_hf.write_tensors(tmp_path, t)
  with pytest.raises(H.HFImportError, match="inv_freq' does not match"):
    H.load_hf_model(tmp_path)


# ---------------------------------------------------------------------------------
# config.json mapping.


def test_config_mapping_variants(tiny_hf):
  c = tiny_hf.tiny_config("qwen3")
  cfg = H.config_from_hf(c)
  assert (cfg.head_dim, cfg.hd, cfg.qk_norm, cfg.qkv_bias, cfg.o_bias) == (32, 32, True, False, False)
  assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-6
  del c["head_dim"]
  assert H.config_from_hf(c).hd == 128  # transformers' Qwen3Config default
  c = tiny_hf.tiny_config("llama", bias=True)
  del c["num_key_value_heads"]
  cfg = H.config_from_hf(c)
  assert (cfg.num_kv_heads, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.head_dim) == (4, True, True, True, None)
  c["head_dim"] = 16  # explicit but equal to hidden // heads
  assert H.config_from_hf(c).head_dim is None
  # Legacy "type" key, and rope_theta inside rope_parameters.
  c = tiny_hf.tiny_config("llama", llama3_rope=True)
  c["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in c["rope_scaling"].items()}
  assert H.config_from_hf(c).rope_scaling == M.RopeScaling(8.0, 1.0, 4.0, 16)
  del c["rope_scaling"]["original_max_position_embeddings"]  # falls back as transformers does
  assert H.config_from_hf(c).rope_scaling.original_max_position_embeddings == c["max_position_embeddings"]
  c = tiny_hf.tiny_config("llama", llama3_rope=True, rope_format="parameters")
  cfg = H.config_from_hf(c)
  assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.original_max_position_embeddings == 16
  c["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
  cfg = H.config_from_hf(c, dtype="bfloat16")
  assert (cfg.rope_theta, cfg.rope_scaling, cfg.dtype) == (1234.0, None, "bfloat16")
  assert M.ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: c.update(architectures=["MistralForCausalLM"]), "unsupported architectures"),
    (lambda c: c.pop("architectures"), "unsupported architectures"),
    (lambda c: c.pop("hidden_size"), "missing required key 'hidden_size'"),
    (lambda c: c.update(num_attention_heads="4"), "'num_attention_heads' must be an integer"),
    (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu'"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
    (lambda c: c.update(rope_scaling={"type": "linear", "factor": 4.0}), "rope_type 'linear'"),
    (lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "'low_freq_factor'"),
    (lambda c: c.update(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                        original_max_position_embeddings=32), "conflicting original_max_position"),
    (lambda c: c.update(tie_word_embeddings="yes"), "'tie_word_embeddings' must be true or false"),
])
def test_config_errors(tiny_hf, tmp_path, edit, pattern):
  c = tiny_hf.write_tiny_checkpoint(tmp_path, "llama")
  edit(c)
  (tmp_path / "config.json").write_text(json.dumps(c))
  with pytest.raises(H.HFImportError, match="config.json: .*" + pattern):
    H.load_hf_model(tmp_path)


def test_sliding_window_rejected(tiny_hf):
  c = tiny_hf.tiny_config("qwen2")
  c.update(use_sliding_window=True, sliding_window=8, max_window_layers=1)
  with pytest.raises(H.HFImportError, match=r"sliding-window attention \(layers \[1\]\)"):
    H.config_from_hf(c)
  c["max_window_layers"] = 2  # no layer actually slides
  H.config_from_hf(c)
  c = tiny_hf.tiny_config("qwen3")
  c["layer_types"] = ["full_attention", "sliding_attention"]
  with pytest.raises(H.HFImportError, match="sliding-window"):
    H.config_from_hf(c)


def test_bad_arguments(tiny_hf):
  c = tiny_hf.tiny_config("llama")
  with pytest.raises(ValueError, match="dtype"):
    H.config_from_hf(c, dtype="int8")
  with pytest.raises(ValueError, match="LoRA"):
    H.config_from_hf(c, lora=M.LoRAConfig(targets=("qproj",)))


# ---------------------------------------------------------------------------------
# Bad files: one HFImportError naming the file (and the tensor).


def _rewrite(path, edit):
  t = load_file(str(path))
  edit(t)
  save_file(t, str(path))


def test_missing_files(tiny_hf, tmp_path):
  with pytest.raises(H.HFImportError, match="does not exist"):
    H.load_hf_model(tmp_path / "nope")
  with pytest.raises(H.HFImportError, match=r"config\.json: missing config\.json"):
    H.load_hf_model(tmp_path)
  tiny_hf.write_tiny_checkpoint(tmp_path, "llama")
  (tmp_path / "model.safetensors").unlink()
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(H.HFImportError, match=r"missing weights: neither model\.safetensors nor "
                     r"model\.safetensors\.index\.json \(found \['pytorch_model\.bin'\]"):
    H.load_hf_model(tmp_path)


def test_malformed_json(tiny_hf, tmp_path):
  tiny_hf.write_tiny_checkpoint(tmp_path, "llama", sharded=True)
  good = (tmp_path / "config.json").read_text()
  (tmp_path / "config.json").write_text(good[:-10])
  with pytest.raises(H.HFImportError, match=r"config\.json: malformed JSON"):
    H.load_hf_model(tmp_path)
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(H.HFImportError, match=r"config\.json: expected a JSON object"):
    H.load_hf_model(tmp_path)
  (tmp_path / "config.json").write_text(good)
  (tmp_path / "model.safetensors.index.json").write_text("{not json")
  with pytest.raises(H.HFImportError, match=r"model\.safetensors\.index\.json: malformed JSON"):
    H.load_hf_model(tmp_path)
  (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
  with pytest.raises(H.HFImportError, match=r"index\.json: missing or empty 'weight_map'"):
    H.load_hf_model(tmp_path)


def test_missing_tensor(tiny_hf, tmp_path):
  tiny_hf.write_tiny_checkpoint(tmp_path, "qwen3")
  _rewrite(tmp_path / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
  with pytest.raises(H.HFImportError, match=r"model\.safetensors: missing tensor "
                     r"'model\.layers\.1\.self_attn\.k_norm\.weight' required by config\.json"):
    H.load_hf_model(tmp_path)


def test_missing_lm_head_when_untied(tiny_hf, tmp_path):
  tiny_hf.write_tiny_checkpoint(tmp_path, "llama", sharded=True)
  shard = tmp_path / "model-00003-of-00003.safetensors"
  _rewrite(shard, lambda t: t.pop("lm_head.weight"))
  idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  del idx["weight_map"]["lm_head.weight"]
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
  with pytest.raises(H.HFImportError, match=r"index\.json: missing tensor 'lm_head\.weight'"):
    H.load_hf_model(tmp_path)


def test_unexpected_tensor(tiny_hf, tmp_path):
  tiny_hf.write_tiny_checkpoint(tmp_path, "qwen2")
  _rewrite(tmp_path / "model.safetensors",
           lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}))
  with pytest.raises(H.HFImportError, match=r"model\.safetensors: unexpected tensor "
                     r"'model\.layers\.0\.self_attn\.o_proj\.bias'"):
    H.load_hf_model(tmp_path)


def test_shape_mismatch(tiny_hf, tmp_path):
  tiny_hf.write_tiny_checkpoint(tmp_path, "llama", sharded=True)
  _rewrite(tmp_path / "model-00002-of-00003.safetensors",
           lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((96, 64), np.float32)}))
  with pytest.raises(H.HFImportError, match=r"model-00002-of-00003\.safetensors: tensor "
                     r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \[96, 64\], expected \[128, 64\]"):
    H.load_hf_model(tmp_path)
  # A config that disagrees with the weights is the same error.
  tiny_hf.write_tiny_checkpoint(tmp_path / "b", "qwen3")
  c = json.loads((tmp_path / "b" / "config.json").read_text())
  c["head_dim"] = 16
  (tmp_path / "b" / "config.json").write_text(json.dumps(c))
  with pytest.raises(H.HFImportError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape "
                     r"\[128, 64\], expected \[64, 64\]"):
    H.load_hf_model(tmp_path / "b")


def test_index_problems(tiny_hf, tmp_path):
  tiny_hf.write_tiny_checkpoint(tmp_path, "llama", sharded=True)
  (tmp_path / "model-00002-of-00003.safetensors").unlink()
  with pytest.raises(H.HFImportError, match=r"model\.safetensors\.index\.json: points to missing shard "
                     r"'model-00002-of-00003\.safetensors'"):
    H.load_hf_model(tmp_path)
  tiny_hf.write_tiny_checkpoint(tmp_path, "llama", sharded=True)
  idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  idx["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
  with pytest.raises(H.HFImportError, match=r"index\.json: lists tensor 'model\.norm\.weight' in shard "
                     r"'model-00001-of-00003\.safetensors', which does not hold it"):
    H.load_hf_model(tmp_path)
  idx["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
  with pytest.raises(H.HFImportError, match="outside the checkpoint directory"):
    H.load_hf_model(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors(tiny_hf, tmp_path, damage):
  tiny_hf.write_tiny_checkpoint(tmp_path, "llama")
  f = tmp_path / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
  with pytest.raises(H.HFImportError, match=r"model\.safetensors: truncated or corrupt safetensors file"):
    H.load_hf_model(tmp_path)


def test_non_float_tensor(tiny_hf, tmp_path):
  tiny_hf.write_tiny_checkpoint(tmp_path, "llama")
  _rewrite(tmp_path / "model.safetensors",
           lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
  with pytest.raises(H.HFImportError, match=r"'model\.norm\.weight' has dtype I32"):
    H.load_hf_model(tmp_path)


def test_load_hf_tokenizer(tmp_path):
  shutil.copy(REPO / "data" / "default" / "tokenizer.json", tmp_path / "tokenizer.json")
  tok = H.load_hf_tokenizer(tmp_path)
  ids = tok.encode("hello world")
  assert ids and tok.decode(ids).strip() != ""
  with pytest.raises(ValueError, match="tokenizer"):
    H.load_hf_tokenizer(tmp_path / "missing")


def test_symlinked_files_as_in_hf_cache(tiny_hf, tmp_path):
  """HF cache snapshots hold symlinks into a blobs/ directory: they must load."""
  blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
  tiny_hf.write_tiny_checkpoint(blobs, "qwen2", sharded=True)
  snap.mkdir(parents=True)
  for f in blobs.iterdir():
    (snap / f.name).symlink_to(f)
  cfg, units = H.load_hf_model(snap)
  np.testing.assert_array_equal(units["final_norm"].norm.scale[...],
                                load_file(str(blobs / "model-00003-of-00003.safetensors"))["model.norm.weight"])
