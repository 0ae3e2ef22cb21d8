"""Tests for aftune.hashing: test vectors, canonical forms, independence of layout."""

import os
import pathlib
import struct
import subprocess
import sys

import blake3
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from aftune.crypto import hashing as H

REPO = pathlib.Path(__file__).resolve().parents[1]

# Literal vectors, also printed in docs/hashing.md: a change of byte layout
# must fail here and be re-documented there.
VEC_F32 = "e7b1cc9763f14e2f4653d3120666366f92c7d6acf3e0301e644cc522ec79c19e"
VEC_F32_PREIMAGE = (
  "1000000000000000616674756e652f76312f74656e736f72"
  "0700000000000000666c6f61743332020000000000000002000000000000000300000000000000"
  "000000000000803f0000004000004040000080400000a040"
)
VEC_BF16 = "eb2412016ce7cdf507a7f17678132f2daf5f9740edd5bd978d58c343c034f661"
VEC_I32_SCALAR = "2e90c234085e82f6987c1600d887eeb39ae7271ef0d82d547677af7363856946"
VEC_KEY0 = "2f0b4cba17890653eeaac9f51155a222b02fe3cd8405ff5134e9326ee5878043"
VEC_TREE = "8d95f29a49b5b649cdbf40315025c2910deba685eae595cf5b5d3f45108f3cd2"
VEC_TREE_LEAVES = [
  ("a/0", "669bfd4ee2df76f149b7d8bf5e62a8119ee583294da27aa86049a0134115debd"),
  ("a/2", "2591a4bce5b74eb851bba19801a2c656dd493443c0e309d88eeb99918f225dc8"),
  ("b", "bbdd20007b47d85d4b135232c8cebe9e4b348826f6ec8fec105df1ffad6de059"),
]
VEC_BATCH = "82c4175f7271a9037d47ca878ac22c03bf8bd9f5634d414d5837801d4627ee75"
VEC_JSON_BYTES = '{"a":"é","b":[1,2.5,null,true],"c":{"y":1e+16,"z":1e-05}}'
VEC_JSON = "d6d3aae5972fccdcad3b0c554e132b2cfc59f21d8dd67e7ebb7eda5c0dd406fe"


def vector_tree():
  return {
    "b": np.array([1, 2], np.int32),
    "a": [np.float32(0.5), None, np.zeros((0,), np.float32)],
  }


def vector_batch():
  return {
    "tokens": np.array([[1, 2, 3]], np.int32),
    "mask": np.array([[True, True, False]]),
  }


def vector_doc():
  return {"b": [1, 2.5, None, True], "a": "é", "c": {"z": 1e-05, "y": 1e16}}


# --- an independent reimplementation written from docs/hashing.md ----------


def ref_tensor_body(name: str, shape, raw: bytes) -> bytes:
  out = struct.pack("<Q", len(name)) + name.encode() + struct.pack("<Q", len(shape))
  return out + b"".join(struct.pack("<Q", d) for d in shape) + raw


def ref_path(comps) -> bytes:
  out = struct.pack("<Q", len(comps))
  for c in comps:
    b = c.encode()
    out += struct.pack("<Q", len(b)) + b
  return out


def test_vectors_in_doc(hashing_doc):
  for v in [
    VEC_F32,
    VEC_F32_PREIMAGE,
    VEC_BF16,
    VEC_I32_SCALAR,
    VEC_KEY0,
    VEC_TREE,
    VEC_BATCH,
    VEC_JSON_BYTES,
    VEC_JSON,
  ] + [d for _, d in VEC_TREE_LEAVES]:
    assert v in hashing_doc, f"vector {v[:16]}... missing from docs/hashing.md"


def test_tensor_vectors(ref_h):
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  assert H.hash_array(a).hex() == VEC_F32
  assert blake3.blake3(bytes.fromhex(VEC_F32_PREIMAGE)).hexdigest() == VEC_F32
  assert H.hash_array(jnp.asarray(a)).hex() == VEC_F32
  bf = np.array([1.0, -2.5, 0.0], dtype=ml_dtypes.bfloat16)
  assert H.hash_array(bf).hex() == VEC_BF16
  assert H.hash_array(jnp.asarray(bf)).hex() == VEC_BF16
  raw_bf16 = bytes.fromhex("803f20c00000")
  assert ref_h(H.TAG_TENSOR, ref_tensor_body("bfloat16", (3,), raw_bf16)).hex() == VEC_BF16
  assert H.hash_array(np.int32(7)).hex() == VEC_I32_SCALAR
  assert H.hash_array(np.array(7, np.int32)).hex() == VEC_I32_SCALAR
  assert H.hash_scalar(7, np.int32).hex() == VEC_I32_SCALAR
  assert H.hash_array(jnp.int32(7)).hex() == VEC_I32_SCALAR
  raw_i32 = struct.pack("<i", 7)
  assert ref_h(H.TAG_TENSOR, ref_tensor_body("int32", (), raw_i32)).hex() == VEC_I32_SCALAR


