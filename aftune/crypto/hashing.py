"""Canonical, domain-separated BLAKE3 hashing of tensors, keys, pytrees and JSON.

Every digest is 32 bytes of BLAKE3 over

    u64le(len(tag)) || tag || body

where ``tag`` is one ASCII tag per kind of object (``TAG_*`` below). Because the
tag comes first and is length-prefixed, no body of one kind can be read as a body
of another kind. The exact byte layouts, with test vectors, are in
``docs/hashing.md``; that document and this module must change together.

The module imports jax lazily: a jax array can only exist if jax is already
imported, so tools that only hash JSON (signature checks) stay fast to start.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import blake3
import numpy as np

DIGEST_SIZE = 32

TAG_TENSOR = b"aftune/v1/tensor"
TAG_KEY = b"aftune/v1/key"
TAG_PYTREE = b"aftune/v1/pytree"
TAG_BATCH = b"aftune/v1/batch"
TAG_JSON = b"aftune/v1/json"
TAG_LEAF = b"aftune/v1/leaf"
TAG_NODE = b"aftune/v1/node"
TAG_EMPTY_TREE = b"aftune/v1/empty-tree"
TAG_TENSOR_TREE = b"aftune/v1/tensor-tree"
TAG_TENSOR_CHUNK = b"aftune/v1/tensor-chunk"
TAG_TENSOR_NODE = b"aftune/v1/tensor-node"

# Bytes this process copied from devices to the host to hash them (a benchmark counter).
BYTES_FETCHED = [0]

# Tensors larger than this are hashed in the tree form (row chunks of at most this many
# bytes under a Merkle tree), so that a host can hash the rows it holds without the rest.
CHUNK_BYTES = 1 << 16

# BLAKE3 output does not depend on the thread count (it is a fixed tree hash),
# so threading is purely a speed choice. Measured on 2 x86 cores (blake3
# 1.0.11): with idle cores, all threads (AUTO_THREADS) is ~1.6-1.8x faster from
# 1 MiB up and ~2x slower at 64 KiB; with the cores busy (training beside the
# recorder) it is ~10% slower. So the default is one thread, and a caller on an
# idle machine (a verifier hashing a checkpoint) may pass AUTO_THREADS, which is
# then used only for tensors of at least MULTITHREAD_MIN_BYTES.
AUTO_THREADS = blake3.blake3.AUTO
MULTITHREAD_MIN_BYTES = 1 << 20

_U64 = struct.Struct("<Q")


def u64le(n: int) -> bytes:
  """Encodes a non-negative integer as 8 little-endian bytes."""
  return _U64.pack(n)


def _prefix(tag: bytes) -> bytes:
  """Returns the length-prefixed tag that starts every hashed message."""
  if not isinstance(tag, bytes) or not tag or not tag.isascii():
    raise ValueError(f"hash tag must be non-empty ASCII bytes, got {tag!r}")
  return u64le(len(tag)) + tag


def _hasher(tag: bytes, max_threads: int = 1) -> Any:
  """A BLAKE3 hasher already fed with the tag prefix."""
  h = blake3.blake3(max_threads=max_threads)
  h.update(_prefix(tag))
  return h


def _threads_for(nbytes: int, max_threads: int) -> int:
  """Thread count for one tensor: small ones never pay thread start-up."""
  return max_threads if nbytes >= MULTITHREAD_MIN_BYTES else 1


def hexdigest(digest: bytes) -> str:
  """Lower-case hex of a digest (or any bytes)."""
  return bytes(digest).hex()


def from_hex(text: str, length: int | None = DIGEST_SIZE) -> bytes:
  """Parses hex into bytes, checking the length (None: any length).

  Args:
    text: hex string (either case).
    length: required number of bytes, or None.

  Returns:
    The decoded bytes.

  Raises:
    ValueError: not hex, or the wrong length.
  """
  if not isinstance(text, str):
    raise ValueError(f"expected a hex string, got {type(text).__name__}")
  try:
    out = bytes.fromhex(text)
  except ValueError as e:
    raise ValueError(f"not a hex string: {text[:80]!r}") from e
  if length is not None and len(out) != length:
    raise ValueError(f"expected {length} bytes of hex, got {len(out)}")
  return out


def hash_bytes(tag: bytes, data: bytes | bytearray | memoryview) -> bytes:
  """Hashes raw bytes under a domain tag.

  Args:
    tag: ASCII domain tag, e.g. ``TAG_JSON``.
    data: the body (any C-contiguous buffer).

  Returns:
    32-byte digest of ``u64le(len(tag)) || tag || data``.
  """
  h = _hasher(tag)
  h.update(data)
  return h.digest()


# --------------------------------------------------------------------------
# Tensors and keys
# --------------------------------------------------------------------------


def _jax() -> Any:
  """The jax module if it has been imported, else None (see module doc)."""
  return sys.modules.get("jax")


def _is_jax_array(x: Any) -> bool:
  jax = _jax()
  return jax is not None and isinstance(x, jax.Array)


def _is_prng_key(x: Any) -> bool:
  jax = _jax()
  return (
    jax is not None
    and isinstance(x, jax.Array)
    and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  )


def _check_dtype(dt: np.dtype) -> None:
  """Accepts plain numeric dtypes and the ml_dtypes ones (bfloat16, float8...)."""
  if dt.fields is not None or dt.subdtype is not None:
    raise TypeError(f"cannot hash structured/sub-array dtype {dt}")
  if dt.kind in "biufc":
    return
  if dt.type.__module__.split(".")[0] == "ml_dtypes":
    return
  raise TypeError(f"cannot hash arrays of dtype {dt} (numeric dtypes only)")


def _canonical_host_array(a: np.ndarray) -> np.ndarray:
  """Little-endian, C-contiguous version of ``a`` (no copy when already so)."""
  dt = a.dtype
  _check_dtype(dt)
  big = dt.byteorder == ">" or (dt.byteorder == "=" and sys.byteorder == "big")
  if big:
    if dt.kind not in "biufc":
      raise NotImplementedError(f"big-endian {dt} is not supported")
    a = a.astype(dt.newbyteorder("<"))
  # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,).
  return a if a.flags.c_contiguous else a.copy(order="C")


def _tensor_body_header(dtype_name: str, shape: Sequence[int]) -> bytes:
  name = dtype_name.encode("ascii")
  parts = [u64le(len(name)), name, u64le(len(shape))]
  parts.extend(u64le(int(d)) for d in shape)
  return b"".join(parts)


def _update_with_tensor(h: Any, a: np.ndarray) -> None:
  """Feeds dtype/shape header and raw bytes of a canonical host array."""
  h.update(_tensor_body_header(a.dtype.name, a.shape))
  if a.size:
    # A uint8 view of a C-contiguous array is zero-copy; blake3 rejects
    # float buffers directly (BufferError), so this view is required.
    h.update(a.reshape(-1).view(np.uint8))


def _host(x: Any) -> np.ndarray:
  """Converts a numpy/jax array or numpy scalar to a host numpy array."""
  if isinstance(x, np.ndarray):
    return x
  if isinstance(x, np.generic):
    return np.asarray(x)
  if _is_jax_array(x):
    jax = _jax()
    if isinstance(x, getattr(jax.core, "Tracer", ())):
      raise TypeError("cannot hash a traced value inside jit/vmap/grad")
    # device_get gathers every shard, so the digest cannot depend on the
    # sharding or the device the array lives on.
    host = np.asarray(jax.device_get(x))
    BYTES_FETCHED[0] += host.nbytes
    return host
  if isinstance(x, (bool, int, float, complex)):
    raise TypeError(
      f"refusing to hash python {type(x).__name__} {x!r}: its dtype is "
      "ambiguous; use hash_scalar(value, dtype) or pass a numpy/jax array"
    )
  raise TypeError(f"cannot hash object of type {type(x).__name__} as an array")


def _digest_host_tensor(a: np.ndarray, max_threads: int) -> bytes:
  a = _canonical_host_array(a)
  rows = chunk_rows(a.dtype, a.shape)
  if rows is None:
    h = _hasher(TAG_TENSOR, _threads_for(a.nbytes, max_threads))
    _update_with_tensor(h, a)
    return h.digest()
  n = num_chunks(a.shape, rows)
  leaves = [hash_chunk(a[j * rows:(j + 1) * rows]) for j in range(n)]
  return tree_digest(a.dtype.name, a.shape, rows, chunk_tree_root({(j, 1): d for j, d in enumerate(leaves)}, n))


# --------------------------------------------------------------------------
# The tree form of large tensors (docs/hashing.md, "Large tensors")
# --------------------------------------------------------------------------


def chunk_rows(dtype: Any, shape: Sequence[int]) -> int | None:
  """Rows per chunk of the tree form, or None when the tensor is hashed whole (flat form).

  A tensor of more than ``CHUNK_BYTES`` bytes is cut along its first axis into chunks of
  ``c`` rows, ``c`` the largest power of two with ``c * row_bytes <= CHUNK_BYTES`` (at
  least 1). Only the dtype and shape decide it, never the layout: that is what makes the
  digest the same on one device and on any mesh.
  """
  shape = tuple(int(d) for d in shape)
  itemsize = np.dtype(dtype).itemsize
  if not shape or math.prod(shape) * itemsize <= CHUNK_BYTES:
    return None
  row = math.prod(shape[1:]) * itemsize
  c = 1
  while 2 * c * row <= CHUNK_BYTES:
    c *= 2
  return c


def num_chunks(shape: Sequence[int], rows: int) -> int:
  return -(-int(shape[0]) // rows)


def hash_chunk(rows: np.ndarray) -> bytes:
  """Leaf of the tree form: ``H(TAG_TENSOR_CHUNK, raw bytes of the chunk's rows)``."""
  a = _canonical_host_array(rows)
  h = _hasher(TAG_TENSOR_CHUNK)
  if a.size:
    h.update(a.reshape(-1).view(np.uint8))
  return h.digest()


def chunk_node(left: bytes, right: bytes) -> bytes:
  return hash_bytes(TAG_TENSOR_NODE, left + right)


def _pow2_below(n: int) -> int:
  return 1 << ((n - 1).bit_length() - 1)


def aligned_pieces(lo: int, hi: int) -> list[tuple[int, int]]:
  """[lo, hi) as (start, size) pieces of power-of-two size aligned to their size: each is
  a complete subtree of the chunk tree of any n >= hi chunks (the tree splits every range
  at the largest power of two below its length, like RFC 6962)."""
  out = []
  while lo < hi:
    size = lo & -lo if lo else 1 << ((hi - lo).bit_length() - 1)
    while lo + size > hi:
      size //= 2
    out.append((lo, size))
    lo += size
  return out


def subtree(leaves: Sequence[bytes]) -> bytes:
  """Root of a run of chunk leaves (the tree's split rule)."""
  if len(leaves) == 1:
    return leaves[0]
  k = _pow2_below(len(leaves))
  return chunk_node(subtree(leaves[:k]), subtree(leaves[k:]))


def chunk_tree_root(nodes: Mapping[tuple[int, int], bytes], n: int) -> bytes:
  """Root of the chunk tree of n leaves from complete subtrees {(start, size): digest}
  that cover [0, n) (each host's part; `aligned_pieces` of its rows)."""

  def root(lo: int, hi: int) -> bytes:
    got = nodes.get((lo, hi - lo))
    if got is not None:
      return got
    if hi - lo == 1:
      raise ValueError(f"no digest covers chunk {lo} of {n}")
    k = _pow2_below(hi - lo)
    return chunk_node(root(lo, lo + k), root(lo + k, hi))

  return root(0, n)


def tree_digest(dtype_name: str, shape: Sequence[int], rows: int, root: bytes) -> bytes:
  """``H(TAG_TENSOR_TREE, header || u64le(rows per chunk) || root)``."""
  return hash_bytes(TAG_TENSOR_TREE, _tensor_body_header(dtype_name, shape) + u64le(rows) + root)


def _digest_host_key(impl: str, data: np.ndarray, max_threads: int) -> bytes:
  data = _canonical_host_array(data)
  h = _hasher(TAG_KEY, _threads_for(data.nbytes, max_threads))
  name = impl.encode("ascii")
  h.update(u64le(len(name)) + name)
  _update_with_tensor(h, data)
  return h.digest()


def key_impl_name(key: Any) -> str:
  """Stable name of a typed key's PRNG implementation, e.g. "threefry2x32".

  Args:
    key: a typed key array (``jax.random.key``).

  Returns:
    ``str(jax.random.key_impl(key))`` -- the registered implementation name
    ("threefry2x32", "rbg", "unsafe_rbg").
  """
  jax = _jax()
  return str(jax.random.key_impl(key))


def hash_key(key: Any, *, max_threads: int = 1) -> bytes:
  """Hashes a typed PRNG key array: implementation name plus key data.

  Args:
    key: a typed key array from ``jax.random.key`` (any shape). Raw uint32
      keys (``jax.random.PRNGKey``) are rejected: wrap them with
      ``jax.random.wrap_key_data`` so the implementation is explicit.
    max_threads: BLAKE3 threads (``AUTO_THREADS``: all cores).

  Returns:
    32-byte digest (tag ``TAG_KEY``).
  """
  if not _is_prng_key(key):
    raise TypeError(
      "hash_key needs a typed key (jax.random.key); got "
      f"{type(key).__name__} with dtype {getattr(key, 'dtype', None)}"
    )
  jax = _jax()
  data = _host(jax.random.key_data(key))
  return _digest_host_key(key_impl_name(key), data, max_threads)


def hash_rows(x: Any) -> list[bytes]:
  """``[hash_array(x[i:i+1]) for i in range(len(x))]``: each row keeping the leading axis
  (a served batch's per-request leaves), the array fetched and canonicalised once."""
  a = _canonical_host_array(_host(x))
  if a.ndim < 1:
    raise ValueError("hash_rows needs an array with a leading axis")
  if a.shape[0] == 0:
    return []
  if chunk_rows(a.dtype, (1,) + a.shape[1:]) is not None:  # large rows: the tree form
    return [_digest_host_tensor(a[i:i + 1], 1) for i in range(a.shape[0])]
  header = _tensor_body_header(a.dtype.name, (1,) + a.shape[1:])
  flat = a.reshape(a.shape[0], -1).view(np.uint8)
  out = []
  for i in range(a.shape[0]):
    h = _hasher(TAG_TENSOR)
    h.update(header)
    if flat.shape[1]:
      h.update(flat[i])
    out.append(h.digest())
  return out


def hash_key_rows(keys: Any) -> list[bytes]:
  """``[hash_key(keys[i]) for i in range(len(keys))]`` of a key array [B], with the key
  data fetched once (a served batch's per-request keys)."""
  if not _is_prng_key(keys) or keys.ndim < 1:
    raise TypeError("hash_key_rows needs a typed key array with a leading axis")
  jax = _jax()
  data, impl = _host(jax.random.key_data(keys)), key_impl_name(keys)
  return [_digest_host_key(impl, data[i], 1) for i in range(data.shape[0])]


def hash_array(x: Any, *, max_threads: int = 1) -> bytes:
  """Hashes a tensor: dtype name, rank, shape and little-endian C-order bytes.

  Args:
    x: numpy array, numpy scalar or jax Array (any device/sharding). Typed
      PRNG key arrays are hashed with ``hash_key``. Python scalars raise
      TypeError (use ``hash_scalar``).
    max_threads: BLAKE3 threads for tensors of at least
      ``MULTITHREAD_MIN_BYTES`` (``AUTO_THREADS``: all cores); the digest is
      the same for any value.

  Returns:
    32-byte digest (tag ``TAG_TENSOR``).
  """
  if _is_prng_key(x):
    return hash_key(x, max_threads=max_threads)
  if _is_sharded(x):
    from aftune.crypto import shards  # noqa: PLC0415  (needs jax, which is imported here)
    return shards.hash_sharded(x)
  return _digest_host_tensor(_host(x), max_threads)


def _is_sharded(x: Any) -> bool:
  """A jax array over several devices: hashed shard by shard (aftune/crypto/shards.py)."""
  jax = _jax()
  if not _is_jax_array(x) or isinstance(x, getattr(jax.core, "Tracer", ())):
    return False
  if not x.is_fully_addressable:
    raise TypeError("this array spans other processes: each hashes its part "
                    "(shards.local_part) and one merges them (shards.merge)")
  return len(x.sharding.device_set) > 1


def hash_scalar(value: bool | int | float, dtype: Any) -> bytes:
  """Hashes a python scalar as a 0-d tensor of an explicit dtype.

  Args:
    value: python number.
    dtype: numpy dtype (or name) to store it in, e.g. ``np.float32``.

  Returns:
    ``hash_array(np.asarray(value, dtype))``.

  Raises:
    ValueError: the value does not fit the dtype exactly (for integers).
  """
  dt = np.dtype(dtype)
  if dt.kind == "b" and not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{value!r} is not a bool; cannot store as {dt}")
  if dt.kind in "iu" and not isinstance(value, (int, np.integer)):
    raise ValueError(f"{value!r} is not an integer; cannot store as {dt}")
  try:
    a = np.asarray(value, dtype=dt)
  except OverflowError as e:
    raise ValueError(f"{value!r} does not fit {dt}") from e
  if dt.kind in "iu" and int(a) != value:
    raise ValueError(f"{value!r} does not fit {dt}")
  return hash_array(a)


# --------------------------------------------------------------------------
# Pytrees and batches
# --------------------------------------------------------------------------

PathComponents = tuple[str, ...]


def _component(entry: Any) -> str:
  """One key-path entry as text: dict key, sequence index or attribute name."""
  cls = type(entry).__name__
  if cls == "DictKey":
    key = entry.key
    if isinstance(key, str):
      return key
    if isinstance(key, int) and not isinstance(key, bool):
      return str(int(key))  # int(): an IntEnum's str() is its name
    raise TypeError(f"dict key {key!r} must be str or int to be hashed")
  if cls == "SequenceKey":
    return str(int(entry.idx))
  if cls == "GetAttrKey":
    return entry.name
  if cls == "FlattenedIndexKey":
    return str(entry.key)
  raise TypeError(f"unsupported pytree key entry {entry!r}")


def path_components(path: Iterable[Any]) -> PathComponents:
  """Converts a jax key path to its canonical text components.

  Args:
    path: a key path from ``jax.tree_util.tree_flatten_with_path``.

  Returns:
    Tuple of strings: dict keys as themselves (int keys in decimal), sequence
    indices in decimal, attribute names as themselves.
  """
  return tuple(_component(e) for e in path)


def path_str(components: PathComponents) -> str:
  """Human-readable path "a/b/0" (display only; the hash uses components)."""
  return "/".join(components)


def _encode_path(components: PathComponents) -> bytes:
  parts = [u64le(len(components))]
  for c in components:
    b = c.encode("utf-8")
    parts += [u64le(len(b)), b]
  return b"".join(parts)


def _sort_key(components: PathComponents) -> tuple[bytes, ...]:
  return tuple(c.encode("utf-8") for c in components)


def _normalize_nnx(tree: Any) -> Any:
  """Replaces flax ``nnx.State`` nodes by their pure dicts.

  nnx.State key paths end in a ``value`` attribute of each Variable; dropping
  it makes a State hash equal to the hash of its pure dict, so a hash never
  depends on whether a caller held the State or the plain dict.
  """
  if "flax.nnx" not in sys.modules:
    return tree  # no State can exist unless flax.nnx is imported
  from flax import nnx

  def is_state(x: Any) -> bool:
    return isinstance(x, nnx.State)

  # nnx.to_pure_dict where it exists: State.to_pure_dict is deprecated there.
  to_pure = getattr(nnx, "to_pure_dict", None) or (lambda s: s.to_pure_dict())
  if is_state(tree):
    return to_pure(tree)
  jax = _jax()
  return jax.tree_util.tree_map(lambda x: to_pure(x) if is_state(x) else x, tree, is_leaf=is_state)


def _flatten(tree: Any) -> list[tuple[PathComponents, Any]]:
  """Flattens to sorted (components, leaf) pairs; None leaves are skipped."""
  if _jax() is None:
    import jax  # noqa: F401  (needed for tree flattening)
  jax = _jax()
  tree = _normalize_nnx(tree)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  items = [(path_components(p), leaf) for p, leaf in flat]
  items.sort(key=lambda it: _sort_key(it[0]))
  for (a, _), (b, _) in zip(items, items[1:]):
    if a == b:
      raise ValueError(f"two pytree leaves share the path {path_str(a)!r}")
  return items


def pytree_leaf_hashes(tree: Any, *, max_threads: int = 1) -> list[tuple[PathComponents, bytes]]:
  """Per-leaf digests of a pytree, in canonical (sorted) path order.

  Args:
    tree: nested dicts/lists/tuples/flax State of numpy or jax arrays or
      typed keys. None subtrees are skipped. Python scalars raise TypeError.
    max_threads: BLAKE3 threads per leaf (see ``hash_array``).

  Returns:
    List of (path components, 32-byte leaf digest); a leaf digest is
    ``hash_array(leaf)`` (``hash_key`` for typed keys).
  """
  items = _flatten(tree)
  jax = _jax()
  # Typed keys become (impl, key_data); then all device arrays are fetched in
  # one device_get so transfers overlap instead of syncing leaf by leaf.
  impls: list[str | None] = []
  arrays: list[Any] = []
  for comps, leaf in items:
    if _is_prng_key(leaf):
      impls.append(key_impl_name(leaf))
      arrays.append(jax.random.key_data(leaf))
    else:
      impls.append(None)
      arrays.append(leaf)
  sharded = {i: hash_array(a) for i, a in enumerate(arrays) if impls[i] is None and _is_sharded(a)}
  device = [i for i, a in enumerate(arrays) if _is_jax_array(a) and i not in sharded]
  if device:
    fetched = jax.device_get([arrays[i] for i in device])
    for i, a in zip(device, fetched):
      arrays[i] = np.asarray(a)
      BYTES_FETCHED[0] += arrays[i].nbytes
  out = []
  for i, ((comps, _), impl, a) in enumerate(zip(items, impls, arrays)):
    if i in sharded:
      out.append((comps, sharded[i]))
      continue
    try:
      host = _host(a)
    except TypeError as e:
      raise TypeError(f"pytree leaf {path_str(comps)!r}: {e}") from None
    if impl is None:
      digest = _digest_host_tensor(host, max_threads)
    else:
      digest = _digest_host_key(impl, host, max_threads)
    out.append((comps, digest))
  return out


def hash_leaf_digests(
  items: Sequence[tuple[PathComponents, bytes]], *, tag: bytes = TAG_PYTREE
) -> bytes:
  """Combines (path, leaf digest) pairs into a pytree (or batch) digest.

  Lets a recorder that already holds per-tensor digests derive the tree
  digest without hashing the tensors again.

  Args:
    items: (path components, 32-byte digest) pairs, any order.
    tag: ``TAG_PYTREE`` or ``TAG_BATCH``.

  Returns:
    32-byte digest: ``u64le(n) || (enc(path) || digest)*`` in sorted order.
  """
  if tag not in (TAG_PYTREE, TAG_BATCH):
    raise ValueError(f"tag must be TAG_PYTREE or TAG_BATCH, got {tag!r}")
  items = sorted(items, key=lambda it: _sort_key(it[0]))
  h = _hasher(tag)
  h.update(u64le(len(items)))
  prev = None
  for comps, digest in items:
    if comps == prev:
      raise ValueError(f"two leaves share the path {path_str(comps)!r}")
    if len(digest) != DIGEST_SIZE:
      raise ValueError(f"leaf digest for {path_str(comps)!r} is not 32 bytes")
    h.update(_encode_path(comps))
    h.update(digest)
    prev = comps
  return h.digest()


def hash_pytree(tree: Any, *, max_threads: int = 1) -> bytes:
  """Hashes a pytree: every leaf digest bound to its key path.

  Args:
    tree: see ``pytree_leaf_hashes``. Container types are not hashed, only
      path texts: ``{"0": x}``, ``[x]`` and ``{0: x}`` hash equal, and an
      ``nnx.State`` hashes like its ``to_pure_dict()``.
    max_threads: BLAKE3 threads per leaf (see ``hash_array``).

  Returns:
    32-byte digest (tag ``TAG_PYTREE``).
  """
  return hash_leaf_digests(pytree_leaf_hashes(tree, max_threads=max_threads))


def hash_batch(batch: Mapping[str, Any], *, max_threads: int = 1) -> bytes:
  """Hashes a model input batch (mapping name -> array); layout as a pytree.

  Args:
    batch: mapping of str to arrays (nested values allowed).
    max_threads: BLAKE3 threads per leaf (see ``hash_array``).

  Returns:
    32-byte digest (tag ``TAG_BATCH``).
  """
  if not isinstance(batch, Mapping):
    raise TypeError(f"a batch must be a mapping, got {type(batch).__name__}")
  leaves = pytree_leaf_hashes(batch, max_threads=max_threads)
  return hash_leaf_digests(leaves, tag=TAG_BATCH)


# --------------------------------------------------------------------------
# Canonical JSON
# --------------------------------------------------------------------------


def _check_json(obj: Any, where: str) -> None:
  """Rejects what canonical JSON cannot represent unambiguously."""
  if obj is None or isinstance(obj, (bool, str)):
    if isinstance(obj, str):
      try:
        obj.encode("utf-8")
      except UnicodeEncodeError as e:
        raise ValueError(f"{where}: string is not valid unicode") from e
    return
  if isinstance(obj, int):
    return
  if isinstance(obj, float):
    if not math.isfinite(obj):
      raise ValueError(f"{where}: non-finite float {obj!r} is not JSON")
    return
  if isinstance(obj, dict):
    for k, v in obj.items():
      if not isinstance(k, str):
        # int keys would silently become strings and could collide.
        raise TypeError(f"{where}: object key {k!r} is not a str")
      _check_json(k, f"{where}.{k}")
      _check_json(v, f"{where}.{k}")
    return
  if isinstance(obj, (list, tuple)):
    for i, v in enumerate(obj):
      _check_json(v, f"{where}[{i}]")
    return
  raise TypeError(f"{where}: {type(obj).__name__} is not a JSON value")


def canonical_json_bytes(obj: Any) -> bytes:
  """Canonical UTF-8 JSON: sorted keys, no whitespace, no NaN/inf.

  Args:
    obj: dicts with str keys, lists/tuples, str, int, float, bool, None.
      Floats use python ``repr`` (shortest round-trip, e.g. ``1e-05``,
      ``1.0``); tuples encode as lists.

  Returns:
    The encoded document.

  Raises:
    TypeError / ValueError: a value that has no canonical encoding.
  """
  _check_json(obj, "$")
  text = json.dumps(
    obj,
    sort_keys=True,
    separators=(",", ":"),
    ensure_ascii=False,
    allow_nan=False,
  )
  return text.encode("utf-8")


def hash_json(obj: Any) -> bytes:
  """Hashes a JSON document (job spec, manifests) in canonical form.

  Args:
    obj: see ``canonical_json_bytes``.

  Returns:
    32-byte digest (tag ``TAG_JSON``).
  """
  return hash_bytes(TAG_JSON, canonical_json_bytes(obj))
