"""Llama-family decoder (Llama 2/3, Qwen2, Qwen3) in Flax NNX, as an ordered list of units.

This module is a model family (`aftune/model/family.py`): the contract's names are at the
end ("The family contract").

The model is not one monolithic module: it is the list of units the audit grid is
built on (embedding, decoder layer 0..n-1, final norm, LM head). Each unit is an
`nnx.Module` whose `__call__(x, ctx)` maps the boundary tensor entering it to the one
leaving it, so that any run of consecutive units can be jitted on its own.

Parameters are fp32 (`param_dtype`); `dtype` is the compute dtype (fp32 or bf16).
Kernels are stored [in, out] (Hugging Face stores [out, in]; the importer transposes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aftune.data import order

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency scaling ("rope_type": "llama3" in config.json)."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q_proj", "v_proj")  # projection names, as in HF


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Llama-family decoder. Hashable: it is static under jit."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # None: hidden_size // num_heads
  arch: str = "llama"  # "llama" | "qwen2" | "qwen3": only used in messages and the importer
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2; Llama's attention_bias sets this and o_bias
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  dropout_rate: float = 0.0  # residual dropout, keyed by the committed step key
  lora: LoRAConfig | None = None

  @property
  def hd(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def unit_names(self) -> tuple[str, ...]:
    return ("embed", *(f"layer_{i}" for i in range(self.num_layers)), "final_norm", "lm_head")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    d = dict(d)
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if d.get("lora") is not None:
      lora = dict(d["lora"])
      lora["targets"] = tuple(lora["targets"])
      d["lora"] = LoRAConfig(**lora)
    return cls(**d)



class TiedEmbedding(nnx.Variable):
  """The embedding matrix as read by a tied LM head: never trainable on its own."""


# ---------------------------------------------------------------------------------
# Pure helpers shared by training and (later) cached decoding.


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [hd/2] in float32, with Llama-3 scaling if configured."""
  hd = cfg.hd
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
  inv_freq = inv_freq.astype(np.float32)
  rs = cfg.rope_scaling
  if rs is None:
    return inv_freq
  low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
  high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
  smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
      rs.high_freq_factor - rs.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BxTxHxK: Array, positions_BxT: Array, inv_freq) -> Array:
  """Rotary embedding in the Hugging Face (rotate-half, non-interleaved) convention."""
  freqs_BxTxK2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(np.asarray(inv_freq, np.float32))
  emb_BxTxK = jnp.concatenate([freqs_BxTxK2, freqs_BxTxK2], axis=-1)
  cos = jnp.cos(emb_BxTxK).astype(x_BxTxHxK.dtype)[:, :, None, :]
  sin = jnp.sin(emb_BxTxK).astype(x_BxTxHxK.dtype)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxHxK, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BxTxHxK * cos + rotated * sin


def dropout(x: Array, rate: float, key: Array | None) -> Array:
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def attention(q_BxTxHxK: Array, k_BxSxGxK: Array, v_BxSxGxK: Array, mask_BxTxS: Array) -> Array:
  """Grouped-query attention, softmax in fp32 (as HF eager attention)."""
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, kd)
  logits = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK) * (kd ** -0.5)
  logits = logits.astype(jnp.float32)
  logits = jnp.where(mask_BxTxS[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxGxK.dtype)
  out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxSxGxK)
  return out_BxTxGxRxK.reshape(b, t, h, kd)


def causal_mask(attn_mask_BxT: Array) -> Array:
  """[B, T, T] mask: causal and only real (non-pad) keys."""
  t = attn_mask_BxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((t, t), dtype=bool))
  return causal_TxT[None] & attn_mask_BxT.astype(bool)[:, None, :]


# ---------------------------------------------------------------------------------
# Modules.


def _normal(key, shape, std=0.02):
  return std * jax.random.normal(key, shape, jnp.float32)


