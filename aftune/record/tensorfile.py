"""Compressed tensor files: safetensors bytes inside a zstd frame, written atomically.

Why this format: safetensors is a header plus raw bytes (no pickle, loadable by any
language); zstd keeps boundary tensors compact. numpy's safetensors loader does not
know bfloat16, so bf16 tensors are stored as their uint16 bit pattern and the real
dtype is kept in the header metadata (`aftune_dtypes`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np
import safetensors.numpy
import zstandard

from aftune import errors

SUFFIX = ".safetensors.zst"
_VIEWS = {"bfloat16": (np.uint16, ml_dtypes.bfloat16)}


class TensorFileError(errors.InputError):
  """A tensor file is missing, truncated or corrupt (the message names it)."""


def encode(tensors: Mapping[str, np.ndarray], level: int = 1,
           metadata: Mapping[str, str] | None = None) -> bytes:
  """The compressed file bytes for `tensors` (name -> host array) and string metadata."""
  stored, dtypes = {}, {}
  for name, a in tensors.items():
    a = np.asarray(a)
    if a.dtype.name in _VIEWS:
      dtypes[name] = a.dtype.name
      a = a.view(_VIEWS[a.dtype.name][0])
    stored[name] = np.ascontiguousarray(a) if a.ndim else a.reshape(())
  meta = {**(metadata or {}), "aftune_dtypes": json.dumps(dtypes, sort_keys=True)}
  raw = safetensors.numpy.save(stored, metadata=meta)
  return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(raw)


def write(path: Path, tensors: Mapping[str, np.ndarray], level: int = 1,
          metadata: Mapping[str, str] | None = None) -> int:
  """Writes atomically (tmp file, fsync, rename) so a reader never sees half a file.

  Returns:
    The number of bytes written.
  """
  data = encode(tensors, level, metadata)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return len(data)


def read(path: Path) -> dict[str, np.ndarray]:
  """Loads a tensor file; any damage raises TensorFileError naming the file."""
  return read_with_metadata(path)[0]


def read_with_metadata(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Tensors and the string metadata stored beside them."""
  path = Path(path)
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise TensorFileError(f"{path}: tensor file missing") from None
  try:
    raw = zstandard.ZstdDecompressor().decompress(data)
  except zstandard.ZstdError as e:
    raise TensorFileError(f"{path}: corrupt or truncated (zstd: {e})") from None
  try:
    tensors = safetensors.numpy.load(raw)
    header_len = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + header_len]).get("__metadata__", {})
    dtypes = json.loads(meta.get("aftune_dtypes", "{}"))
  except Exception as e:  # safetensors raises several types on a bad header
    raise TensorFileError(f"{path}: not a valid safetensors payload ({e})") from None
  for name, dt in dtypes.items():
    tensors[name] = tensors[name].view(_VIEWS[dt][1])
  meta.pop("aftune_dtypes", None)
  return tensors, meta
