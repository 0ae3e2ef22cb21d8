"""The tensor file reader: round trips, and hostile or damaged files refused cheaply."""

from __future__ import annotations

import json
import time

import hypothesis
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import zstandard
from hypothesis import strategies as st

from aftune.record import tensorfile

TFE = tensorfile.TensorFileError


def _mixed() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
      "state/start/params/layer_0/mlp/up_proj/kernel":
          rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
      "step/3/fwd_out/1": rng.standard_normal((2, 3)).astype(np.float32),
      "f64": rng.standard_normal((5,)),
      "f16": rng.standard_normal((2, 2)).astype(np.float16),
      "i64": np.arange(-3, 3, dtype=np.int64),
      "i32": np.arange(7, dtype=np.int32).reshape(7, 1),
      "i16": np.array([-2, 5], np.int16),
      "i8": np.array([-128, 127], np.int8),
      "u64": np.array([2**64 - 1], np.uint64),
      "u32": np.array([1, 2, 3], np.uint32),
      "u16": np.array([65535], np.uint16),
      "u8": np.arange(10, dtype=np.uint8),
      "mask": np.array([[True, False], [False, True]]),
      "loss": np.float32(2.5).reshape(()),
      "bf_scalar": np.array(1.25, ml_dtypes.bfloat16),
      "empty": np.zeros((0, 3), np.float32),
      "empty_bf": np.zeros((4, 0), ml_dtypes.bfloat16),
      "indices": np.array([3, 1, 2], np.int32),
  }


def _write(tmp_path, tensors=None, name="t.safetensors.zst", **kw):
  path = tmp_path / name
  tensorfile.write(path, _mixed() if tensors is None else tensors, **kw)
  return path


def _pack(raw: bytes, **kw) -> bytes:
  return zstandard.ZstdCompressor(write_checksum=True, **kw).compress(raw)