class Linear(nnx.Module):
  """y = x W (+ b) (+ scale * x A B for LoRA); W is [in, out]."""

  def __init__(self, d_in: int, d_out: int, *, bias: bool, cfg: ModelConfig, rngs: nnx.Rngs,
               lora: bool = False):
    self.compute_dtype = jnp.dtype(cfg.dtype)
    self.kernel = nnx.Param(_normal(rngs.params(), (d_in, d_out)).astype(cfg.param_dtype))
    self.bias = nnx.Param(jnp.zeros((d_out,), cfg.param_dtype)) if bias else None
    if lora:
      r = cfg.lora.rank
      bound = 1.0 / math.sqrt(d_in)  # PEFT's kaiming_uniform(a=sqrt(5)) on A
      self.lora_a = nnx.LoRAParam(
          jax.random.uniform(rngs.lora(), (d_in, r), jnp.float32, -bound, bound).astype(cfg.param_dtype))
      self.lora_b = nnx.LoRAParam(jnp.zeros((r, d_out), cfg.param_dtype))
      self.lora_scale = cfg.lora.alpha / r
    else:
      self.lora_a = None

  def __call__(self, x: Array) -> Array:
    dt = self.compute_dtype
    x = x.astype(dt)
    y = x @ self.kernel[...].astype(dt)
    if self.bias is not None:
      y = y + self.bias[...].astype(dt)
    if self.lora_a is not None:
      y = y + ((x @ self.lora_a[...].astype(dt)) @ self.lora_b[...].astype(dt)) * jnp.asarray(
          self.lora_scale, dt)
    return y


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float, param_dtype: str):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: Array) -> Array:
    # As HF: normalise in fp32, cast back, then multiply by the weight.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def _lora_for(cfg: ModelConfig, name: str) -> bool:
  return cfg.lora is not None and name in cfg.lora.targets


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, g, k = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.hd
    mk = lambda name, i, o, bias: Linear(i, o, bias=bias, cfg=cfg, rngs=rngs, lora=_lora_for(cfg, name))
    self.q_proj = mk("q_proj", d, h * k, cfg.qkv_bias)
    self.k_proj = mk("k_proj", d, g * k, cfg.qkv_bias)
    self.v_proj = mk("v_proj", d, g * k, cfg.qkv_bias)
    self.o_proj = mk("o_proj", h * k, d, cfg.o_bias)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(k, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
      self.k_norm = RMSNorm(k, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    else:
      self.q_norm = self.k_norm = None
    self.num_heads, self.num_kv_heads, self.head_dim = h, g, k
    # A tuple, not an array: NNX would otherwise treat it as state.
    self.inv_freq = tuple(float(f) for f in rope_inv_freq(cfg))

  def qkv(self, x_BxTxD: Array, positions_BxT: Array) -> tuple[Array, Array, Array]:
    """Projected, normed and rotated q [B,T,H,K], k and v [B,T,G,K]."""
    b, t, _ = x_BxTxD.shape
    q = self.q_proj(x_BxTxD).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x_BxTxD).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x_BxTxD).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return apply_rope(q, positions_BxT, self.inv_freq), apply_rope(k, positions_BxT, self.inv_freq), v

  def __call__(self, x_BxTxD: Array, positions_BxT: Array, mask_BxTxS: Array) -> Array:
    q, k, v = self.qkv(x_BxTxD, positions_BxT)
    out_BxTxHxK = attention(q, k, v, mask_BxTxS)
    b, t = x_BxTxD.shape[:2]
    return self.o_proj(out_BxTxHxK.reshape(b, t, -1))

  # Cached decoding (aftune.generate). The training path above is left untouched; these
  # methods reuse `qkv` and `attention`, so the math per position is the same.

  def prefill(self, x_BxTxD: Array, positions_BxT: Array, mask_BxTxT: Array,
              max_len: int) -> tuple[Array, dict[str, Array]]:
    """Attention over a (left-padded) prompt, plus its KV cache.

    Returns:
      (output [B,T,D], {"k", "v": [B, max_len, G, K]}) where slots 0..T-1 hold the
      prompt's rotated keys and values and slots T.. are zero (compute dtype).
    """
    q, k, v = self.qkv(x_BxTxD, positions_BxT)
    out_BxTxHxK = attention(q, k, v, mask_BxTxT)
    b, t = x_BxTxD.shape[:2]
    if max_len < t:
      raise ValueError(f"KV cache length {max_len} is shorter than the prompt ({t})")
    pad = ((0, 0), (0, max_len - t), (0, 0), (0, 0))
    cache = {"k": jnp.pad(k, pad), "v": jnp.pad(v, pad)}
    return self.o_proj(out_BxTxHxK.reshape(b, t, -1)), cache

  def decode(self, x_Bx1xD: Array, positions_Bx1: Array, cache: Mapping[str, Array], slot: Array,
             kv_mask_BxS: Array) -> tuple[Array, dict[str, Array]]:
    """One new position per sequence: writes its k/v at cache slot `slot`, then
    attends to every slot that `kv_mask_BxS` marks valid (which must include `slot`)."""
    q, k, v = self.qkv(x_Bx1xD, positions_Bx1)
    ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), slot, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), slot, axis=1)
    out_Bx1xHxK = attention(q, ck, cv, kv_mask_BxS.astype(bool)[:, None, :])
    b = x_Bx1xD.shape[0]
    return self.o_proj(out_Bx1xHxK.reshape(b, 1, -1)), {"k": ck, "v": cv}


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    mk = lambda name, i, o: Linear(i, o, bias=cfg.mlp_bias, cfg=cfg, rngs=rngs, lora=_lora_for(cfg, name))
    self.gate_proj = mk("gate_proj", d, f)
    self.up_proj = mk("up_proj", d, f)
    self.down_proj = mk("down_proj", f, d)

  def __call__(self, x: Array) -> Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------
