"""Vision Transformers (ViT, DINOv2) in Flax NNX, as an ordered list of units.

A model family (`aftune/model/family.py`): the contract's names are at the end.

Units: `embed` (the stored images -> crop/flip/normalise -> patches -> CLS (+ registers)
+ position embeddings), `layer_0..n-1` (pre-norm encoder layers), `final_norm`, `head`
(logits [B, C] in fp32). The ViT head reads the CLS token; the DINOv2 head reads the CLS
token concatenated with the mean patch token (Hugging Face's `Dinov2ForImageClassification`).

DINOv2 adds layer scale, optional register tokens and the SwiGLU MLP (giant). When the
image size gives another patch grid than the checkpoint's position embeddings, the grid is
resampled in every forward pass by torch's bicubic rule (antialiased for the registers
variant), as the HF models do (so the checkpoint's parameter is what trains, and logits
match HF at any image size).

Parameters are fp32; `dtype` is the compute dtype. Patches are NHWC; the patch kernel is
[p, p, 3, D] (HF: [D, 3, p, p]).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from aftune import errors
from aftune.model import vision
from aftune.model.vision import Dense
from aftune.model.vision import LayerNorm

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of a ViT / DINOv2 classifier. Hashable: static under jit."""
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int  # the MLP's hidden width (SwiGLU: of each of gate and up)
  patch_size: int
  num_classes: int
  image: vision.ImageInput
  pos_grid: int  # side of the position-embedding grid (the checkpoint's image_size // patch)
  arch: str = "vit"  # "vit" | "dinov2"
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-12
  layerscale_init: float | None = None  # DINOv2: layer scale (initial value); None: none
  swiglu: bool = False  # DINOv2-giant's SwiGLU MLP
  num_register_tokens: int = 0
  head: str = "cls"  # "cls" (ViT) | "cls_mean" (DINOv2: CLS ++ mean patch token)
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def grid(self) -> int:
    return self.image.image_size // self.patch_size

  @property
  def unit_names(self) -> tuple[str, ...]:
    return ("embed", *(f"layer_{i}" for i in range(self.num_layers)), "final_norm", "head")

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["image"] = self.image.to_dict()
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ViTConfig":
    d = dict(d)
    d["image"] = vision.ImageInput.from_dict(d["image"])
    cfg = cls(**d)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    self.image.validate()
    vision.check_dtype(self.dtype)
    if self.arch not in ARCHS:
      raise errors.ConfigError(f"ViT arch must be one of {ARCHS}, got {self.arch!r}")
    if self.image.image_size % self.patch_size:
      raise errors.ConfigError(
          f"image_size {self.image.image_size} is not a multiple of the patch size "
          f"{self.patch_size}: the image cannot be cut into patches")
    if self.hidden_size % self.num_heads:
      raise errors.ConfigError(f"hidden_size {self.hidden_size} is not a multiple of "
                               f"num_heads {self.num_heads}")
    if self.num_classes < 1:
      raise errors.ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
    if self.head not in ("cls", "cls_mean"):
      raise errors.ConfigError(f"head must be cls or cls_mean, got {self.head!r}")


# ---------------------------------------------------------------------------------
# Modules.


