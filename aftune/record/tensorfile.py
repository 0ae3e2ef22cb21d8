"""Compressed tensor files: safetensors bytes inside one zstd frame, written atomically.

Why this format: safetensors is a header plus raw bytes (no pickle, loadable by any
language); zstd keeps boundary tensors compact. numpy's safetensors loader does not
know bfloat16, so bf16 tensors are stored as their uint16 bit pattern and the real
dtype is kept in the header metadata (`aftune_dtypes`).

Reading is done in two phases, because a tensor file may come from someone else and a
few hostile bytes must not make the reader decompress or allocate without bound (a
20-byte zstd frame can declare a terabyte of content):

1. `Reader(path)` reads the zstd frame header and checks the declared content size
   against what a frame of this file size can hold and against the caller's `max_bytes`.
   Only then does it stream-decompress the 8-byte header length and the JSON header
   (itself bounded by MAX_HEADER_BYTES and by the content size), and validate it: safe
   tensor names, known dtypes, shapes whose sizes match their byte ranges, and byte
   ranges that tile the data region exactly up to the declared content size. After
   this phase every size is known and consistent; no tensor byte has been decompressed.
2. `Reader.read_tensors(expected)` compares the entries with what the caller expects
   (names, dtypes, shapes) before decompressing any data, so a file carrying tensors
   nobody asked for is refused without decompressing them. Then it reads exactly the
   data region into arrays allocated from the (already validated) header, and checks
   that the zstd frame ends there: checksum verified, nothing truncated, nothing after it.

Every failure raises TensorFileError naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from typing import BinaryIO
from typing import Self

import ml_dtypes
import numpy as np
import safetensors.numpy
import zstandard

from aftune import errors
from aftune import jsonio

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


MAX_HEADER_BYTES = 64 << 20  # a safetensors JSON header larger than this is hostile
MAX_NAME_CHARS = 512
MAX_NDIM = 32
# A zstd block yields at most 128 KiB and costs at least 4 bytes (an RLE block), so no
# frame of n bytes decodes to more than n * 32768 bytes; a frame declaring more is lying.
_MAX_ZSTD_RATIO = (128 << 10) // 4
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_FRAME_HEADER_MAX = 18  # magic 4, descriptor 1, window 1, dictionary id 4, content size 8
_READ_CHUNK = 1 << 20

# safetensors dtype code -> the dtype of its bytes (little-endian, as safetensors stores them)
_CODES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor as the header declares it (validated, not yet read)."""
  name: str
  dtype: str  # numpy dtype name as the caller sees it: "float32", "bfloat16", "bool", ...
  shape: tuple[int, ...]
  nbytes: int


@dataclasses.dataclass(frozen=True)
class _Slot:
  entry: Entry
  code: str  # the safetensors dtype code stored in the file
  begin: int


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _name_problem(name: str) -> str | None:
  """Why `name` is not a safe tensor name, or None."""
  if not name:
    return "empty"
  if len(name) > MAX_NAME_CHARS:
    return f"longer than {MAX_NAME_CHARS} characters"
  if any(not (0x20 <= ord(c) <= 0x7E) for c in name):
    return "not printable ASCII"
  if "\\" in name:
    return "contains a backslash"
  if name.startswith("/"):
    return "absolute"
  for part in name.split("/"):
    if part in ("", ".", ".."):
      return f"has a component {part!r}"
  return None


def _describe(dtype: str, shape: tuple[int, ...]) -> str:
  return f"{dtype}[{', '.join(str(d) for d in shape)}]"


def _quote_some(names: list[str], limit: int = 3) -> str:
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _dtype_name(d: Any) -> str:
  return d if isinstance(d, str) else np.dtype(d).name


