"""Tiny Hugging Face checkpoints written from numpy, in the exact HF layout and names.

A pytest plugin (conftest.py: `pytest_plugins = ["hf_fixtures"]`); tests take its fixtures
and never import it:

  tiny_hf   this module: the writers and the tiny sizes, e.g.
            cfg = tiny_hf.write_tiny_checkpoint(tmp_path, "qwen3", tied=True, sharded=True)
            writes tmp_path/config.json and either model.safetensors or three shards plus
            model.safetensors.index.json, loadable both by `transformers` and by
            `aftune.model.hf_llama.load_hf_model`.
  hf        (torch, transformers), imported once; skips the test when they are not installed.

Nothing here imports torch or transformers at import time.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

# Set when conftest.py loads this plugin, before any test imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 128, 64, 128, 2, 4, 2
QWEN3_HEAD_DIM = 32  # != HIDDEN // HEADS (16), to exercise an explicit head_dim

ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def tiny_config(arch: str = "llama", *, tied: bool = False, llama3_rope: bool = False,
                bias: bool = False, rope_format: str = "legacy", dtype: str = "float32") -> dict[str, Any]:
  """The config.json dict of a tiny model.

  Args:
    arch: "llama", "qwen2" or "qwen3".
    tied: tie_word_embeddings.
    llama3_rope: Llama-3 rope scaling with original_max_position_embeddings=16 and factor 8,
      so that it changes every frequency of the tiny model (head_dim 16).
    bias: Llama only: attention_bias and mlp_bias.
    rope_format: "legacy" (top-level rope_theta / rope_scaling, as most hub checkpoints) or
      "parameters" (one `rope_parameters` dict, as newer transformers versions write).
    dtype: recorded as torch_dtype.
  """
  if arch not in ARCHS:
    raise ValueError(f"arch must be one of {sorted(ARCHS)}")
  if bias and arch != "llama":
    raise ValueError("bias=True is a Llama option (Qwen2's biases are implied)")
  hf_arch, model_type = ARCHS[arch]
  cfg: dict[str, Any] = {
      "architectures": [hf_arch],
      "model_type": model_type,
      "vocab_size": VOCAB,
      "hidden_size": HIDDEN,
      "intermediate_size": INTERMEDIATE,
      "num_hidden_layers": LAYERS,
      "num_attention_heads": HEADS,
      "num_key_value_heads": KV_HEADS,
      "hidden_act": "silu",
      "max_position_embeddings": 128,
      "initializer_range": 0.02,
      "tie_word_embeddings": tied,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "torch_dtype": dtype,
  }
  rope: dict[str, Any] = {"rope_type": "default"}
  if arch == "llama":
    theta = 500000.0 if llama3_rope else 10000.0
    cfg.update(rms_norm_eps=1e-5, attention_bias=bias, mlp_bias=bias)
    if llama3_rope:
      rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
  else:
    if llama3_rope:
      raise ValueError("llama3_rope is a Llama option")
    theta = 1000000.0
    cfg.update(rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=None, max_window_layers=LAYERS)
    if arch == "qwen3":
      cfg.update(head_dim=QWEN3_HEAD_DIM, attention_bias=False)
  if rope_format == "legacy":
    cfg["rope_theta"] = theta
    if rope["rope_type"] != "default":
      cfg["rope_scaling"] = rope
  elif rope_format == "parameters":
    cfg["rope_parameters"] = {**rope, "rope_theta": theta}
  else:
    raise ValueError("rope_format must be 'legacy' or 'parameters'")
  return cfg


def tiny_tensors(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
  """Random fp32 weights for `config`, HF names and layouts ([out, in] linear weights).

  Scales are chosen so that logits are O(1) and attention is far from uniform, which
  makes a parity test meaningful: embeddings N(0, 1), linear weights N(0, 1/fan_in) * 2,
  biases N(0, 0.1), norm weights 1 + N(0, 0.1).
  """
  rng = np.random.default_rng(seed)
  d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  h, g = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
  k = config.get("head_dim") or d // h
  arch = config["model_type"]
  qkv_bias = arch == "qwen2" or bool(config.get("attention_bias"))
  o_bias = arch != "qwen2" and bool(config.get("attention_bias"))
  mlp_bias = arch == "llama" and bool(config.get("mlp_bias"))

  def lin(out: int, inp: int) -> np.ndarray:
    return (2.0 / np.sqrt(inp) * rng.standard_normal((out, inp))).astype(np.float32)

  def vec(n: int, base: float = 0.0, std: float = 0.1) -> np.ndarray:
    return (base + std * rng.standard_normal(n)).astype(np.float32)

  t: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((v, d)).astype(np.float32)}
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t[p + "input_layernorm.weight"] = vec(d, 1.0)
    for proj, (out, inp), has_bias in (("q_proj", (h * k, d), qkv_bias), ("k_proj", (g * k, d), qkv_bias),
                                       ("v_proj", (g * k, d), qkv_bias), ("o_proj", (d, h * k), o_bias)):
      t[p + f"self_attn.{proj}.weight"] = lin(out, inp)
      if has_bias:
        t[p + f"self_attn.{proj}.bias"] = vec(out)
    if arch == "qwen3":
      t[p + "self_attn.q_norm.weight"] = vec(k, 1.0)
      t[p + "self_attn.k_norm.weight"] = vec(k, 1.0)
    t[p + "post_attention_layernorm.weight"] = vec(d, 1.0)
    for proj, (out, inp) in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
      t[p + f"mlp.{proj}.weight"] = lin(out, inp)
      if mlp_bias:
        t[p + f"mlp.{proj}.bias"] = vec(out)
  t["model.norm.weight"] = vec(d, 1.0)
  if not config.get("tie_word_embeddings", False):
    t["lm_head.weight"] = lin(v, d)
  return t


def write_tensors(directory: str | Path, tensors: dict[str, np.ndarray], *, sharded: bool = False,
                  dtype: str = "float32") -> None:
  """Writes model.safetensors, or three shards + model.safetensors.index.json (HF names)."""
  directory = Path(directory)
  np_dtype = _NP_DTYPES[dtype]
  tensors = {n: np.ascontiguousarray(a.astype(np_dtype)) for n, a in tensors.items()}
  meta = {"format": "pt"}  # as transformers writes it
  if not sharded:
    save_file(tensors, str(directory / "model.safetensors"), metadata=meta)
    return
  names = list(tensors)
  # Shard 1: embedding and layer 0; shard 2: the other layers; shard 3: final norm and head.
  groups: list[list[str]] = [[], [], []]
  for n in names:
    if n == "model.embed_tokens.weight" or n.startswith("model.layers.0."):
      groups[0].append(n)
    elif n.startswith("model.layers."):
      groups[1].append(n)
    else:
      groups[2].append(n)
  weight_map, total = {}, 0
  for j, group in enumerate(groups):
    shard = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
    save_file({n: tensors[n] for n in group}, str(directory / shard), metadata=meta)
    for n in group:
      weight_map[n] = shard
      total += tensors[n].nbytes
  index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tiny_checkpoint(directory: str | Path, arch: str = "llama", *, tied: bool = False,
                          llama3_rope: bool = False, sharded: bool = False, dtype: str = "float32",
                          seed: int = 0, bias: bool = False, rope_format: str = "legacy") -> dict[str, Any]:
  """Writes config.json and random-weight safetensors of a tiny HF model into `directory`.

  Sizes: vocab 128, hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads (head_dim 16;
  Qwen3: head_dim 32). See `tiny_config` for the options.

  Args:
    directory: where to write (created if needed).
    arch: "llama", "qwen2" or "qwen3".
    tied: tie_word_embeddings (no lm_head.weight is written).
    llama3_rope: Llama-3 rope scaling that matters at this size.
    sharded: three shards and model.safetensors.index.json instead of model.safetensors.
    dtype: tensor dtype on disk: "float32", "bfloat16" or "float16" (the values are the
      fp32 draws rounded to it).
    seed: seed of the random weights.
    bias: Llama only: attention_bias and mlp_bias.
    rope_format: "legacy" or "parameters" (see `tiny_config`).

  Returns:
    The config dict written to config.json.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  config = tiny_config(arch, tied=tied, llama3_rope=llama3_rope, bias=bias, rope_format=rope_format,
                       dtype=dtype)
  (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  write_tensors(directory, tiny_tensors(config, seed), sharded=sharded, dtype=dtype)
  return config


def forward_logits(units: dict[str, Any], tokens: np.ndarray, attn_mask: np.ndarray) -> np.ndarray:
  """aftune logits [B, T, V] (fp32 numpy): embed -> layers -> final_norm -> lm_head."""
  import jax.numpy as jnp

  from aftune.model.llama import positions_from_mask

  mask = jnp.asarray(attn_mask, jnp.int32)
  ctx = {"positions": positions_from_mask(mask), "attn_mask": mask, "key": None}
  x = jnp.asarray(tokens, jnp.int32)
  for unit in units.values():  # ordered: embed, layer_0.., final_norm, lm_head
    x = unit(x, ctx)
  return np.asarray(x, np.float32)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_hf():
  """This module: write_tiny_checkpoint, tiny_config, tiny_tensors, write_tensors,
  forward_logits and the sizes (VOCAB, HIDDEN, LAYERS, ...)."""
  return sys.modules[__name__]


@pytest.fixture(scope="module")
def hf():
  """(torch, transformers), imported once per module; skips when not installed."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  return torch, transformers