class Embeddings(nnx.Module):

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
    d, p = cfg.hidden_size, cfg.patch_size
    self.cfg = cfg
    self.patch_kernel = nnx.Param(vision.normal(rngs.params(), (p, p, 3, d)).astype(cfg.param_dtype))
    self.patch_bias = nnx.Param(jnp.zeros((d,), cfg.param_dtype))
    self.cls_token = nnx.Param(vision.normal(rngs.params(), (d,)).astype(cfg.param_dtype))
    self.registers = (nnx.Param(jnp.zeros((cfg.num_register_tokens, d), cfg.param_dtype))
                      if cfg.num_register_tokens else None)
    self.position = nnx.Param(vision.normal(rngs.params(), (1 + cfg.pos_grid ** 2, d)).astype(
        cfg.param_dtype))

  def embed_pixels(self, pixels_BxHxWx3: Array) -> Array:
    """Normalised pixels -> tokens [B, 1 + R + N, D] (CLS, registers, patches)."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, h, w, _ = pixels_BxHxWx3.shape
    p = cfg.patch_size
    hn, wn = h // p, w // p
    x = pixels_BxHxWx3.astype(dt).reshape(b, hn, p, wn, p, 3).transpose(0, 1, 3, 2, 4, 5)
    patches_BxNxK = x.reshape(b, hn * wn, p * p * 3)
    k_KxD = self.patch_kernel[...].astype(dt).reshape(p * p * 3, cfg.hidden_size)
    x_BxNxD = patches_BxNxK @ k_KxD + self.patch_bias[...].astype(dt)
    pos = self.position[...]
    # HF's DINOv2 with registers resamples with antialiasing; the others without.
    pos_patch = vision.resample_grid(pos[1:].reshape(cfg.pos_grid, cfg.pos_grid, -1), hn,
                                     antialias=cfg.num_register_tokens > 0)
    pos_patch_NxD = pos_patch.reshape(hn * wn, -1).astype(pos.dtype)
    cls_1xD = (self.cls_token[...] + pos[0]).astype(dt)[None]
    x_BxNxD = x_BxNxD + pos_patch_NxD.astype(dt)
    parts = [jnp.broadcast_to(cls_1xD[None], (b, 1, cfg.hidden_size))]
    if self.registers is not None:  # registers get no position embedding (as HF)
      parts.append(jnp.broadcast_to(self.registers[...].astype(dt)[None], (b, cfg.num_register_tokens,
                                                                          cfg.hidden_size)))
    return jnp.concatenate(parts + [x_BxNxD], axis=1)

  def __call__(self, images_BxSxSx3: Array, ctx: Mapping[str, Any]) -> Array:
    return self.embed_pixels(vision.model_input(self.cfg.image, images_BxSxSx3, ctx))


class SelfAttention(nnx.Module):

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
    d = cfg.hidden_size
    mk = lambda: Dense(d, d, bias=cfg.qkv_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.query, self.key, self.value = mk(), mk(), mk()
    self.out = Dense(d, d, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.num_heads = cfg.num_heads

  def __call__(self, x_BxTxD: Array) -> Array:
    b, t, d = x_BxTxD.shape
    h = self.num_heads
    q, k, v = (m(x_BxTxD).reshape(b, t, h, d // h) for m in (self.query, self.key, self.value))
    logits_BxHxTxT = jnp.einsum("bthk,bshk->bhts", q, k) * ((d // h) ** -0.5)
    probs = jax.nn.softmax(logits_BxHxTxT.astype(jnp.float32), axis=-1).astype(v.dtype)
    out_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs, v)
    return self.out(out_BxTxHxK.reshape(b, t, d))


class MLP(nnx.Module):
  """fc1 -> exact GELU -> fc2 (ViT, DINOv2), or SwiGLU (DINOv2-giant)."""

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    mk = lambda i, o: Dense(i, o, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.swiglu = cfg.swiglu
    if cfg.swiglu:
      self.gate_proj, self.up_proj, self.down_proj = mk(d, f), mk(d, f), mk(f, d)
    else:
      self.fc1, self.fc2 = mk(d, f), mk(f, d)

  def __call__(self, x: Array) -> Array:
    if self.swiglu:
      return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class EncoderLayer(nnx.Module):

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
    norm = lambda: LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=cfg.param_dtype)
    self.norm1, self.attention, self.norm2, self.mlp = norm(), SelfAttention(cfg, rngs), norm(), MLP(cfg, rngs)
    if cfg.layerscale_init is not None:
      init = jnp.full((cfg.hidden_size,), cfg.layerscale_init, cfg.param_dtype)
      self.layer_scale1, self.layer_scale2 = nnx.Param(init), nnx.Param(init)
    else:
      self.layer_scale1 = self.layer_scale2 = None

  def _scale(self, h: Array, scale: nnx.Param | None) -> Array:
    return h if scale is None else h * scale[...].astype(h.dtype)

  def __call__(self, x_BxTxD: Array, ctx: Mapping[str, Any]) -> Array:
    x_BxTxD = x_BxTxD + self._scale(self.attention(self.norm1(x_BxTxD)), self.layer_scale1)
    return x_BxTxD + self._scale(self.mlp(self.norm2(x_BxTxD)), self.layer_scale2)


class FinalNorm(nnx.Module):

  def __init__(self, cfg: ViTConfig):
    self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=cfg.param_dtype)

  def __call__(self, x_BxTxD: Array, ctx: Mapping[str, Any]) -> Array:
    return self.norm(x_BxTxD)


class Head(nnx.Module):

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
    d_in = cfg.hidden_size * (2 if cfg.head == "cls_mean" else 1)
    self.classifier = vision.Classifier(d_in, cfg.num_classes, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype, rngs=rngs)
    self.mode, self.first_patch = cfg.head, 1 + cfg.num_register_tokens

  def __call__(self, x_BxTxD: Array, ctx: Mapping[str, Any]) -> Array:
    feats = x_BxTxD[:, 0]
    if self.mode == "cls_mean":
      patch_mean = jnp.mean(x_BxTxD[:, self.first_patch:].astype(jnp.float32), axis=1)
      feats = jnp.concatenate([feats, patch_mean.astype(feats.dtype)], axis=-1)
    return self.classifier(feats)


def build_unit(cfg: ViTConfig, name: str, rngs: nnx.Rngs) -> nnx.Module:
  if name == "embed":
    return Embeddings(cfg, rngs)
  if name.startswith("layer_"):
    return EncoderLayer(cfg, rngs)
  if name == "final_norm":
    return FinalNorm(cfg)
  if name == "head":
    return Head(cfg, rngs)
  raise ValueError(f"unknown unit {name!r}")


# ---------------------------------------------------------------------------------
# The family contract (aftune/model/family.py).

NAME = "vit"
ARCHS = ("vit", "dinov2")
MODALITY = vision.MODALITY
INPUT_KEY = vision.INPUT_KEY
BATCH_KEYS = vision.BATCH_KEYS
context = vision.context
inference_context = vision.inference_context
loss = vision.loss
batch_shapes = vision.batch_shapes
prefill_unit = vision.prefill_unit
decode_unit = vision.decode_unit
merge_lora = vision.merge_lora


def config_from_dict(d: Mapping[str, Any]) -> ViTConfig:
  return ViTConfig.from_dict(d)


def config_from_sheet(sheet: Any, vocab_size: int | None = None) -> ViTConfig:
  """A random-init ViT / DINOv2 from a `configs/vision.py` run sheet."""
  del vocab_size
  m = sheet.model
  image = vision.image_input_from_sheet(sheet)
  dinov2 = m.arch == "dinov2"
  cfg = ViTConfig(
      hidden_size=int(m.hidden_size), num_layers=int(m.num_layers), num_heads=int(m.num_heads),
      intermediate_size=int(m.intermediate_size), patch_size=int(m.patch_size),
      num_classes=int(m.num_classes), image=image, pos_grid=image.image_size // int(m.patch_size),
      arch=m.arch, layer_norm_eps=1e-6 if dinov2 else 1e-12,
      layerscale_init=1.0 if dinov2 else None, swiglu=bool(m.get("swiglu", False)),
      num_register_tokens=int(m.get("num_register_tokens", 0)),
      head="cls_mean" if dinov2 else "cls", dtype=m.dtype)
  cfg.validate()
  return cfg


load_pretrained = vision.load_pretrained
unit_names = vision.unit_names
check_trainable = vision.check_trainable


def build_units(cfg: ViTConfig, seed: int) -> dict[str, nnx.Module]:
  return vision.build_units(build_unit, cfg, seed)


def abstract_unit(cfg: ViTConfig, name: str) -> nnx.Module:
  return vision.abstract_unit(build_unit, cfg, name)


def trainable_filter(cfg: ViTConfig) -> Any:
  return nnx.Param