def _raw(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
  text = header if isinstance(header, bytes) else json.dumps(header).encode()
  return (len(text) if length is None else length).to_bytes(8, "little") + text + data


def _put(tmp_path, data: bytes, name="x.safetensors.zst"):
  path = tmp_path / name
  path.write_bytes(data)
  return path


def _same(a: np.ndarray, b: np.ndarray) -> bool:
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- round trips ------------------------------------------------------------------------


def test_round_trip_mixed_dtypes(tmp_path):
  tensors = _mixed()
  path = _write(tmp_path, tensors, metadata={"kind": "bundle", "step": "3"})
  back, meta = tensorfile.read_with_metadata(path)
  assert meta == {"kind": "bundle", "step": "3"}
  assert set(back) == set(tensors)
  for name, a in tensors.items():
    assert _same(back[name], np.asarray(a)), name
    assert back[name].flags.writeable and back[name].flags.owndata, name
  assert back["state/start/params/layer_0/mlp/up_proj/kernel"].dtype == ml_dtypes.bfloat16
  assert back["loss"].shape == () and float(back["loss"]) == 2.5
  assert back["mask"].dtype == np.bool_ and back["mask"].tolist() == [[True, False], [False, True]]
  assert tensorfile.read(path).keys() == back.keys()


def test_reader_entries_and_sizes(tmp_path):
  tensors = _mixed()
  path = _write(tmp_path, tensors)
  raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
  with tensorfile.Reader(path) as r:
    assert r.content_size == len(raw)
    assert r.metadata == {}
    assert set(r.entries) == set(tensors)
    for name, e in r.entries.items():
      a = np.asarray(tensors[name])
      assert (e.name, e.dtype, e.shape, e.nbytes) == (name, a.dtype.name, a.shape, a.nbytes)
    # entries are in file (data) order: their sizes tile the data region
    assert sum(e.nbytes for e in r.entries.values()) + 8 + int.from_bytes(raw[:8], "little") \
        == len(raw)
    got = r.read_tensors({n: (np.asarray(a).dtype.name, np.shape(a)) for n, a in tensors.items()})
  assert all(_same(got[n], np.asarray(a)) for n, a in tensors.items())


def test_encode_decodes_like_safetensors(tmp_path):
  tensors = _mixed()
  data = tensorfile.encode(tensors, metadata={"m": "x"})
  raw = zstandard.ZstdDecompressor().decompress(data)
  ref = safetensors.numpy.load(raw)
  views = json.loads(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
                     ["__metadata__"]["aftune_dtypes"])
  assert views == {"empty_bf": "bfloat16", "bf_scalar": "bfloat16",
                   "state/start/params/layer_0/mlp/up_proj/kernel": "bfloat16"}
  for name in views:
    ref[name] = ref[name].view(ml_dtypes.bfloat16)
  back = tensorfile.read(_put(tmp_path, data))
  assert set(back) == set(ref)
  for name in ref:
    assert _same(back[name], ref[name]), name


def test_reader_is_single_use_and_closes(tmp_path):
  path = _write(tmp_path)
  r = tensorfile.Reader(path)
  r.read_tensors()
  with pytest.raises(TFE, match="already read"):
    r.read_tensors()
  r.close()
  with pytest.raises(TFE, match="closed"):
    r.read_tensors()


# -- open: frame parameters -------------------------------------------------------------


def test_missing_and_not_zstd(tmp_path):
  with pytest.raises(TFE, match=r"nope\.safetensors\.zst: tensor file missing"):
    tensorfile.read(tmp_path / "nope.safetensors.zst")
  with pytest.raises(TFE, match="x.safetensors.zst: not a zstd frame"):
    tensorfile.read(_put(tmp_path, b""))
  with pytest.raises(TFE, match="not a zstd frame"):
    tensorfile.read(_put(tmp_path, b"PK\x03\x04 not zstd at all"))
  raw = safetensors.numpy.save({"a": np.zeros(3, np.float32)})
  with pytest.raises(TFE, match="not a zstd frame"):
    tensorfile.read(_put(tmp_path, raw))
  with pytest.raises(TFE, match="not a zstd frame"):  # reserved bit in the frame descriptor
    data = bytearray(_pack(raw))
    data[4] |= 0x08
    tensorfile.read(_put(tmp_path, bytes(data)))


def test_frame_without_content_size_or_checksum(tmp_path):
  raw = safetensors.numpy.save({"a": np.zeros(3, np.float32)})
  assert tensorfile.read(_put(tmp_path, _pack(raw)))["a"].tolist() == [0, 0, 0]
  with pytest.raises(TFE, match="does not declare its content size"):
    tensorfile.read(_put(tmp_path, _pack(raw, write_content_size=False)))
  with pytest.raises(TFE, match="no content checksum"):
    tensorfile.read(_put(tmp_path, zstandard.ZstdCompressor(write_checksum=False).compress(raw)))


def _spy_stream(monkeypatch) -> list[int]:
  """Counts the decompressed bytes every stream reader hands out."""
  counts: list[int] = []
  real = zstandard.ZstdDecompressor

  class Spy:
    def __init__(self, inner):
      self.inner = inner
      counts.append(0)
      self.i = len(counts) - 1

    def read(self, n=-1):
      out = self.inner.read(n)
      counts[self.i] += len(out)
      return out

    def readinto(self, b):
      n = self.inner.readinto(b)
      counts[self.i] += n
      return n

    def close(self):
      self.inner.close()

  class Dctx:
    def stream_reader(self, *a, **kw):
      return Spy(real().stream_reader(*a, **kw))

  monkeypatch.setattr(tensorfile.zstandard, "ZstdDecompressor", Dctx)
  return counts


def _declaring_frame(content_size: int, prefix: bytes, filler: int) -> bytes:
  """The start of a frame declaring `content_size`: `prefix` then `filler` zero bytes."""
  c = zstandard.ZstdCompressor(level=1, write_checksum=True).compressobj(size=content_size)
  parts = [c.compress(prefix)]
  zeros = bytes(1 << 20)
  for _ in range(filler >> 20):
    parts.append(c.compress(zeros))
  parts.append(c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
  return b"".join(parts)


def test_terabyte_bomb_refused_before_decompressing(tmp_path, monkeypatch):
  tib = 1 << 40
  n = tib - 192  # consistent: 8 + 184 header bytes + n == tib
  header = json.dumps({"a": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}})
  header = header.encode().ljust(192 - 8)
  data = _declaring_frame(tib, _raw(header), 1 << 20)
  assert zstandard.get_frame_parameters(data).content_size == tib
  assert len(data) < 4096
  counts = _spy_stream(monkeypatch)
  t0 = time.monotonic()
  with pytest.raises(TFE, match=f"declares {tib} bytes of content, more than a zstd frame of "
                                f"{len(data)} bytes can hold"):
    tensorfile.Reader(_put(tmp_path, data))
  assert counts == [] and time.monotonic() - t0 < 1


def test_max_bytes_refuses_large_content(tmp_path, monkeypatch):
  size = 96 << 20  # consistent with its compressed size: a real bomb of zeros
  header = json.dumps({"a": {"dtype": "U8", "shape": [size - 128],
                            "data_offsets": [0, size - 128]}}).encode().ljust(120)
  raw_prefix = _raw(header)
  assert len(raw_prefix) == 128
  c = zstandard.ZstdCompressor(level=1, write_checksum=True).compressobj(size=size)
  parts = [c.compress(raw_prefix)]
  for _ in range(95):
    parts.append(c.compress(bytes(1 << 20)))
  parts.append(c.compress(bytes((1 << 20) - 128)))
  parts.append(c.flush())
  data = b"".join(parts)
  assert len(data) * 1000 < size
  path = _put(tmp_path, data)
  counts = _spy_stream(monkeypatch)
  with pytest.raises(TFE, match=f"declares {size} bytes of content, more than the limit of "
                                f"{size - 1}"):
    tensorfile.read(path, max_bytes=size - 1)
  assert counts == []
  with tensorfile.Reader(path, max_bytes=size) as r:  # the header alone, then stop
    assert r.entries["a"].nbytes == size - 128 and r.content_size == size
  assert counts == [128]


def test_lying_header_length_refused_before_reading_it(tmp_path, monkeypatch):
  counts = _spy_stream(monkeypatch)
  for length, match in [(1 << 40, f"header of {1 << 40} bytes .more than {64 << 20}"),
                        ((64 << 20) + 1, "more than"),
                        (1000, "header of 1000 bytes in 520 bytes of content")]:
    raw = _raw(b"{}".ljust(512), length=length)
    with pytest.raises(TFE, match=match):
      tensorfile.read(_put(tmp_path, _pack(raw)))
  assert counts == [8, 8, 8]


# -- damage -----------------------------------------------------------------------------


def _big_file(tmp_path):
  rng = np.random.default_rng(1)
  tensors = {"noise": rng.integers(0, 256, 300_000, dtype=np.uint8),
             "w": rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16),
             "zeros": np.zeros(100_000, np.float32), "s": np.float32(1).reshape(())}
  return _write(tmp_path, tensors), tensors