# Units. Each maps (boundary tensor in, ctx) -> boundary tensor out, where ctx holds
# `positions` [B,T], `attn_mask` [B,T] and optionally a dropout `key` for this unit.


class Embed(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.embedding = nnx.Param(_normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size)).astype(
        cfg.param_dtype))
    self.compute_dtype = jnp.dtype(cfg.dtype)

  def __call__(self, tokens_BxT: Array, ctx: Mapping[str, Any]) -> Array:
    return jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(self.compute_dtype)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                            param_dtype=cfg.param_dtype)
    self.mlp = MLP(cfg, rngs)
    self.dropout_rate = cfg.dropout_rate

  def __call__(self, x_BxTxD: Array, ctx: Mapping[str, Any]) -> Array:
    key = ctx.get("key")
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    h = self.self_attn(self.input_layernorm(x_BxTxD), ctx["positions"], causal_mask(ctx["attn_mask"]))
    x_BxTxD = x_BxTxD + dropout(h, self.dropout_rate, k1)
    h = self.mlp(self.post_attention_layernorm(x_BxTxD))
    return x_BxTxD + dropout(h, self.dropout_rate, k2)

  # Cached decoding (inference: no dropout). Same residual structure as `__call__`.

  def prefill(self, x_BxTxD: Array, ctx: Mapping[str, Any],
              max_len: int) -> tuple[Array, dict[str, Array]]:
    """The layer over a padded prompt (ctx: positions, attn_mask [B,T]) and its KV cache."""
    h, cache = self.self_attn.prefill(self.input_layernorm(x_BxTxD), ctx["positions"],
                                      causal_mask(ctx["attn_mask"]), max_len)
    x_BxTxD = x_BxTxD + h
    h = self.mlp(self.post_attention_layernorm(x_BxTxD))
    return x_BxTxD + h, cache

  def decode(self, x_Bx1xD: Array, ctx: Mapping[str, Any],
             cache: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
    """One new position per sequence (ctx: positions [B,1], slot [], kv_mask [B,S])."""
    h, cache = self.self_attn.decode(self.input_layernorm(x_Bx1xD), ctx["positions"], cache,
                                     ctx["slot"], ctx["kv_mask"])
    x_Bx1xD = x_Bx1xD + h
    h = self.mlp(self.post_attention_layernorm(x_Bx1xD))
    return x_Bx1xD + h, cache


class FinalNorm(nnx.Module):

  def __init__(self, cfg: ModelConfig):
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)

  def __call__(self, x_BxTxD: Array, ctx: Mapping[str, Any]) -> Array:
    return self.norm(x_BxTxD)


