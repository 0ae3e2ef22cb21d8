"""In-graph image input: the crop, flip and normalisation of the stored images.

  model_input(images_BxSxSx3, key, ...)   uint8 stored images -> float32 model input (NHWC)
  hf_pixel_values(images_BxSxSx3, pre)    the eval input as Hugging Face lays it out (NCHW)

Pure and jittable: it runs inside the model's first unit, so augmentation is part of the
committed program and replays bit-for-bit from the step key. Row b's crop offset and flip
are a pure function of (key, b): the row key is `fold_in(key, b)`, so they do not depend on
the batch size or on the other rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
  from aftune.data.images import Preprocess


def _center_crop(images_BxSxSx3: jax.Array, image_size: int) -> jax.Array:
  s = images_BxSxSx3.shape[1]
  top = (s - image_size) // 2  # HF center_crop's rounding (the stored image is square)
  return images_BxSxSx3[:, top : top + image_size, top : top + image_size]


def _row_keys(key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
  """Per-row (crop key, flip key): row b's pair depends only on (key, b)."""
  rows_B = jnp.arange(batch, dtype=jnp.uint32)
  keys_B = jax.vmap(lambda b: jax.random.fold_in(key, b))(rows_B)
  pairs_Bx2 = jax.vmap(jax.random.split)(keys_B)
  return pairs_Bx2[:, 0], pairs_Bx2[:, 1]


def model_input(
  images_BxSxSx3: jax.Array,
  key: jax.Array | None,
  *,
  image_size: int,
  mean: Sequence[float],
  std: Sequence[float],
  rescale: float,
  train: bool,
  random_crop: bool,
  crop_padding: int,
  flip: bool,
) -> jax.Array:
  """The model's input from the stored images.

  Eval (train False, or key None): the central image_size crop, top = left =
  (S - image_size) // 2. Training: with random_crop, zero padding of crop_padding pixels
  on each side, then an image_size crop at a per-row offset uniform in
  [0, S + 2 * crop_padding - image_size] (else the central crop); with flip, a per-row
  horizontal flip with probability 1/2. Then (x * rescale - mean) / std, rounded exactly as
  Hugging Face's processors do (rescale in float64, cast, then float32), via a table.

  Args:
    images_BxSxSx3: uint8 stored images.
    key: The step's PRNG key (typed or raw); row b uses fold_in(key, b).
    image_size: The model's square input size (static).
    mean: Per-channel mean (3 Python floats; baked in as constants).
    std: Per-channel std.
    rescale: uint8 -> float factor (HF's rescale_factor).
    train: Training mode: random crop and flip as configured.
    random_crop: Training: crop at a random offset instead of the center.
    crop_padding: Training with random_crop: zero pixels added on each side first.
    flip: Training: random horizontal flips.

  Returns:
    float32 [B, image_size, image_size, 3] (NHWC).
  """
  b, s, s2, c = images_BxSxSx3.shape
  if s != s2 or c != 3 or images_BxSxSx3.dtype != np.uint8:
    raise ValueError(
      "expected square uint8 RGB images [B, S, S, 3], got "
      f"{images_BxSxSx3.dtype} {images_BxSxSx3.shape}"
    )
  if image_size > s:
    raise ValueError(f"image_size {image_size} exceeds the stored size {s}")
  if crop_padding < 0:
    raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
  images_BxSxSx3 = jnp.asarray(images_BxSxSx3)
  if not train or key is None:
    x_BxHxWx3 = _center_crop(images_BxSxSx3, image_size)
  else:
    crop_keys_B, flip_keys_B = _row_keys(key, b)
    if random_crop:
      pad = crop_padding
      padded_BxPxPx3 = jnp.pad(images_BxSxSx3, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
      max_offset = s + 2 * pad - image_size

      def crop_row(image_PxPx3, crop_key):
        top, left = jax.random.randint(crop_key, (2,), 0, max_offset + 1)
        return jax.lax.dynamic_slice(image_PxPx3, (top, left, 0), (image_size, image_size, 3))

      x_BxHxWx3 = jax.vmap(crop_row)(padded_BxPxPx3, crop_keys_B)
    else:
      x_BxHxWx3 = _center_crop(images_BxSxSx3, image_size)
    if flip:
      flip_B = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5))(flip_keys_B)
      x_BxHxWx3 = jnp.where(flip_B[:, None, None, None], x_BxHxWx3[:, :, ::-1], x_BxHxWx3)
  # A uint8 pixel has 256 values per channel, so the normalisation is a lookup in a table
  # numpy computes exactly as HF does (rescale in float64, cast to float32, then float32
  # subtract and divide). In-graph arithmetic would not be bitwise HF's: x * float32(rescale)
  # rounds differently for about half the byte values, and XLA turns the division by std
  # into a multiplication by 1/std. A gather is exact on every backend.
  table_256x3 = (
    (np.arange(256, dtype=np.float64)[:, None] * rescale).astype(np.float32)
    - np.asarray(mean, np.float32)
  ) / np.asarray(std, np.float32)
  index_BxHxWx3 = x_BxHxWx3.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32)
  return jnp.asarray(table_256x3.reshape(-1))[index_BxHxWx3]


def hf_pixel_values(images_BxSxSx3: np.ndarray, pre: Preprocess) -> np.ndarray:
  """The eval input in Hugging Face's layout: float32 [B, 3, H, W], for parity checks."""
  x_BxHxWx3 = model_input(
    images_BxSxSx3,
    None,
    image_size=pre.image_size,
    mean=pre.mean,
    std=pre.std,
    rescale=pre.rescale,
    train=False,
    random_crop=False,
    crop_padding=0,
    flip=False,
  )
  return np.asarray(x_BxHxWx3).transpose(0, 3, 1, 2)