def test_truncation_everywhere(tmp_path):
  path, _ = _big_file(tmp_path)
  data = path.read_bytes()
  cuts = sorted({len(data) * k // 20 for k in range(20)} | {len(data) - k for k in range(1, 6)})
  for cut in cuts:
    path.write_bytes(data[:cut])
    with pytest.raises(TFE, match="t.safetensors.zst: "):
      tensorfile.read(path)
  path.write_bytes(data)
  assert tensorfile.read(path)["s"] == 1


def test_bytes_after_the_frame(tmp_path):
  path, _ = _big_file(tmp_path)
  data = path.read_bytes()
  for tail in [b"\0", b"junk", _pack(b"another frame")]:
    path.write_bytes(data + tail)
    with pytest.raises(TFE, match=f"{len(tail)} bytes after the end of the zstd frame"):
      tensorfile.read(path)


def test_flipped_bits(tmp_path):
  path, tensors = _big_file(tmp_path)
  data = path.read_bytes()
  raw = zstandard.ZstdDecompressor().decompress(data)
  # `noise` is incompressible: zstd stores it as is, and only the checksum can notice a flip.
  at = data.find(tensors["noise"][150_000:150_032].tobytes())
  assert at > 0
  caught = 0
  for pos in [0, 3, 4, 5, 6, 9, 20, len(data) // 3, at + 7, len(data) // 2,
              len(data) - 9, len(data) - 4, len(data) - 1]:
    for bit in (0, 5):
      bad = bytearray(data)
      bad[pos] ^= 1 << bit
      path.write_bytes(bytes(bad))
      try:
        back = tensorfile.read(path)
      except TFE as e:
        assert str(e).startswith(str(path))
        caught += 1
        if pos in (at + 7, len(data) - 4, len(data) - 1):
          assert "checksum" in str(e)
      else:  # a bit zstd does not use (e.g. a larger window): the content must be intact
        assert all(_same(back[n], np.asarray(a)) for n, a in tensors.items())
        assert zstandard.ZstdDecompressor().decompress(bytes(bad)) == raw
  assert caught >= 20


def test_checksum_checked_when_frame_ends_at_a_read_boundary(tmp_path):
  # The stream reader pulls the file in chunks of DECOMPRESSION_RECOMMENDED_INPUT_SIZE: here
  # the last block ends exactly at the end of the first chunk and the checksum is all that
  # a second chunk holds; it must still be read and verified.
  target = zstandard.DECOMPRESSION_RECOMMENDED_INPUT_SIZE + 4
  noise = np.random.default_rng(7).integers(0, 256, target, dtype=np.uint8)
  n = target - 200
  for _ in range(10):
    data = tensorfile.encode({"noise": noise[:n]})
    if len(data) == target:
      break
    n += target - len(data)
  assert len(data) == target
  path = _put(tmp_path, data)
  assert _same(tensorfile.read(path)["noise"], noise[:n])
  for pos in range(target - 4, target):
    bad = bytearray(data)
    bad[pos] ^= 0x10
    path.write_bytes(bytes(bad))
    with pytest.raises(TFE, match="checksum"):
      tensorfile.read(path)


def test_bool_bytes_other_than_0_and_1(tmp_path):
  raw = _raw({"m": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}, b"\x00\x01\x02")
  with pytest.raises(TFE, match="tensor 'm' is BOOL but holds bytes other than 0 and 1"):
    tensorfile.read(_put(tmp_path, _pack(raw)))


# -- header tampering -------------------------------------------------------------------


def _e(dtype, shape, begin, end, **extra):
  return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end], **extra}