def test_key_vector(ref_h):
  key = jax.random.key(0)
  assert H.hash_key(key).hex() == VEC_KEY0
  assert H.hash_array(key).hex() == VEC_KEY0
  impl = b"threefry2x32"
  body = struct.pack("<Q", len(impl)) + impl + ref_tensor_body("uint32", (2,), bytes(8))
  assert ref_h(H.TAG_KEY, body).hex() == VEC_KEY0
  # The raw key data hashed as a tensor is a different object.
  assert H.hash_array(jax.random.key_data(key)).hex() != VEC_KEY0
  assert H.hash_key(jax.random.key(1)) != H.hash_key(key)
  assert H.hash_key(jax.random.key(0, impl="rbg")) != H.hash_key(key)
  keys = jax.random.split(key, 3)
  assert H.hash_key(keys) != H.hash_key(keys[:2])
  with pytest.raises(TypeError, match="typed key"):
    H.hash_key(jax.random.PRNGKey(0))


def test_pytree_vector(ref_h):
  tree = vector_tree()
  assert H.hash_pytree(tree).hex() == VEC_TREE
  leaves = H.pytree_leaf_hashes(tree)
  assert [(H.path_str(p), d.hex()) for p, d in leaves] == VEC_TREE_LEAVES
  body = struct.pack("<Q", 3) + b"".join(
    ref_path(tuple(p.split("/"))) + bytes.fromhex(d) for p, d in VEC_TREE_LEAVES
  )
  assert ref_h(H.TAG_PYTREE, body).hex() == VEC_TREE
  assert H.hash_leaf_digests(list(reversed(leaves))).hex() == VEC_TREE
  assert H.hash_batch(vector_batch()).hex() == VEC_BATCH
  # Same leaves, pytree tag: a batch is a distinct kind of object.
  assert H.hash_pytree(vector_batch()).hex() != VEC_BATCH


def test_json_vector(ref_h):
  assert H.canonical_json_bytes(vector_doc()) == VEC_JSON_BYTES.encode("utf-8")
  assert H.hash_json(vector_doc()).hex() == VEC_JSON
  assert ref_h(H.TAG_JSON, VEC_JSON_BYTES.encode("utf-8")).hex() == VEC_JSON


def test_json_rejects_ambiguous():
  for bad in [float("nan"), float("inf"), {"a": -float("inf")}]:
    with pytest.raises(ValueError):
      H.canonical_json_bytes(bad)
  with pytest.raises(TypeError):
    H.canonical_json_bytes({1: "int key"})
  with pytest.raises(TypeError):
    H.canonical_json_bytes({"a": b"bytes"})
  with pytest.raises(TypeError):
    H.canonical_json_bytes({"a": np.int64(1)})
  with pytest.raises(ValueError):
    H.canonical_json_bytes("\ud800")  # lone surrogate has no UTF-8 form
  assert H.canonical_json_bytes({"b": (1, 2), "a": 1.0}) == b'{"a":1.0,"b":[1,2]}'
  assert H.hash_json({"a": 1}) != H.hash_json({"a": 1.0})


def test_dtype_and_shape_matter():
  z32 = np.zeros(4, np.float32)
  assert H.hash_array(z32) != H.hash_array(np.zeros(4, np.int32))
  assert H.hash_array(z32) != H.hash_array(z32.reshape(2, 2))
  assert H.hash_array(z32) != H.hash_array(z32.reshape(1, 4))
  assert H.hash_array(np.zeros((0, 3))) != H.hash_array(np.zeros((3, 0)))
  assert H.hash_array(np.float32(1)) != H.hash_array(np.ones(1, np.float32))
  assert H.hash_array(np.ones((1, 1), np.float32)) != H.hash_array(np.ones(1, np.float32))
  assert H.hash_array(np.zeros(2, np.float16)) != H.hash_array(np.zeros(2, ml_dtypes.bfloat16))
  # A tensor never collides with raw bytes or JSON that contain its body.
  a = np.arange(4, dtype=np.uint8)
  assert H.hash_array(a) != H.hash_bytes(H.TAG_JSON, a.tobytes())


def test_canonical_layout_and_endianness():
  a = np.arange(12, dtype=np.float64).reshape(3, 4)
  want = H.hash_array(a)
  assert H.hash_array(np.asfortranarray(a)) == want
  assert H.hash_array(a.T.copy().T) == want  # F-ordered view of the same values
  assert H.hash_array(a.astype(">f8")) == want
  wide = np.full((3, 8), -1.0)
  wide[:, ::2] = a
  strided = wide[:, ::2]
  assert not strided.flags.c_contiguous
  assert H.hash_array(strided) == want
  assert H.hash_array(np.arange(5, dtype=">i4")) == H.hash_array(np.arange(5, dtype="<i4"))


