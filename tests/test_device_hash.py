"""Tests for aftune.crypto.device_hash: the on-device BLAKE3 tensor hash.

Every test compares digests with the host path (``hashing.hash_array``) or with
the reference ``blake3`` package, so any difference of one bit fails. Compiles
are the cost here (one per chunk-capacity bucket, a cheap one per tensor
shape), so the cases reuse few buckets.
"""

import os
import pathlib
import subprocess
import sys

import blake3
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from aftune.crypto import device_hash as D
from aftune.crypto import hashing as H

REPO = pathlib.Path(__file__).resolve().parents[1]
KIB = 1024
MIB = 1 << 20


def _rand_bytes(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _random_array(shape, dtype, seed: int) -> np.ndarray:
  """Random host array: any bit pattern (NaN payloads included) for non-bool."""
  dt = np.dtype(dtype)
  size = int(np.prod(shape, dtype=np.int64))
  if dt.kind == "b":
    return (np.random.default_rng(seed).integers(0, 2, size) == 1).reshape(shape)
  return _rand_bytes(size * dt.itemsize, seed).view(dt).reshape(shape)


def _device_digest(x) -> bytes:
  d = D.hash_array_on_device(x)
  assert isinstance(d, jax.Array) and d.dtype == jnp.uint8 and d.shape == (32,)
  return bytes(np.asarray(d))


# --- raw BLAKE3 ---------------------------------------------------------------------------

RAW_LENGTHS = [
  0, 1, 63, 64, 65, 1023, 1024, 1025, 2047, 2048, 2049, 3072, 4096 + 1,
  9 * KIB, 9 * KIB - 100, 17 * KIB, 17 * KIB + 1, MIB + 1,
]  # fmt: skip
# (MIB + 1: 1025 chunks, the capacity bucket the ~1 MiB tensors below compile anyway.)


@pytest.mark.parametrize("length", RAW_LENGTHS)
def test_raw_blake3_matches_reference(length):
  msg = _rand_bytes(length, seed=length)
  got = bytes(np.asarray(D.blake3_message(jnp.asarray(msg))))
  assert got == blake3.blake3(msg.tobytes()).digest()


def test_raw_blake3_known_vector():
  # BLAKE3 of the empty input, from the BLAKE3 specification's test vectors.
  empty = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
  assert bytes(np.asarray(D.blake3_message(jnp.zeros((0,), jnp.uint8)))).hex() == empty


def test_tree_every_chunk_count_in_one_bucket():
  """Chunk counts 1..64 (several last-chunk lengths) through one compiled capacity.

  Checks the pairing/carry tree against BLAKE3's left-balanced tree for each
  count, and that lanes past the real chunks (filled with junk here) cannot
  change the digest.
  """
  cap = 64
  junk = _rand_bytes(cap * KIB, seed=1)
  src = _rand_bytes(cap * KIB, seed=2)
  for n in range(1, cap + 1):
    for last_len in sorted({1, 64, 65, 1000, 1024} if n < cap else {1, 1024}):
      length = (n - 1) * KIB + last_len
      padded = junk.copy()
      padded[: n * KIB] = 0
      padded[:length] = src[:length]
      got = D._blake3_padded_jit(jnp.asarray(padded), np.uint32(n), np.uint32(last_len))
      want = blake3.blake3(src[:length].tobytes()).digest()
      assert bytes(np.asarray(got)) == want, (n, last_len)


def test_capacity_buckets():
  assert [D.capacity(n) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
  assert D.capacity(1025) == 1536 and D.capacity(1024) == 1024
  for n in range(1, 5000):
    c = D.capacity(n)
    assert n <= c < 1.5 * n + 1
  with pytest.raises(ValueError):
    D.capacity(0)


# --- tensors ------------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", RAW_LENGTHS)
def test_uint8_tensor_sizes(nbytes):
  a = _rand_bytes(nbytes, seed=nbytes + 7)
  assert _device_digest(jnp.asarray(a)) == H.hash_array(a)


@pytest.mark.parametrize("message_len", [1024, 1025, 2048, 2049, 4096])
def test_message_length_on_chunk_boundary(message_len):
  # The header length is not a multiple of 4 or 64: place the end exactly.
  head = len(D.tensor_message_prefix(np.uint8, (0,)))
  assert head % 4 != 0
  a = _rand_bytes(message_len - head, seed=message_len)
  assert len(D.tensor_message_prefix(np.uint8, a.shape)) == head
  assert _device_digest(jnp.asarray(a)) == H.hash_array(a)


DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16, np.int32, np.uint8, np.bool_]
SHAPES = [(), (0,), (3, 5, 7)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_dtypes_and_shapes(dtype, shape):
  a = _random_array(shape, dtype, seed=len(shape) + 11)
  x = jnp.asarray(a)
  assert x.dtype == a.dtype
  want = H.hash_array(a)
  assert H.hash_array(x) == want
  assert _device_digest(x) == want
  assert D.digest_bytes(x) == want


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int32])
def test_multi_chunk_tensors(dtype):
  # 9 and 17 chunks of data (plus header), and 1 MiB.
  for n in [9 * KIB, 17 * KIB + 3]:
    a = _random_array((n // np.dtype(dtype).itemsize,), dtype, seed=n)
    assert _device_digest(jnp.asarray(a)) == H.hash_array(a), n
  if dtype is np.float32:
    a = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)
    assert _device_digest(jnp.asarray(a)) == H.hash_array(a)


def test_other_dtypes_and_layouts():
  cases = [
    jnp.arange(3, dtype=jnp.complex64) * (1 + 2j),
    jnp.arange(5, dtype=jnp.float8_e4m3fn),
    jnp.arange(6, dtype=jnp.int16).reshape(2, 3).T,  # a transposed (logical C order) value
    jnp.arange(24, dtype=jnp.int8).reshape(2, 3, 4)[:, ::2, 1:],
    jnp.asarray(_random_array((4, 4), np.uint32, seed=5)),
  ]
  for x in cases:
    assert _device_digest(x) == H.hash_array(np.asarray(x)), x.dtype
  a = _random_array((2, 3), np.float32, seed=9)
  assert _device_digest(a) == H.hash_array(a)  # numpy input is put on device


def test_64_bit_dtypes():
  with jax.enable_x64(True):
    for dtype in [np.int64, np.uint64, np.float64]:
      a = _random_array((3, 5), dtype, seed=3)
      assert _device_digest(jnp.asarray(a)) == H.hash_array(a), dtype


def test_inside_jit_is_fused_and_equal():
  x = jnp.asarray(_random_array((40, 30), np.float32, seed=4))

  @jax.jit
  def step(a):
    b = a * 2 + 1
    return b, D.hash_array_on_device(b)

  b, digest = step(x)
  assert bytes(np.asarray(digest)) == H.hash_array(b)


def test_digest_differs_on_one_bit():
  a = _rand_bytes(3000, seed=8)
  b = a.copy()
  b[2999] ^= 1
  assert _device_digest(jnp.asarray(a)) != _device_digest(jnp.asarray(b))
  assert _device_digest(jnp.asarray(b)) == H.hash_array(b)
  # Same bytes, other dtype/shape: the header must separate them.
  assert _device_digest(jnp.asarray(a[:2000].view(np.int16))) != _device_digest(
    jnp.asarray(a[:2000])
  )


def test_rejects_what_it_cannot_hash_identically():
  with pytest.raises(TypeError, match="hash_key"):
    D.hash_array_on_device(jax.random.key(0))
  with pytest.raises(TypeError, match="float64"):
    D.hash_array_on_device(np.zeros(3, np.float64))  # x64 off: jax would make it float32
  with pytest.raises(NotImplementedError):
    D.hash_array_on_device(jnp.zeros(3, jnp.int4))
  with pytest.raises(TypeError):
    D.hash_array_on_device(1.5)
  with pytest.raises(TypeError):
    D.blake3_message(jnp.zeros(3, jnp.int32))


_HYP_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.int32, np.uint8, np.int8, np.bool_]


@settings(max_examples=50, deadline=None)
@given(
  dtype=st.sampled_from(_HYP_DTYPES),
  shape=st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple),
  seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_random_small_arrays(dtype, shape, seed):
  a = _random_array(shape, dtype, seed)
  assert _device_digest(jnp.asarray(a)) == H.hash_array(a)


# --- sharded arrays (needs several devices: a subprocess with 2 host devices) --------------

_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from aftune.crypto import device_hash as D, hashing as H
a = jnp.arange(48, dtype=jnp.float32).reshape(8, 6)
for kind in (AxisType.Explicit, AxisType.Auto):
  mesh = jax.make_mesh((2,), ("d",), axis_types=(kind,))
  x = jax.device_put(a, NamedSharding(mesh, P("d")))
  assert D.digest_bytes(x) == H.hash_array(a), kind
print("ok")
"""


def test_sharded_array_hashes_its_global_value():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run(
    [sys.executable, "-c", _SHARDED],
    check=False,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
