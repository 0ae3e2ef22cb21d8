"""What the vision families (ViT/DINOv2 in `vit.py`, ResNet in `resnet.py`) share.

The input side: a batch holds the *stored* images (uint8 [B, S, S, 3], after the host-side
resize of `aftune.data.images`), exactly the arrays the dataset root commits. The first
unit turns them into the model's input in-graph (`aftune.data.augment.model_input`): the
crop (random in training, keyed by the committed step key; central otherwise), the flip
and the normalisation. So augmentation is part of the committed program, replays
bit-for-bit from the step key, and a substituted image is caught by the dataset proofs.

The `ImageInput` config (preprocessing + augmentation) is part of the model config, and so
of the job spec's hyperparameters: the client agrees to how its images are prepared.

Mode: training units see `ctx["train"] = True` (random crop and flip; BatchNorm uses the
batch's statistics and updates its running ones); inference units see False (central crop;
BatchNorm uses the running statistics).
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

from aftune import errors
from aftune.data import augment
from aftune.data import images as images_lib

Array = jax.Array
MODALITY = "image"
INPUT_KEY = "image"  # uint8 [B, S, S, 3]: the stored images
BATCH_KEYS = ("image", "label")


@dataclasses.dataclass(frozen=True)
class ImageInput:
  """How the stored images become the model's input; bound in the job spec."""
  preprocess: images_lib.Preprocess
  random_crop: bool = False  # training: a random image_size crop (after zero padding)
  crop_padding: int = 0  # pixels of zero padding on each side before the random crop
  flip: bool = False  # training: random horizontal flips

  @property
  def image_size(self) -> int:
    return self.preprocess.image_size

  @property
  def stored_size(self) -> int:
    return self.preprocess.stored_size

  def to_dict(self) -> dict[str, Any]:
    return {"preprocess": self.preprocess.to_dict(), "random_crop": self.random_crop,
            "crop_padding": self.crop_padding, "flip": self.flip}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ImageInput":
    d = dict(d)
    return cls(preprocess=images_lib.Preprocess.from_dict(d.pop("preprocess")), **d)

  def validate(self) -> None:
    self.preprocess.validate()
    if self.crop_padding < 0:
      raise errors.ConfigError(f"crop_padding must be >= 0, got {self.crop_padding}")


def image_input_from_sheet(sheet: Any, pre: images_lib.Preprocess | None = None) -> ImageInput:
  """The run sheet's `data.preprocess` / `data.augment` (or a checkpoint's preprocessing)."""
  d = sheet.data
  if pre is None:
    p = d.preprocess
    pre = images_lib.Preprocess(
        image_size=int(p.image_size), stored_size=int(p.stored_size), resize=p.resize,
        resize_size=int(p.resize_size), resample=p.resample, mean=tuple(map(float, p.mean)),
        std=tuple(map(float, p.std)), rescale=float(p.rescale))
  a = d.augment
  image = ImageInput(pre, random_crop=bool(a.random_crop), crop_padding=int(a.crop_padding),
                     flip=bool(a.flip))
  image.validate()
  return image


def model_input(image: ImageInput, images_BxSxSx3: Array, ctx: Mapping[str, Any]) -> Array:
  """float32 [B, H, W, 3]: the crop, flip and normalisation of the stored images."""
  pre = image.preprocess
  train = bool(ctx.get("train", False))
  return augment.model_input(
      images_BxSxSx3, ctx.get("key") if train else None, image_size=pre.image_size,
      mean=pre.mean, std=pre.std, rescale=pre.rescale, train=train,
      random_crop=image.random_crop, crop_padding=image.crop_padding, flip=image.flip)


# ---------------------------------------------------------------------------------
# Layers shared by the families. Kernels are [in, out] (HF Linear: [out, in], transposed
# by the importer); convolution kernels are HWIO (HF: OIHW).


def normal(key, shape, std=0.02):
  # Drawn flat, then reshaped: the same values, but XLA:CPU compiles a rank-4 draw (a conv
  # kernel) 7-16x slower.
  return std * jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape)