def test_rejects_python_scalars_and_objects():
  for bad in [1, 1.0, True, [1, 2], "x", np.array(["a"]), np.array([object()])]:
    with pytest.raises(TypeError):
      H.hash_array(bad)
  with pytest.raises(TypeError, match="leaf 'a'"):
    H.hash_pytree({"a": 1.0})
  with pytest.raises(ValueError):
    H.hash_scalar(1.5, np.int32)
  with pytest.raises(ValueError):
    H.hash_scalar(300, np.int8)
  with pytest.raises(ValueError):
    H.hash_scalar(2, np.bool_)
  assert H.hash_scalar(0.5, np.float32) == H.hash_array(np.float32(0.5))

  @jax.jit
  def f(x):
    H.hash_array(x)
    return x

  with pytest.raises(TypeError, match="traced"):
    f(jnp.ones(2))


def test_names_matter_in_pytrees():
  x, y = np.ones(2, np.float32), np.zeros(2, np.float32)
  assert H.hash_pytree({"a": x, "b": y}) != H.hash_pytree({"a": y, "b": x})
  assert H.hash_pytree({"a": x}) != H.hash_pytree({"b": x})
  assert H.hash_pytree({"a": {"b": x}}) != H.hash_pytree({"a/b": x})
  assert H.hash_pytree({"ab": x}) != H.hash_pytree({"a": {"b": x}})
  assert H.hash_pytree([x, y]) != H.hash_pytree([y, x])
  # Documented equalities: containers are not hashed, only path texts.
  assert H.hash_pytree([x]) == H.hash_pytree({"0": x}) == H.hash_pytree((x,))
  assert H.hash_pytree({"a": x, "n": None}) == H.hash_pytree({"a": x})
  assert H.hash_pytree({}) == H.hash_pytree([]) == H.hash_pytree(None)
  # Order of insertion and list length >= 10 (textual order "10" < "2").
  big = [np.full(1, i, np.int32) for i in range(12)]
  assert H.hash_pytree(big) != H.hash_pytree(big[::-1])
  d = {"z": x, "a": y}
  assert H.hash_pytree(d) == H.hash_pytree(dict(reversed(list(d.items()))))


def test_jax_tree_and_nnx_state():
  from flax import nnx

  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(2, 3, rngs=rngs)
      self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(2)])

  state = nnx.state(Tiny(nnx.Rngs(0)))
  pure = nnx.to_pure_dict(state)
  assert H.hash_pytree(state) == H.hash_pytree(pure)
  assert H.hash_pytree({"params": state}) == H.hash_pytree({"params": pure})
  host = jax.tree_util.tree_map(np.asarray, pure)
  assert H.hash_pytree(host) == H.hash_pytree(pure)
  paths = [H.path_str(p) for p, _ in H.pytree_leaf_hashes(pure)]
  assert paths == [
    "layers/0/bias",
    "layers/0/kernel",
    "layers/1/bias",
    "layers/1/kernel",
    "lin/bias",
    "lin/kernel",
  ]
  # Typed keys inside a tree hash like hash_key.
  key = jax.random.key(0)
  ((p, d),) = H.pytree_leaf_hashes({"rng": key})
  assert p == ("rng",) and d.hex() == VEC_KEY0


def test_threads_do_not_change_digest():
  a = np.random.default_rng(0).standard_normal((1 << 19,)).astype(np.float32)  # 2 MiB
  assert H.hash_array(a, max_threads=1) == H.hash_array(a, max_threads=blake3.blake3.AUTO)
  assert H.hash_array(a) == H.hash_array(a, max_threads=1)


def test_independent_of_device_and_sharding():
  a = np.arange(32, dtype=np.float32).reshape(4, 8)
  want = H.hash_array(a)
  dev = jax.devices()[-1]
  assert H.hash_array(jax.device_put(a, dev)) == want
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
  sharded = jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
  assert H.hash_array(sharded) == want


_SHARDED_SCRIPT = """
import numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from aftune.crypto import hashing as H
assert len(jax.devices()) == 2, jax.devices()
a = np.arange(64, dtype=np.float32).reshape(8, 8)
want = H.hash_array(a)
mesh = Mesh(np.array(jax.devices()), ("x",))
for spec in [P("x"), P(None, "x"), P()]:
    assert H.hash_array(jax.device_put(a, NamedSharding(mesh, spec))) == want, spec
assert H.hash_array(jax.device_put(a, jax.devices()[1])) == want
tree = {"w": jax.device_put(a, NamedSharding(mesh, P("x")))}
assert H.hash_pytree(tree) == H.hash_pytree({"w": a})
print("ok")
"""


def test_independent_of_sharding_two_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run(
    [sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "ok"


def test_batch_requires_mapping():
  with pytest.raises(TypeError):
    H.hash_batch([np.ones(2)])


def test_hex_helpers():
  d = H.hash_bytes(H.TAG_JSON, b"x")
  assert H.from_hex(H.hexdigest(d)) == d
  with pytest.raises(ValueError):
    H.from_hex("00" * 31)
  with pytest.raises(ValueError):
    H.from_hex("zz")
  with pytest.raises(ValueError):
    H.hash_bytes(b"", b"x")