_A = _e("F32", [2], 0, 8)
_B = _e("F32", [2], 8, 16)
_HEADERS = [
    ("overlap", {"a": _A, "b": _e("F32", [2], 4, 12)}, 16, "tensor 'b' at byte 4 overlaps"),
    ("gap", {"a": _A, "b": _e("F32", [2], 12, 20)}, 20, "tensor 'b' at byte 12 leaves a gap"),
    ("not_from_0", {"a": _e("F32", [2], 4, 12)}, 12, "leaves a gap at byte 0"),
    ("wrong_length", {"a": _e("F32", [3], 0, 8)}, 8, "F32.3. takes 12 bytes, data_offsets span 8"),
    ("negative_shape", {"a": _e("F32", [-2], 0, 8)}, 8, "shape is not a list of non-negative"),
    ("bool_shape", {"a": _e("F32", [True, 2], 0, 8)}, 8, "shape is not a list of non-negative"),
    ("float_shape", {"a": _e("F32", [2.0], 0, 8)}, 8, "shape is not a list of non-negative"),
    ("shape_not_list", {"a": _e("F32", 2, 0, 8)}, 8, "shape is not a list"),
    ("too_many_dims", {"a": _e("F32", [1] * 33 + [2], 0, 8)}, 8, "34 dimensions"),
    ("huge_zero_size", {"a": _e("F32", [0, 1 << 62], 0, 0), "b": _e("F32", [2], 0, 8)}, 8,
     "shape too large"),
    ("extra_field", {"a": _e("F32", [2], 0, 8, note="hi")}, 8, r"fields \['note'\]"),
    ("missing_field", {"a": {"dtype": "F32", "shape": [2]}}, 8, r"lacks \['data_offsets'\]"),
    ("entry_not_object", {"a": [1, 2]}, 8, "entry is not a JSON object"),
    ("unknown_dtype", {"a": _e("F8_E4M3", [8], 0, 8)}, 8, "unsupported dtype 'F8_E4M3'"),
    ("reversed_offsets", {"a": _e("F32", [2], 8, 0)}, 8, "0 <= begin <= end"),
    ("negative_offset", {"a": _e("F32", [2], -8, 0)}, 8, "0 <= begin <= end"),
    ("three_offsets", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, 8,
     "data_offsets is not"),
    ("short_data", {"a": _A, "b": _B}, 12, "declares 276 bytes of content, its tensors take 280"),
    ("long_data", {"a": _A}, 12, "declares 276 bytes of content, its tensors take 272"),
    ("dotdot", {"../x": _A}, 8, r"unsafe tensor name '\.\./x'"),
    ("absolute", {"/abs": _A}, 8, "unsafe tensor name '/abs'"),
    ("double_slash", {"a//b": _A}, 8, "unsafe tensor name 'a//b'"),
    ("trailing_slash", {"a/": _A}, 8, "unsafe tensor name 'a/'"),
    ("dot", {"a/./b": _A}, 8, "unsafe tensor name"),
    ("empty_name", {"": _A}, 8, "unsafe tensor name ''"),
    ("backslash", {"a\\b": _A}, 8, "unsafe tensor name"),
    ("nul", {"a\0b": _A}, 8, "unsafe tensor name"),
    ("non_ascii", {"caf\u00e9": _A}, 8, "unsafe tensor name"),
    ("newline", {"a\nb": _A}, 8, "unsafe tensor name"),
    ("long_name", {"x" * 513: _A}, 8, "longer than 512"),
    ("meta_not_strings", {"__metadata__": {"k": 1}, "a": _A}, 8, "__metadata__ is not"),
    ("meta_null", {"__metadata__": None, "a": _A}, 8, "__metadata__ is not"),
    ("not_object", [1, 2], 8, "header is not a JSON object"),
    ("views_f32", {"__metadata__": {"aftune_dtypes": '{"a": "bfloat16"}'}, "a": _A}, 8,
     "only U16 as 'bfloat16'"),
    ("views_other", {"__metadata__": {"aftune_dtypes": '{"a": "float8"}'},
                     "a": _e("U16", [4], 0, 8)}, 8, "only U16"),
    ("views_list", {"__metadata__": {"aftune_dtypes": '{"a": ["bfloat16"]}'},
                    "a": _e("U16", [4], 0, 8)}, 8, "only U16"),
    ("views_missing", {"__metadata__": {"aftune_dtypes": '{"zz": "bfloat16"}'}, "a": _A}, 8,
     "names tensor 'zz', which the file lacks"),
    ("views_bad_json", {"__metadata__": {"aftune_dtypes": "{nope"}, "a": _A}, 8,
     "aftune_dtypes is not valid JSON"),
    ("views_not_object", {"__metadata__": {"aftune_dtypes": "[]"}, "a": _A}, 8,
     "aftune_dtypes is not a JSON object"),
]