class LMHead(nnx.Module):
  """Logits [B,T,V] in fp32. Tied heads read a frozen copy of the embedding matrix."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, tied_embedding: Array | None = None):
    self.compute_dtype = jnp.dtype(cfg.dtype)
    if cfg.tie_embeddings:
      self.kernel = None
      self.tied_embedding = TiedEmbedding(tied_embedding)
    else:
      self.kernel = nnx.Param(_normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size)).astype(
          cfg.param_dtype))
      self.tied_embedding = None

  def __call__(self, x_BxTxD: Array, ctx: Mapping[str, Any]) -> Array:
    dt = self.compute_dtype
    if self.kernel is not None:
      w_DxV = self.kernel[...].astype(dt)
    else:
      w_DxV = self.tied_embedding[...].astype(dt).T
    return (x_BxTxD.astype(dt) @ w_DxV).astype(jnp.float32)


def build_unit(cfg: ModelConfig, name: str, rngs: nnx.Rngs,
               tied_embedding: Array | None = None) -> nnx.Module:
  """One unit by name ("embed", "layer_<i>", "final_norm", "lm_head")."""
  if name == "embed":
    return Embed(cfg, rngs)
  if name.startswith("layer_"):
    return DecoderLayer(cfg, rngs)
  if name == "final_norm":
    return FinalNorm(cfg)
  if name == "lm_head":
    if cfg.tie_embeddings and tied_embedding is None:
      tied_embedding = jnp.zeros((cfg.vocab_size, cfg.hidden_size), cfg.param_dtype)
    return LMHead(cfg, rngs, tied_embedding=tied_embedding)
  raise ValueError(f"unknown unit {name!r}")


def _rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(params=seed, lora=jax.random.fold_in(jax.random.key(seed), 1))


def build_units(cfg: ModelConfig, seed: int) -> dict[str, nnx.Module]:
  """Randomly initialised units, in order. LoRA A matrices draw from their own stream.

  Args:
    cfg: the architecture.
    seed: initialisation seed (the resulting parameters are committed by hash).

  Returns:
    An ordered dict unit name -> module.
  """
  rngs = _rngs(seed)
  units: dict[str, nnx.Module] = {}
  for name in cfg.unit_names:
    tied = units["embed"].embedding[...] if name == "lm_head" and cfg.tie_embeddings else None
    units[name] = build_unit(cfg, name, rngs, tied_embedding=tied)
  return units


def abstract_unit(cfg: ModelConfig, name: str) -> nnx.Module:
  """A unit's structure with shape-only parameters: nothing is allocated."""
  return nnx.eval_shape(lambda: build_unit(cfg, name, _rngs(0)))