class Dense(nnx.Module):
  """y = x W + b, computed in the compute dtype."""

  def __init__(self, d_in: int, d_out: int, *, bias: bool = True, dtype: str, param_dtype: str,
               rngs: nnx.Rngs, std: float = 0.02):
    self.compute_dtype = jnp.dtype(dtype)
    self.kernel = nnx.Param(normal(rngs.params(), (d_in, d_out), std).astype(param_dtype))
    self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if bias else None

  def __call__(self, x: Array) -> Array:
    dt = self.compute_dtype
    y = x.astype(dt) @ self.kernel[...].astype(dt)
    if self.bias is not None:
      y = y + self.bias[...].astype(dt)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in fp32 (as torch does for fp32 inputs)."""

  def __init__(self, dim: int, *, eps: float, param_dtype: str):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class Classifier(nnx.Module):
  """The classification head: logits [B, C] in fp32."""

  def __init__(self, d_in: int, num_classes: int, *, dtype: str, param_dtype: str, rngs: nnx.Rngs):
    self.dense = Dense(d_in, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_BxD: Array) -> Array:
    return self.dense(x_BxD).astype(jnp.float32)


# ---------------------------------------------------------------------------------
# Loss, batch layout and the family-contract pieces every vision family shares.


def cross_entropy(logits_BxC: Array, labels_B: Array) -> Array:
  """Mean softmax cross-entropy (fp32)."""
  logp = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
  nll_B = -jnp.take_along_axis(logp, labels_B.astype(jnp.int32)[:, None], axis=-1)[:, 0]
  return jnp.mean(nll_B)


def loss(logits_BxC: Array, batch: Mapping[str, Array]) -> Array:
  return cross_entropy(logits_BxC, batch["label"])


def context(batch: Mapping[str, Array]) -> dict[str, Any]:
  """Training context: every unit trains (random crop and flip, batch statistics)."""
  del batch
  return {"train": True}


def inference_context() -> dict[str, Any]:
  return {"train": False}


def batch_shapes(cfg: Any, batch_size: int, hp: Mapping[str, Any]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
  """field -> (dtype, shape) of a training batch, as the dataset stores it."""
  del hp
  s = cfg.image.stored_size
  return {"image": (np.dtype(np.uint8), (batch_size, s, s, 3)),
          "label": (np.dtype(np.int32), (batch_size,))}


def load_pretrained(path: str, sheet: Any) -> tuple[Any, dict[str, nnx.Module]]:
  """A local Hugging Face ViT / DINOv2 / ResNet checkpoint (`hf_vision.load_hf_vision`)."""
  from aftune.model import hf_vision  # pylint: disable=g-import-not-at-top
  return hf_vision.load_hf_vision(path, sheet)


def unit_names(cfg: Any) -> tuple[str, ...]:
  return cfg.unit_names


def check_trainable(cfg: Any) -> None:
  cfg.validate()


def _rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(params=seed)


def build_units(build_unit, cfg: Any, seed: int) -> dict[str, nnx.Module]:
  """Every unit of a family (its `build_unit(cfg, name, rngs)`), in order, from one seed."""
  rngs = _rngs(seed)
  return {name: build_unit(cfg, name, rngs) for name in cfg.unit_names}


def abstract_unit(build_unit, cfg: Any, name: str) -> nnx.Module:
  """A unit's structure with shape-only parameters: nothing is allocated."""
  return nnx.eval_shape(lambda: build_unit(cfg, name, _rngs(0)))


def prefill_unit(name, unit, x, ctx, max_len):
  raise errors.ConfigError("vision models are served by aftune.infer.classify, not by generation")


decode_unit = prefill_unit


def merge_lora(units):
  return units  # vision families have no adapters


def check_dtype(dtype: str) -> None:
  if dtype not in ("float32", "bfloat16"):
    raise errors.ConfigError(f"model.dtype must be float32 or bfloat16, got {dtype!r}")


# ---------------------------------------------------------------------------------
# Bicubic resampling as torch's `interpolate(mode="bicubic", align_corners=False)`
# (cubic convolution with A = -0.75, clamped borders): the position-embedding grid of a
# checkpoint resampled to another image size, exactly as the HF models do it per forward.


def torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """float64 [n_out, n_in]: y = W x resamples a 1-D signal as torch's bicubic does."""
  a = -0.75
  scale = n_in / n_out
  w = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5  # torch: no clamping of the source index for cubic
    x0 = math.floor(src)
    t = src - x0
    coeffs = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
              ((a + 2) * t - (a + 3)) * t * t + 1,
              ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
              ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
    for off, c in zip((-1, 0, 1, 2), coeffs):
      w[i, min(max(x0 + off, 0), n_in - 1)] += c
  return w


def torch_bicubic_aa_matrix(n_in: int, n_out: int) -> np.ndarray:
  """float64 [n_out, n_in]: torch's `interpolate(mode="bicubic", antialias=True,
  align_corners=False)`, which uses another kernel (A = -0.5, normalised weights) even when
  upsampling (HF's DINOv2 with registers resamples so)."""
  a = -0.5

  def k(x):
    x = abs(x)
    if x < 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0

  scale = n_in / n_out
  support, inv = (2.0 * scale, 1.0 / scale) if scale >= 1.0 else (2.0, 1.0)
  w = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    c = scale * (i + 0.5)
    lo, hi = max(int(c - support + 0.5), 0), min(int(c + support + 0.5), n_in)
    row = np.array([k((j - c + 0.5) * inv) for j in range(lo, hi)])
    w[i, lo:hi] = row / row.sum()
  return w


def resample_grid(grid_GxGxD: Array, n: int, *, antialias: bool = False) -> Array:
  """[G, G, D] -> [n, n, D] in fp32 (torch bicubic, separable; antialiased if asked)."""
  g = grid_GxGxD.shape[0]
  if g == n:
    return grid_GxGxD
  matrix = torch_bicubic_aa_matrix if antialias else torch_bicubic_matrix
  w_NxG = jnp.asarray(matrix(g, n), jnp.float32)
  x = grid_GxGxD.astype(jnp.float32)
  x = jnp.einsum("ih,hwd->iwd", w_NxG, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("jw,iwd->ijd", w_NxG, x, precision=jax.lax.Precision.HIGHEST)