@pytest.mark.parametrize("header,data_len,match", [h[1:] for h in _HEADERS],
                         ids=[h[0] for h in _HEADERS])
def test_tampered_header(tmp_path, header, data_len, match):
  text = json.dumps(header).encode().ljust(256)  # content size 8 + 256 + data_len
  raw = _raw(text, bytes(data_len))
  with pytest.raises(TFE, match=match):
    tensorfile.read(_put(tmp_path, _pack(raw)))


def test_tampered_header_text(tmp_path):
  ok = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
  assert tensorfile.read(_put(tmp_path, _pack(_raw(ok, bytes(8)))))["a"].tolist() == [0, 0]
  for text, match in [
      (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32",'
       + b'"shape":[2],"data_offsets":[0,8]}}', "duplicate JSON key 'a'"),
      (b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "duplicate"),
      (b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', "NaN"),
      (b'{"__metadata__":' + b"[" * 100 + b"]" * 100 + b"}", "nested deeper"),
      (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}', "not valid JSON"),
      (b'{"\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "not valid JSON"),
      (b"", "not valid JSON"),
  ]:
    with pytest.raises(TFE, match=match):
      tensorfile.read(_put(tmp_path, _pack(_raw(text, bytes(8)))))


def test_header_length_beyond_content(tmp_path):
  raw = _raw(b"{}", length=11)
  with pytest.raises(TFE, match="header of 11 bytes in 10 bytes of content"):
    tensorfile.read(_put(tmp_path, _pack(raw)))
  with pytest.raises(TFE, match="too few for a safetensors header"):
    tensorfile.read(_put(tmp_path, _pack(b"\x02\0\0")))


# -- expected tensors -------------------------------------------------------------------


def _schema(tensors):
  return {n: (np.asarray(a).dtype.name, np.shape(a)) for n, a in tensors.items()}


@pytest.mark.parametrize("change,match", [
    (lambda s: s.pop("loss"), r"unexpected tensor 'loss' \(not in the schema\)"),
    (lambda s: (s.pop("u8"), s.pop("loss")), r"unexpected tensors 'loss', 'u8' \(not in"),
    (lambda s: s.update(extra=("float32", (1,))),
     r"missing tensor 'extra' \(in the schema, not in the file\)"),
    (lambda s: s.update(x=("float32", (1,)), y=("int8", ())), r"missing tensors 'x', 'y' \("),
    (lambda s: s.update({"step/3/fwd_out/1": ("bfloat16", (2, 3))}),
     r"tensor 'step/3/fwd_out/1' is float32\[2, 3\], expected bfloat16\[2, 3\]"),
    (lambda s: s.update(loss=("float32", (1,))),
     r"tensor 'loss' is float32\[\], expected float32\[1\]"),
    (lambda s: s.update(mask=(np.int8, (2, 2))), r"is bool\[2, 2\], expected int8\[2, 2\]"),
])
def test_expected_mismatch(tmp_path, monkeypatch, change, match):
  tensors = _mixed()
  path = _write(tmp_path, tensors)
  schema = _schema(tensors)
  with tensorfile.Reader(path) as r:
    assert r.read_tensors(dict(schema))["loss"] == 2.5
  change(schema)
  raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
  counts = _spy_stream(monkeypatch)
  with tensorfile.Reader(path) as r:
    header_bytes = counts[0]
    assert header_bytes == 8 + int.from_bytes(raw[:8], "little") < len(raw)
    with pytest.raises(TFE, match=match):
      r.read_tensors(schema)
    assert counts == [header_bytes]  # no tensor byte was decompressed


def test_schema_check_comes_before_the_data(tmp_path):
  path, tensors = _big_file(tmp_path)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) * 3 // 4])  # the data region is cut short
  schema = _schema(tensors)
  with tensorfile.Reader(path) as r:  # the header is intact
    assert set(r.entries) == set(tensors)
    with pytest.raises(TFE, match="truncated"):
      r.read_tensors(schema)
  schema.pop("zeros")
  with tensorfile.Reader(path) as r, pytest.raises(TFE, match="unexpected tensor 'zeros'"):
    r.read_tensors(schema)


# -- arbitrary input --------------------------------------------------------------------

_VALID = tensorfile.encode({"a/b": np.arange(6, dtype=np.float32).reshape(2, 3),
                            "bf": np.ones((2,), ml_dtypes.bfloat16), "m": np.array([True]),
                            "s": np.int64(3).reshape(()), "z": np.zeros((0,), np.uint8)},
                           metadata={"k": "v"})
_VALID_RAW = zstandard.ZstdDecompressor().decompress(_VALID)


def _mutate(data: bytes, ops) -> bytes:
  b = bytearray(data)
  for kind, pos, value in ops:
    pos %= len(b) + 1
    if kind == "flip" and pos < len(b):
      b[pos] ^= 1 << (value % 8)
    elif kind == "set" and pos < len(b):
      b[pos] = value % 256
    elif kind == "cut":
      del b[pos:]
    elif kind == "insert":
      b[pos:pos] = bytes([value % 256]) * (1 + value % 5)
    elif kind == "delete":
      del b[pos:pos + 1 + value % 5]
    if not b:
      break
  return bytes(b)


_OPS = st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "delete"]),
                          st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4)


