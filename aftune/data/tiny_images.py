"""The built-in tiny image set under data/tiny_images (see its README.md).

Four classes of procedurally drawn 40x40 RGB images: a shape of random size, position and
colour on a random-colour background, with mild noise. A small ViT tells them apart within
a few hundred steps. `generate(seed)` draws them; scripts/make_tiny_images.py writes them as
PNG class folders, which `aftune.data.images.load_class_folders` reads back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The repository root's data/tiny_images (this file is aftune/data/tiny_images.py).
DEFAULT_IMAGES_DIR: Path = Path(__file__).resolve().parents[2] / "data" / "tiny_images"
DEFAULT_IMAGES_PATH: Path = DEFAULT_IMAGES_DIR / "train"
SEED = 20240611
CLASS_NAMES = ("circle", "cross", "square", "stripes")  # sorted: folder order = label order
IMAGE_SIZE = 40
PER_CLASS = 96
# Minimum L1 distance (over RGB) between shape and background colours, so every shape is
# visible.
_MIN_CONTRAST = 180
_NOISE = 6  # +-: per-pixel grey noise; small, so the PNGs stay small


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(background, foreground) RGB colours at least _MIN_CONTRAST apart."""
  bg = rng.integers(0, 256, 3)
  while True:
    fg = rng.integers(0, 256, 3)
    if np.abs(fg - bg).sum() >= _MIN_CONTRAST:
      return bg, fg


def _mask(kind: str, rng: np.random.Generator) -> np.ndarray:
  """bool [40, 40]: where the shape is drawn."""
  n = IMAGE_SIZE
  size = int(rng.integers(14, 29))  # the shape's extent in pixels
  top, left = (int(v) for v in rng.integers(1, n - size, 2))
  yy, xx = np.mgrid[0:n, 0:n]
  inside = (yy >= top) & (yy < top + size) & (xx >= left) & (xx < left + size)
  if kind == "square":
    return inside
  if kind == "circle":
    c = (size - 1) / 2
    return (yy - top - c) ** 2 + (xx - left - c) ** 2 <= (size / 2) ** 2
  if kind == "cross":
    arm = int(rng.integers(3, 7))
    lo = (size - arm) // 2
    bar_v = (xx >= left + lo) & (xx < left + lo + arm)
    bar_h = (yy >= top + lo) & (yy < top + lo + arm)
    return inside & (bar_v | bar_h)
  if kind == "stripes":
    period = int(rng.integers(4, 7))
    coord = yy if rng.integers(0, 2) else xx
    return inside & ((coord - int(rng.integers(0, period))) % period < period // 2)
  raise ValueError(f"unknown class {kind!r}")


def draw(kind: str, rng: np.random.Generator) -> np.ndarray:
  """One image of class `kind`: uint8 [40, 40, 3]."""
  bg, fg = _colours(rng)
  mask_HxW = _mask(kind, rng)
  x_HxWx3 = np.where(mask_HxW[:, :, None], fg, bg)
  noise_HxWx1 = rng.integers(-_NOISE, _NOISE + 1, (IMAGE_SIZE, IMAGE_SIZE, 1))
  return np.clip(x_HxWx3 + noise_HxWx1, 0, 255).astype(np.uint8)


def generate(seed: int = SEED) -> dict[str, list[np.ndarray]]:
  """The tiny image set: class name -> PER_CLASS images, uint8 [40, 40, 3].

  Deterministic in `seed` (numpy's Philox generator, one stream per class, so a class's
  images do not depend on the others).

  Args:
    seed: The root seed.

  Returns:
    {class name: images}, classes in CLASS_NAMES order.
  """
  out = {}
  for index, kind in enumerate(CLASS_NAMES):
    rng = np.random.Generator(np.random.Philox(key=[seed, index]))
    out[kind] = [draw(kind, rng) for _ in range(PER_CLASS)]
  return out