class Reader:
  """Opens a tensor file and reads only its header (bounded); tensors on demand.

      with tensorfile.Reader(path) as r:
        r.metadata      # dict[str, str]: the safetensors __metadata__, without aftune_dtypes
        r.entries       # dict[str, Entry], in file (data) order
        r.content_size  # int: the zstd frame's declared decompressed size
        tensors = r.read_tensors(expected=None)  # dict name -> np.ndarray

  Args:
    path: the tensor file.
    max_bytes: if given, a file declaring more decompressed content than this is refused
      before anything is decompressed.

  Raises:
    TensorFileError: the file is missing, not a zstd frame, too large, or its header is
      malformed; the message starts with the path.
  """

  def __init__(self, path: str | os.PathLike[str], *, max_bytes: int | None = None):
    self.path = Path(path)
    if max_bytes is not None and (not _is_int(max_bytes) or max_bytes < 0):
      raise ValueError(f"max_bytes must be a non-negative int, not {max_bytes!r}")
    self._file: BinaryIO | None = None
    self._stream: Any = None
    self._done = False
    try:
      self._file = open(self.path, "rb")  # noqa: SIM115 - held until close()
    except FileNotFoundError:
      raise TensorFileError(f"{self.path}: tensor file missing") from None
    except OSError as e:
      raise TensorFileError(f"{self.path}: cannot open tensor file ({e.strerror or e})") from None
    try:
      self._open(max_bytes)
    except BaseException:
      self.close()
      raise

  # -- phase 1: frame parameters and header --------------------------------------------

  def _fail(self, what: str) -> TensorFileError:
    return TensorFileError(f"{self.path}: {what}")

  def _open(self, max_bytes: int | None) -> None:
    f = self._file
    try:
      self.file_size = os.fstat(f.fileno()).st_size
      head = f.read(_FRAME_HEADER_MAX)
    except OSError as e:
      raise self._fail(f"cannot read tensor file ({e.strerror or e})") from None
    if head[:4] != _ZSTD_MAGIC:
      raise self._fail("not a zstd frame" + (" (empty file)" if not head else ""))
    try:
      params = zstandard.get_frame_parameters(head)
    except zstandard.ZstdError as e:
      raise self._fail(f"not a zstd frame ({e})") from None
    size = params.content_size
    if size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
      raise self._fail("the zstd frame does not declare its content size")
    if params.dict_id:
      raise self._fail(f"the zstd frame needs dictionary {params.dict_id}")
    if not params.has_checksum:
      raise self._fail("the zstd frame has no content checksum")
    if max_bytes is not None and size > max_bytes:
      raise self._fail(f"declares {size} bytes of content, more than the limit of {max_bytes}")
    if size > self.file_size * _MAX_ZSTD_RATIO:
      raise self._fail(f"declares {size} bytes of content, more than a zstd frame of "
                       f"{self.file_size} bytes can hold")
    if size < 8:
      raise self._fail(f"declares {size} bytes of content, too few for a safetensors header")
    self.content_size: int = size
    f.seek(0)
    self._stream = zstandard.ZstdDecompressor().stream_reader(
        f, read_across_frames=False, closefd=False)
    header_len = int.from_bytes(self._read_exact(8, "the header length"), "little")
    if header_len > MAX_HEADER_BYTES:
      raise self._fail(f"safetensors header of {header_len} bytes (more than {MAX_HEADER_BYTES})")
    if header_len > size - 8:
      raise self._fail(f"safetensors header of {header_len} bytes in {size} bytes of content")
    self.header_len = header_len
    text = self._read_exact(header_len, "the safetensors header")
    try:
      header = jsonio.strict_loads(bytes(text))
    except (ValueError, RecursionError) as e:
      raise self._fail(f"safetensors header is not valid JSON ({e})") from None
    self._parse_header(header)

  def _read_exact(self, n: int, what: str) -> bytearray:
    """n decompressed bytes, read in bounded chunks (memory grows only as data arrives)."""
    out = bytearray()
    try:
      while len(out) < n:
        chunk = self._stream.read(min(_READ_CHUNK, n - len(out)))
        if not chunk:
          raise self._fail(f"truncated in {what} ({len(out)} of {n} bytes)")
        out += chunk
    except zstandard.ZstdError as e:
      raise self._fail(f"corrupt zstd data in {what} ({e})") from None
    except OSError as e:
      raise self._fail(f"cannot read tensor file ({e.strerror or e})") from None
    return out

  def _parse_header(self, header: Any) -> None:
    if not isinstance(header, dict):
      raise self._fail("safetensors header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
      raise self._fail("safetensors __metadata__ is not an object of strings")
    slots: list[_Slot] = []
    for name, spec in header.items():
      if name == "__metadata__":
        continue
      problem = _name_problem(name)
      if problem:
        raise self._fail(f"unsafe tensor name {name[:80]!r} ({problem})")
      slots.append(self._parse_entry(name, spec))
    meta = dict(meta)
    views = self._parse_views(meta.pop("aftune_dtypes", None), {s.entry.name: s for s in slots})
    slots = [dataclasses.replace(s, entry=dataclasses.replace(s.entry, dtype=views[s.entry.name]))
             if s.entry.name in views else s for s in slots]
    slots.sort(key=lambda s: s.begin)  # stable: file order among equal offsets
    pos = 0
    for s in slots:
      if s.begin != pos:
        how = "overlaps the previous one" if s.begin < pos else f"leaves a gap at byte {pos}"
        raise self._fail(f"tensor {s.entry.name!r} at byte {s.begin} {how}")
      pos += s.entry.nbytes
    total = 8 + self.header_len + pos
    if total != self.content_size:
      raise self._fail(f"declares {self.content_size} bytes of content, its tensors take {total}")
    self.metadata: dict[str, str] = meta
    self._slots = slots
    self.entries: dict[str, Entry] = {s.entry.name: s.entry for s in slots}

  def _parse_entry(self, name: str, spec: Any) -> _Slot:
    bad = lambda what: self._fail(f"tensor {name!r}: {what}")
    if not isinstance(spec, dict):
      raise bad("entry is not a JSON object")
    if set(spec) != _ENTRY_FIELDS:
      extra, missing = sorted(set(spec) - _ENTRY_FIELDS), sorted(_ENTRY_FIELDS - set(spec))
      raise bad(f"entry has fields {extra} it should not" if extra else f"entry lacks {missing}")
    code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(code, str) or code not in _CODES:
      raise bad(f"unsupported dtype {str(code)[:20]!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
      raise bad("shape is not a list of non-negative ints")
    if len(shape) > MAX_NDIM:
      raise bad(f"{len(shape)} dimensions (more than {MAX_NDIM})")
    if math.prod(max(d, 1) for d in shape) >= 1 << 62:
      raise bad("shape too large")
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
      raise bad("data_offsets is not [begin, end] with 0 <= begin <= end")
    dtype = _CODES[code]
    nbytes = offsets[1] - offsets[0]
    want = math.prod(shape) * dtype.itemsize
    if nbytes != want:
      raise bad(f"{code}{shape} takes {want} bytes, data_offsets span {nbytes}")
    return _Slot(Entry(name, dtype.name, tuple(shape), nbytes), code, offsets[0])

  def _parse_views(self, doc: Any, slots: dict[str, _Slot]) -> dict[str, str]:
    if doc is None:
      return {}
    try:
      views = jsonio.strict_loads(doc)
    except (ValueError, RecursionError) as e:
      raise self._fail(f"aftune_dtypes is not valid JSON ({e})") from None
    if not isinstance(views, dict):
      raise self._fail("aftune_dtypes is not a JSON object")
    for name, dt in views.items():
      if name not in slots:
        raise self._fail(f"aftune_dtypes names tensor {name[:80]!r}, which the file lacks")
      if not isinstance(dt, str) or dt not in _VIEWS or slots[name].code != "U16":
        raise self._fail(f"aftune_dtypes views tensor {name!r} ({slots[name].code}) "
                         f"as {str(dt)[:20]!r}; only U16 as 'bfloat16' is allowed")
    return views

  # -- phase 2: tensors -------------------------------------------------------------------

  def check_expected(self, expected: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """Raises TensorFileError unless the entries are exactly `expected` (name -> dtype, shape)."""
    extra = [n for n in self.entries if n not in expected]
    if extra:
      s = "s" if len(extra) > 1 else ""
      raise self._fail(f"unexpected tensor{s} {_quote_some(extra)} (not in the schema)")
    missing = [n for n in expected if n not in self.entries]
    if missing:
      s = "s" if len(missing) > 1 else ""
      raise self._fail(f"missing tensor{s} {_quote_some(missing)} (in the schema, not in the file)")
    for name, e in self.entries.items():
      dtype, shape = expected[name]
      want = (_dtype_name(dtype), tuple(int(d) for d in shape))
      if (e.dtype, e.shape) != want:
        raise self._fail(f"tensor {name!r} is {_describe(e.dtype, e.shape)}, "
                         f"expected {_describe(*want)}")

  def read_tensors(self, expected: Mapping[str, tuple[str, tuple[int, ...]]] | None = None
                   ) -> dict[str, np.ndarray]:
    """Decompresses the data region into arrays (writeable, each owning its memory).

    Args:
      expected: if given, name -> (dtype name, shape); any difference from the header
        (a missing, extra or differently typed tensor) is refused before any tensor data
        is decompressed.

    Raises:
      TensorFileError: a mismatch with `expected`, or damaged data (truncated, corrupt,
        checksum mismatch, bytes after the frame). Tensors can be read once per Reader.
    """
    if self._stream is None:
      raise self._fail("reader is closed")
    if self._done:
      raise self._fail("tensors were already read (open a new Reader)")
    if expected is not None:
      self.check_expected(expected)
    self._done = True
    self._check_frame_end()
    out: dict[str, np.ndarray] = {}
    try:
      for s in self._slots:
        out[s.entry.name] = self._read_array(s)
      # The frame's last block and checksum may still be unread: one more read makes zstd
      # consume them (and verify the checksum); it must yield nothing.
      if self._stream.read(1):
        raise self._fail("content continues past the declared size")
    except zstandard.ZstdError as e:
      raise self._fail(f"corrupt zstd data ({e})") from None
    except OSError as e:
      raise self._fail(f"cannot read tensor file ({e.strerror or e})") from None
    return out

  def _read_array(self, s: _Slot) -> np.ndarray:
    e = s.entry
    dtype = np.dtype(ml_dtypes.bfloat16) if e.dtype == "bfloat16" else _CODES[s.code]
    try:
      a = np.empty(e.shape, dtype)
    except (MemoryError, ValueError) as err:
      raise self._fail(f"cannot allocate tensor {e.name!r} of {e.nbytes} bytes ({err})") from None
    if e.nbytes:
      view = memoryview(a.reshape(-1).view(np.uint8))
      got = 0
      while got < e.nbytes:
        n = self._stream.readinto(view[got:])
        if not n:
          raise self._fail(f"truncated in tensor {e.name!r} ({got} of {e.nbytes} bytes)")
        got += n
      if s.code == "BOOL" and a.view(np.uint8).max() > 1:
        raise self._fail(f"tensor {e.name!r} is BOOL but holds bytes other than 0 and 1")
    return a

  def _check_frame_end(self) -> None:
    """Checks that the file is exactly one zstd frame, checksum included, by its block headers.

    zstandard's stream_reader verifies the checksum when it reaches it, but when its input
    ends early (a file cut inside the last block or the checksum) it just returns b"", and
    it reports nothing about bytes after the frame; so find where the frame ends from its
    block headers (3 bytes each, no decompression) before decompressing the data.
    """
    f = self._file
    try:
      resume = f.tell()  # the stream reader reads on from here
      f.seek(0)
      head = f.read(_FRAME_HEADER_MAX)
      pos = zstandard.frame_header_size(head)
      checksum = 4 if head[4] & 0x04 else 0
      while True:
        f.seek(pos)
        b = f.read(3)
        if len(b) < 3:
          break
        h = int.from_bytes(b, "little")
        kind, size = (h >> 1) & 3, h >> 3
        if kind == 3:
          raise self._fail(f"corrupt zstd block header at byte {pos}")
        pos += 3 + (1 if kind == 1 else size)
        if h & 1:
          pos += checksum
          break
        if pos > self.file_size:
          break
      f.seek(resume)
    except zstandard.ZstdError as e:
      raise self._fail(f"corrupt zstd frame header ({e})") from None
    except OSError as e:
      raise self._fail(f"cannot read tensor file ({e.strerror or e})") from None
    if len(b) < 3 or pos > self.file_size:
      raise self._fail(f"truncated zstd frame ({self.file_size} bytes, the frame needs more)")
    if pos < self.file_size:
      raise self._fail(f"{self.file_size - pos} bytes after the end of the zstd frame")

  # -- lifetime -----------------------------------------------------------------------------

  def close(self) -> None:
    stream, f, self._stream, self._file = self._stream, self._file, None, None
    if stream is not None:
      stream.close()
    if f is not None:
      f.close()

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


def read(path: Path, *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
  """Loads a tensor file; any damage raises TensorFileError naming the file."""
  return read_with_metadata(path, max_bytes=max_bytes)[0]


def read_with_metadata(path: Path, *, max_bytes: int | None = None
                       ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Tensors and the string metadata stored beside them (without aftune_dtypes)."""
  with Reader(path, max_bytes=max_bytes) as r:
    return r.read_tensors(), dict(r.metadata)
