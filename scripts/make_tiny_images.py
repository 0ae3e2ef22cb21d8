#!/usr/bin/env python
"""Writes the built-in tiny image set (data/tiny_images/) as PNG class folders.

Deterministic and offline: the pixels come from `aftune.data.tiny_images.generate(seed)`
(checked against the committed PNGs by tests/test_images.py).

  .venv/bin/python scripts/make_tiny_images.py              # -> data/tiny_images
  .venv/bin/python scripts/make_tiny_images.py --out /tmp/x

Writes <out>/train/<class>/<NNNN>.png (existing files of the same names are overwritten).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from aftune.data import tiny_images


def write(out: Path, seed: int) -> int:
  """Writes the set under out/train; returns the number of images written."""
  count = 0
  for kind, images in tiny_images.generate(seed).items():
    class_dir = out / "train" / kind
    class_dir.mkdir(parents=True, exist_ok=True)
    for i, x_HxWx3 in enumerate(images):
      Image.fromarray(x_HxWx3).save(class_dir / f"{i:04d}.png", format="PNG", optimize=True)
      count += 1
  return count


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=tiny_images.DEFAULT_IMAGES_DIR)
  parser.add_argument("--seed", type=int, default=tiny_images.SEED)
  args = parser.parse_args(argv)
  n = write(args.out, args.seed)
  print(f"wrote {n} images to {args.out / 'train'}")


if __name__ == "__main__":
  main()