def _only_tensorfile_error(path, data):
  path.write_bytes(data)
  try:
    back = tensorfile.read(path)
  except TFE as e:
    assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
    return None
  return back


@hypothesis.settings(max_examples=200, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(data=st.binary(max_size=300))
def test_arbitrary_bytes(tmp_path, data):
  _only_tensorfile_error(tmp_path / "h.safetensors.zst", data)
  _only_tensorfile_error(tmp_path / "h.safetensors.zst", tensorfile._ZSTD_MAGIC + data)


@hypothesis.settings(max_examples=200, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(ops=_OPS, level=st.sampled_from(["zstd", "raw", "header"]))
def test_mutated_valid_file(tmp_path, ops, level):
  if level == "zstd":  # the compressed bytes
    data = _mutate(_VALID, ops)
  elif level == "raw":  # the safetensors bytes, recompressed
    data = _pack(_mutate(_VALID_RAW, ops))
  else:  # the JSON header text, its length prefix kept right
    n = int.from_bytes(_VALID_RAW[:8], "little")
    text = _mutate(_VALID_RAW[8:8 + n], ops)
    data = _pack(_raw(text, _VALID_RAW[8 + n:]))
  back = _only_tensorfile_error(tmp_path / "h.safetensors.zst", data)
  if back is not None and level == "zstd":  # zstd accepted the change: the content is intact
    assert zstandard.ZstdDecompressor().decompress(data) == _VALID_RAW
    assert back["a/b"].tolist() == [[0, 1, 2], [3, 4, 5]]
