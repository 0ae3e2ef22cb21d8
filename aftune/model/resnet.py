"""ResNet (bottleneck or basic blocks, BatchNorm) in Flax NNX, as an ordered list of units.

A model family (`aftune/model/family.py`): the contract's names are at the end.

Units: `embed` (the stored images -> crop/flip/normalise -> 7x7/2 conv, BN, ReLU, 3x3/2
max pool), one unit per residual layer `stage<i>_layer<j>`, `pool` (global average ->
[B, C]) and `head` (logits [B, classes] in fp32), as Hugging Face's
`ResNetForImageClassification`.

BatchNorm and the audit. The running mean and variance are `nnx.BatchStat` variables and
train together with the parameters: `trainable_filter` selects Param and BatchStat, so the
statistics live in each layer block's parameter tree. A training forward (`ctx["train"]`)
normalises with the batch's statistics and returns the updated running ones through
`train.step` (`block_forward` collects every unit's BatchStat after its call); the block's
update writes them over the optimizer's result (their gradients are exactly zero). So the
statistics are committed with the parameters at every state step, replayed bitwise, in the
final model hash, and a changed statistic fails the cell like an edited weight. Inference
normalises with the running statistics. The update follows torch: momentum 0.1, the
running variance from the unbiased batch variance.
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

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """Architecture of a ResNet classifier. Hashable: static under jit."""
  embedding_size: int
  hidden_sizes: tuple[int, ...]
  depths: tuple[int, ...]
  num_classes: int
  image: vision.ImageInput
  layer_type: str = "bottleneck"  # bottleneck | basic
  downsample_in_first_stage: bool = False
  downsample_in_bottleneck: bool = False
  bn_eps: float = 1e-5
  bn_momentum: float = 0.1
  arch: str = "resnet"
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def unit_names(self) -> tuple[str, ...]:
    layers = tuple(f"stage{i}_layer{j}" for i, d in enumerate(self.depths) for j in range(d))
    return ("embed", *layers, "pool", "head")

  def layer_geometry(self, name: str) -> tuple[int, int, int]:
    """(in channels, out channels, stride) of a residual layer unit."""
    i, j = (int(s) for s in name.removeprefix("stage").split("_layer"))
    c_out = self.hidden_sizes[i]
    if j > 0:
      return c_out, c_out, 1
    c_in = self.embedding_size if i == 0 else self.hidden_sizes[i - 1]
    stride = (2 if self.downsample_in_first_stage else 1) if i == 0 else 2
    return c_in, c_out, stride

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["image"] = self.image.to_dict()
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ResNetConfig":
    d = dict(d)
    d["image"] = vision.ImageInput.from_dict(d["image"])
    d["hidden_sizes"], d["depths"] = tuple(d["hidden_sizes"]), tuple(d["depths"])
    cfg = cls(**d)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    self.image.validate()
    vision.check_dtype(self.dtype)
    if len(self.hidden_sizes) != len(self.depths) or not self.depths or min(self.depths) < 1:
      raise errors.ConfigError(f"hidden_sizes {self.hidden_sizes} and depths {self.depths} must "
                               "be equally long, with every depth >= 1")
    if self.layer_type not in ("bottleneck", "basic"):
      raise errors.ConfigError(f"layer_type must be bottleneck or basic, got {self.layer_type!r}")
    if self.num_classes < 1:
      raise errors.ConfigError(f"num_classes must be >= 1, got {self.num_classes}")


# ---------------------------------------------------------------------------------
# Modules.


class Conv(nnx.Module):
  """A bias-free 2-D convolution, NHWC x HWIO, padding k // 2 (as HF's ResNetConvLayer)."""

  def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, cfg: ResNetConfig,
               rngs: nnx.Rngs):
    fan_in = c_in * kernel * kernel
    std = (2.0 / fan_in) ** 0.5  # He init (torch: kaiming_normal_, fan_out; either trains)
    self.kernel = nnx.Param(vision.normal(rngs.params(), (kernel, kernel, c_in, c_out), std).astype(
        cfg.param_dtype))
    self.stride, self.pad = stride, kernel // 2
    self.compute_dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x_BxHxWxC: Array) -> Array:
    dt = self.compute_dtype
    return jax.lax.conv_general_dilated(
        x_BxHxWxC.astype(dt), self.kernel[...].astype(dt), (self.stride, self.stride),
        ((self.pad, self.pad), (self.pad, self.pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BatchNorm(nnx.Module):
  """BatchNorm over N, H, W; statistics in fp32. Train: batch statistics, and the running
  ones updated in place (torch's rule); eval: the running statistics."""

  def __init__(self, c: int, cfg: ResNetConfig):
    self.scale = nnx.Param(jnp.ones((c,), cfg.param_dtype))
    self.bias = nnx.Param(jnp.zeros((c,), cfg.param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros((c,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((c,), jnp.float32))
    self.eps, self.momentum = cfg.bn_eps, cfg.bn_momentum

  def __call__(self, x_BxHxWxC: Array, train: bool) -> Array:
    x32 = x_BxHxWxC.astype(jnp.float32)
    if train:
      mean = jnp.mean(x32, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
      n = x32.size // x32.shape[-1]
      m = self.momentum
      self.mean.set_value((1 - m) * self.mean[...] + m * mean)
      self.var.set_value((1 - m) * self.var[...] + m * var * (n / max(n - 1, 1)))
    else:
      mean, var = self.mean[...], self.var[...]
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x_BxHxWxC.dtype)


class ConvBN(nnx.Module):

  def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, relu: bool, cfg: ResNetConfig,
               rngs: nnx.Rngs):
    self.conv = Conv(c_in, c_out, kernel, stride, cfg, rngs)
    self.norm = BatchNorm(c_out, cfg)
    self.relu = relu

  def __call__(self, x: Array, train: bool) -> Array:
    y = self.norm(self.conv(x), train)
    return jax.nn.relu(y) if self.relu else y


def max_pool_3x3_s2(x_BxHxWxC: Array) -> Array:
  """torch's MaxPool2d(3, stride=2, padding=1): padding never wins the max."""
  return jax.lax.reduce_window(x_BxHxWxC, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


class Stem(nnx.Module):

  def __init__(self, cfg: ResNetConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedder = ConvBN(3, cfg.embedding_size, 7, 2, True, cfg, rngs)

  def embed_pixels(self, pixels_BxHxWx3: Array, train: bool) -> Array:
    return max_pool_3x3_s2(self.embedder(pixels_BxHxWx3, train))

  def __call__(self, images_BxSxSx3: Array, ctx: Mapping[str, Any]) -> Array:
    pixels = vision.model_input(self.cfg.image, images_BxSxSx3, ctx)
    return self.embed_pixels(pixels, bool(ctx.get("train", False)))


class ResidualLayer(nnx.Module):
  """HF's ResNetBottleNeckLayer (1x1 reduce, 3x3, 1x1 expand) or ResNetBasicLayer."""

  def __init__(self, cfg: ResNetConfig, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs):
    if c_in != c_out or stride != 1:
      self.shortcut = ConvBN(c_in, c_out, 1, stride, False, cfg, rngs)
    else:
      self.shortcut = None
    if cfg.layer_type == "bottleneck":
      r = c_out // 4
      s1, s2 = (stride, 1) if cfg.downsample_in_bottleneck else (1, stride)
      self.layers = nnx.List([ConvBN(c_in, r, 1, s1, True, cfg, rngs), ConvBN(r, r, 3, s2, True, cfg, rngs),
                              ConvBN(r, c_out, 1, 1, False, cfg, rngs)])
    else:
      self.layers = nnx.List([ConvBN(c_in, c_out, 3, stride, True, cfg, rngs),
                              ConvBN(c_out, c_out, 3, 1, False, cfg, rngs)])

  def __call__(self, x_BxHxWxC: Array, ctx: Mapping[str, Any]) -> Array:
    train = bool(ctx.get("train", False))
    h = x_BxHxWxC
    for layer in self.layers:
      h = layer(h, train)
    residual = x_BxHxWxC if self.shortcut is None else self.shortcut(x_BxHxWxC, train)
    return jax.nn.relu(h + residual)


class Pool(nnx.Module):
  """Global average pooling: [B, H, W, C] -> [B, C] (mean in fp32)."""

  def __call__(self, x_BxHxWxC: Array, ctx: Mapping[str, Any]) -> Array:
    return jnp.mean(x_BxHxWxC.astype(jnp.float32), axis=(1, 2)).astype(x_BxHxWxC.dtype)


class Head(nnx.Module):

  def __init__(self, cfg: ResNetConfig, rngs: nnx.Rngs):
    self.classifier = vision.Classifier(cfg.hidden_sizes[-1], cfg.num_classes, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, x_BxC: Array, ctx: Mapping[str, Any]) -> Array:
    return self.classifier(x_BxC)


def build_unit(cfg: ResNetConfig, name: str, rngs: nnx.Rngs) -> nnx.Module:
  if name == "embed":
    return Stem(cfg, rngs)
  if name.startswith("stage"):
    return ResidualLayer(cfg, *cfg.layer_geometry(name), rngs)
  if name == "pool":
    return Pool()
  if name == "head":
    return Head(cfg, rngs)
  raise ValueError(f"unknown unit {name!r}")


# ---------------------------------------------------------------------------------
# The family contract (aftune/model/family.py).

NAME = "resnet"
ARCHS = ("resnet",)
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
# Non-parameter state a training forward updates (train.step collects it after each unit).
TRAIN_STATE = nnx.BatchStat


def config_from_dict(d: Mapping[str, Any]) -> ResNetConfig:
  return ResNetConfig.from_dict(d)


def config_from_sheet(sheet: Any, vocab_size: int | None = None) -> ResNetConfig:
  del vocab_size
  m = sheet.model
  cfg = ResNetConfig(
      embedding_size=int(m.embedding_size), hidden_sizes=tuple(int(h) for h in m.hidden_sizes),
      depths=tuple(int(d) for d in m.depths), num_classes=int(m.num_classes),
      image=vision.image_input_from_sheet(sheet), layer_type=m.get("layer_type", "bottleneck"),
      dtype=m.dtype)
  cfg.validate()
  return cfg


load_pretrained = vision.load_pretrained
unit_names = vision.unit_names
check_trainable = vision.check_trainable


def build_units(cfg: ResNetConfig, seed: int) -> dict[str, nnx.Module]:
  return vision.build_units(build_unit, cfg, seed)


def abstract_unit(cfg: ResNetConfig, name: str) -> nnx.Module:
  return vision.abstract_unit(build_unit, cfg, name)


def trainable_filter(cfg: ResNetConfig) -> Any:
  """Parameters and the BatchNorm running statistics (see the module docstring)."""
  return nnx.Any(nnx.Param, nnx.BatchStat)