def masked_cross_entropy(logits_BxTxV: Array, targets_BxT: Array, loss_mask_BxT: Array) -> Array:
  """Mean next-token cross-entropy over the tokens the mask keeps (fp32)."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  nll_BxT = -jnp.take_along_axis(logp, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = loss_mask_BxT.astype(jnp.float32)
  return jnp.sum(nll_BxT * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ---------------------------------------------------------------------------------
# The family contract (aftune/model/family.py).

NAME = "llama"
ARCHS = ("llama", "qwen2", "qwen3")
MODALITY = "text"
INPUT_KEY = "tokens"  # block 0 reads token ids [B,T]
BATCH_KEYS = order.BATCH_KEYS
# Tensor parallelism (train/mesh.py; a mesh with a "tensor" axis): parameter path pattern ->
# the axis split over "tensor". Column-parallel q/k/v and gate/up split their outputs (and a
# LoRA adapter's lora_b, its bias), row-parallel o/down their inputs (and lora_a): each
# device holds whole attention heads and MLP columns, and XLA adds one reduction per pair.
_COLUMN = r"(self_attn/(q_proj|k_proj|v_proj)|mlp/(gate_proj|up_proj))"
_ROW = r"(self_attn/o_proj|mlp/down_proj)"
TENSOR_PARALLEL = (
    (_COLUMN + r"/(kernel|lora_b)$", 1), (_COLUMN + r"/bias$", 0),
    (_ROW + r"/(kernel|lora_a)$", 0),
)


def batch_shapes(cfg: ModelConfig, batch_size: int, hp: Mapping[str, Any]) -> dict[str, Any]:
  """field -> (dtype, [B, T]) of a training batch (T: the job spec's max_len)."""
  del cfg
  return order.batch_shapes(batch_size, int(hp["max_len"]))


def config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
  return ModelConfig.from_dict(d)


def _lora_from_sheet(sheet: Any) -> LoRAConfig | None:
  if not sheet.lora.enabled:
    return None
  return LoRAConfig(rank=int(sheet.lora.rank), alpha=float(sheet.lora.alpha),
                    targets=tuple(sheet.lora.targets))


def config_from_sheet(sheet: Any, vocab_size: int) -> ModelConfig:
  """A random-init decoder from a `configs/finetune.py` run sheet."""
  m = sheet.model
  arch = m.arch
  return ModelConfig(
      vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
      head_dim=m.head_dim or None, arch=arch, rope_theta=m.rope_theta,
      tie_embeddings=m.tie_embeddings, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
      dtype=m.dtype, dropout_rate=m.dropout_rate, lora=_lora_from_sheet(sheet))


def load_pretrained(path: str, sheet: Any) -> tuple[ModelConfig, dict[str, nnx.Module]]:
  """A local Hugging Face Llama / Qwen2 / Qwen3 checkpoint (`hf_llama.load_hf_model`)."""
  from aftune.model import hf_llama  # pylint: disable=g-import-not-at-top
  return hf_llama.load_hf_model(
      path, dtype=sheet.model.dtype, lora=_lora_from_sheet(sheet),
      dropout_rate=sheet.model.dropout_rate, untie_embeddings=sheet.model.untie_embeddings,
      seed=sheet.seed)


def unit_names(cfg: ModelConfig) -> tuple[str, ...]:
  return cfg.unit_names


def trainable_filter(cfg: ModelConfig) -> Any:
  """LoRA: only adapters train. Full fine-tuning: every Param (never a tied copy)."""
  return nnx.LoRAParam if cfg.lora is not None else nnx.Param


def check_trainable(cfg: ModelConfig) -> None:
  if cfg.tie_embeddings and cfg.lora is None:
    from aftune import errors  # pylint: disable=g-import-not-at-top
    raise errors.ConfigError(
        "full fine-tuning with tied embeddings would train one matrix from two layer blocks; "
        "set model.tie_embeddings=False (the importer then copies the embedding into lm_head) "
        "or use LoRA")


def positions_from_mask(attn_mask_BxT: Array) -> Array:
  """Position ids that skip padding (right padding: 0..T-1; left padding also works)."""
  return jnp.maximum(jnp.cumsum(attn_mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def context(batch: Mapping[str, Array]) -> dict[str, Array]:
  """What every unit sees of the batch: RoPE positions and the padding mask [B,T]."""
  return {"positions": positions_from_mask(batch["attn_mask"]), "attn_mask": batch["attn_mask"]}


def loss(logits_BxTxV: Array, batch: Mapping[str, Array]) -> Array:
  return masked_cross_entropy(logits_BxTxV, batch["targets"], batch["loss_mask"])


def prefill_unit(name: str, unit: nnx.Module, x: Array, ctx: Mapping[str, Any],
                 max_len: int) -> tuple[Array, dict[str, Array] | None]:
  """Generation step 0 over the left-padded prompt: decoder layers return their KV cache;
  only the last prompt position goes on from the final norm; the head returns [B,V]."""
  if isinstance(unit, DecoderLayer):
    return unit.prefill(x, ctx, max_len)
  if isinstance(unit, FinalNorm):
    x = x[:, -1:]
  x = unit(x, ctx)
  return (x[:, 0] if isinstance(unit, LMHead) else x), None


def decode_unit(name: str, unit: nnx.Module, x: Array, ctx: Mapping[str, Any],
                cache: Mapping[str, Array] | None) -> tuple[Array, dict[str, Array] | None]:
  """One new position per sequence; the head returns logits [B,V]."""
  if isinstance(unit, DecoderLayer):
    return unit.decode(x, ctx, cache)
  x = unit(x, ctx)
  return (x[:, 0] if isinstance(unit, LMHead) else x), None


def merge_lora(units: dict[str, nnx.Module]) -> dict[str, nnx.Module]:
  """Folds every adapter into its kernel, in place: kernel + lora_scale * (A @ B), in fp32 at
  HIGHEST precision, stored in the kernel's dtype; no adapters are left."""
  for unit in units.values():
    for _, m in nnx.iter_modules(unit):
      if isinstance(m, Linear) and m.lora_a is not None:
        w = m.kernel[...]
        delta = jnp.matmul(m.lora_a[...].astype(jnp.float32), m.lora_b[...].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST) * jnp.float32(m.lora_scale)
        m.kernel.set_value((w.astype(jnp.float32) + delta).astype(w.dtype))
        del m.lora_a, m.lora_b, m.lora_scale
        m.lora_a = None  # re-added after `del`: a static attribute, as in a LoRA-free Linear
  return units
