"""The canonical tensor hash (``hashing.hash_array``) computed on the accelerator.

Why: a recorder running the training step on a GPU must commit the hash of
every tensor it records, but under I_A/I_C most tensors are not stored (only
their hashes go into the trace). Hashing them on the host means copying every
such tensor off the device just to throw it away after BLAKE3. With this module
the tensor stays where it lives and only its 32-byte digest crosses to the host.

What: ``hash_array_on_device(x)`` returns, as a ``uint8[32]`` device array,
exactly ``hashing.hash_array(x)``: BLAKE3 (hash mode, no key, 32-byte output) of

    u64le(len(TAG_TENSOR)) || TAG_TENSOR
    || u64le(len(dtype name)) || dtype name || u64le(rank) || u64le(dim)*
    || the tensor's little-endian C-order bytes

(``digest_bytes(x)`` is the same as host ``bytes``); a tensor over
``hashing.CHUNK_BYTES`` takes the tree form (docs/hashing.md, "Large tensors"): each
chunk's leaf digest is computed here and only those 32-byte leaves go to the host for the
small tree above them (outside jit only). The prefix and header depend
only on dtype and shape, so they are computed on the host at trace time and
enter the program as a constant; the data bytes are produced on the device
(bit-cast to the unsigned integer of the same width, then split into bytes by
shifts, so the order is little-endian whatever the device's; bool is one byte
0/1 and complex is (real, imag), as numpy stores them).

Programs: outside jit two jitted programs run: the message builder (header ||
bytes || zero padding, compiled once per shape and dtype, cheap) and the hash
(compiled once per chunk-capacity bucket, see ``capacity``: the chunk count
is rounded up to 2 significant bits and the real count and last-chunk length
are runtime scalars, so a model's many parameter shapes share a few hash
programs of ~2-4 s compile each on CPU). Inside a caller's jit (a tracer
argument) both are traced inline at the exact size, so the hash can be fused
into the step that produces the tensor.

Construction (BLAKE3 as specified, written in jax.numpy on uint32 words):

* The message, zero-padded to ``cap`` chunks of 1024 bytes, is read as
  little-endian uint32 words laid out ``[block, word, chunk]``. It has ``n``
  real chunks (``n >= 1``: the empty message is one chunk with one empty
  block); lanes past ``n`` compute unused values.
* All chunk chaining values are computed at once: a ``lax.scan`` over the 16
  blocks runs the compression function vectorised over chunks (wrapping
  uint32 adds, rotations as shift pairs; the 7 rounds are a ``fori_loop``
  whose carried message tuple is reordered by the permutation -- unrolled
  rounds make XLA:CPU fuse the whole chain into a recomputing kernel and
  compile/run for minutes). Block ``i`` of chunk ``c`` carries counter ``c``,
  CHUNK_START when ``i == 0`` and CHUNK_END on the chunk's last block. Every
  chunk but the last is full; the last has ``ceil(r / 64)`` blocks (at least
  1), its last block zero-padded with block length = its real byte count;
  later blocks leave its chaining value unchanged. With one chunk, its last
  block also carries ROOT.
* The chaining values are reduced level by level: adjacent nodes are paired
  into PARENT compressions (key = IV, counter 0, block length 64), an odd last
  node is carried up unchanged, and the compression that leaves one node
  carries ROOT. This is BLAKE3's left-balanced tree (left subtree = largest
  power of two chunks strictly below the total); the tests check it against
  the reference for every chunk count 1..64. The first level runs at width
  cap / 2, the others in one ``lax.scan`` at width cap / 4 (so the program
  does not grow with depth; it costs ~log2(cap) * cap / 4 extra compressions
  against 16 * cap for the chunks).
* The digest is the first 8 output words (``state[i] ^ state[i + 8]``, output
  counter 0), written little-endian.

The result is bit-identical to the host path, tested in
``tests/test_device_hash.py``: against ``hashing.hash_array`` over sizes across
block and chunk boundaries (header included), dtypes, shapes, random arrays
(hypothesis), inside jit and for sharded arrays; raw BLAKE3 against the
``blake3`` package.

Cost: BLAKE3's parallelism is per chunk, so ``b`` bytes give ``b / 1024``
independent lanes for 16 sequential blocks, and each call runs ~16 * 7 +
7 * log2(cap) loop iterations (kernel launches on a GPU), a fixed latency per
tensor. On CPU this is 10-40x slower than the SIMD ``blake3`` package (see
``scripts/bench_device_hash.py``); the point is GPUs, where the transfer is
avoided -- not measured yet.

Not covered: typed PRNG key arrays (use ``hashing.hash_key``), sub-byte dtypes
(int4, float4: the host stores one byte per element, the device packs them),
structured dtypes, messages of 2**32 chunks (4 TiB) or more. A sharded array
is hashed as its global value (gathered on the devices, not on the host), as
the host path does with ``device_get``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from aftune.crypto import hashing

DIGEST_SIZE = 32
CHUNK_LEN = 1024
BLOCK_LEN = 64
BLOCKS_PER_CHUNK = CHUNK_LEN // BLOCK_LEN

CHUNK_START = 1
CHUNK_END = 2
PARENT = 4
ROOT = 8

# Chunk capacities are bucketed to this many significant bits (see capacity).
BUCKET_BITS = 2

IV = (
  0x6A09E667,
  0xBB67AE85,
  0x3C6EF372,
  0xA54FF53A,
  0x510E527F,
  0x9B05688C,
  0x1F83D9AB,
  0x5BE0CD19,
)
MSG_PERMUTATION = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)


def _u32(v: int) -> jax.Array:
  return jnp.uint32(v)


def _rotr(x: jax.Array, n: int) -> jax.Array:
  return lax.shift_right_logical(x, _u32(n)) | lax.shift_left(x, _u32(32 - n))


def _g(s: list, a: int, b: int, c: int, d: int, mx: jax.Array, my: jax.Array) -> None:
  s[a] = s[a] + s[b] + mx
  s[d] = _rotr(s[d] ^ s[a], 16)
  s[c] = s[c] + s[d]
  s[b] = _rotr(s[b] ^ s[c], 12)
  s[a] = s[a] + s[b] + my
  s[d] = _rotr(s[d] ^ s[a], 8)
  s[c] = s[c] + s[d]
  s[b] = _rotr(s[b] ^ s[c], 7)


def _round(s: tuple, m: tuple) -> tuple:
  """One BLAKE3 round: columns then diagonals."""
  s = list(s)
  _g(s, 0, 4, 8, 12, m[0], m[1])
  _g(s, 1, 5, 9, 13, m[2], m[3])
  _g(s, 2, 6, 10, 14, m[4], m[5])
  _g(s, 3, 7, 11, 15, m[6], m[7])
  _g(s, 0, 5, 10, 15, m[8], m[9])
  _g(s, 1, 6, 11, 12, m[10], m[11])
  _g(s, 2, 7, 8, 13, m[12], m[13])
  _g(s, 3, 4, 9, 14, m[14], m[15])
  return tuple(s)


def _compress_cv(cv: list, m: list, counter_lo: Any, block_len: Any, flags: Any) -> list:
  """BLAKE3 compression, truncated to the 8-word chaining value.

  The 7 rounds are a ``fori_loop`` (the message permutation reorders the
  loop-carried tuple of words; no gather). Unrolling them makes XLA:CPU fuse the
  whole add-rotate-xor chain into one kernel that recomputes shared values:
  compile and run time then explode (minutes for one chunk level).

  Args:
    cv: 8 uint32 arrays (all the same shape, or broadcastable).
    m: 16 uint32 message word arrays.
    counter_lo: low word of the counter (the high word is always 0 here).
    block_len: bytes in this block (uint32).
    flags: domain flags (uint32).

  Returns:
    8 uint32 arrays: ``state[i] ^ state[i + 8]``.
  """
  shape = jnp.broadcast_shapes(*(jnp.shape(w) for w in (*cv, *m)))
  full = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.uint32), shape)
  s = [full(w) for w in cv] + [full(v) for v in IV[:4]]
  s += [full(counter_lo), full(0), full(block_len), full(flags)]

  def body(_: Any, carry: tuple) -> tuple:
    s, m = carry
    return _round(s, m), tuple(m[i] for i in MSG_PERMUTATION)

  s, _ = lax.fori_loop(0, 7, body, (tuple(s), tuple(full(w) for w in m)))
  return [s[i] ^ s[i + 8] for i in range(8)]


def _le_words(b: jax.Array) -> jax.Array:
  """uint8[..., 4k] -> uint32[..., k], little-endian (independent of the host)."""
  b = b.reshape(*b.shape[:-1], -1, 4).astype(jnp.uint32)
  return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _words_le_bytes(w: jax.Array) -> jax.Array:
  """uint32[k] -> uint8[4k], little-endian."""
  parts = [lax.shift_right_logical(w, _u32(8 * k)) & _u32(0xFF) for k in range(4)]
  return jnp.stack(parts, axis=-1).reshape(-1).astype(jnp.uint8)


def _num_chunks(length: int) -> int:
  return max(1, -(-length // CHUNK_LEN))


def capacity(n_chunks: int, bucket_bits: int = BUCKET_BITS) -> int:
  """Chunk capacity compiled for a message of ``n_chunks`` chunks.

  ``n_chunks`` rounded up to ``bucket_bits`` significant bits (2: 1, 2, 3, 4,
  6, 8, 12, 16, 24, ...), so one compiled program serves every message size
  up to it. The capacity is below ``n_chunks * (1 + 2 ** (1 - bucket_bits))``
  (1.5x for 2 bits), so at most a third of the lanes are padding.
  """
  if n_chunks < 1:
    raise ValueError(f"a message has at least one chunk, got {n_chunks}")
  k = max(0, n_chunks.bit_length() - bucket_bits)
  return -(-n_chunks // (1 << k)) << k


def _chunk_cvs(padded: jax.Array, n: Any, last_len: Any) -> jax.Array:
  """Chaining values of all chunk lanes, uint32[8, cap].

  Args:
    padded: uint8[cap * 1024], the message then zeros.
    n: number of real chunks (1..cap, uint32, may be traced).
    last_len: bytes in the last real chunk (0..1024; 0 only when empty).

  Lanes ``>= n`` hold unused values. With ``n == 1`` lane 0 is already the
  root output (ROOT set on its last block).
  """
  cap = padded.shape[0] // CHUNK_LEN
  n = jnp.asarray(n, jnp.uint32)
  last_len = jnp.asarray(last_len, jnp.uint32)
  last_blocks = jnp.maximum(_u32(1), (last_len + _u32(BLOCK_LEN - 1)) // _u32(BLOCK_LEN))
  last_block_len = last_len - (last_blocks - _u32(1)) * _u32(BLOCK_LEN)

  words = _le_words(padded.reshape(cap, BLOCKS_PER_CHUNK, BLOCK_LEN))  # [cap, 16, 16]
  words = jnp.transpose(words, (1, 2, 0))  # [block, word, chunk]

  chunk = lax.iota(jnp.uint32, cap)
  is_last = chunk == n - _u32(1)
  nblocks = jnp.where(is_last, last_blocks, _u32(BLOCKS_PER_CHUNK))
  root = jnp.where(n == _u32(1), _u32(ROOT), _u32(0))

  def body(cv: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    i, block = xs
    end = i + _u32(1) == nblocks
    flags = jnp.where(i == _u32(0), _u32(CHUNK_START), _u32(0))
    flags = flags | jnp.where(end, _u32(CHUNK_END) | root, _u32(0))
    blen = jnp.where(end & is_last, last_block_len, _u32(BLOCK_LEN))
    new = _compress_cv(list(cv), list(block), chunk, blen, flags)
    return jnp.where(i < nblocks, jnp.stack(new), cv), None

  cv0 = jnp.broadcast_to(jnp.asarray(IV, jnp.uint32)[:, None], (8, cap))
  steps = lax.iota(jnp.uint32, BLOCKS_PER_CHUNK)
  cv, _ = lax.scan(body, cv0, (steps, words))
  return cv


def _level(buf: jax.Array, m: jax.Array) -> jax.Array:
  """One tree level: uint32[8, 2w] nodes (``m`` of them real) -> [8, w].

  Lane j < m // 2 becomes PARENT(node 2j, node 2j+1) (with ROOT when m == 2);
  lane m // 2 for odd m is node m - 1 carried up unchanged, which is exactly
  left[:, m // 2]; later lanes are unused. For m == 1 lane 0 keeps node 0.
  """
  left, right = buf[:, 0::2], buf[:, 1::2]
  flags = jnp.where(m == _u32(2), _u32(PARENT | ROOT), _u32(PARENT))
  key = list(jnp.asarray(IV, jnp.uint32))
  parents = jnp.stack(_compress_cv(key, [*left, *right], 0, BLOCK_LEN, flags))
  lane = lax.iota(jnp.uint32, left.shape[1])
  return jnp.where(lane < m // _u32(2), parents, left)


def _pad_even(buf: jax.Array) -> jax.Array:
  return jnp.pad(buf, ((0, 0), (0, buf.shape[1] % 2)))


def _reduce_tree(cvs: jax.Array, n: Any) -> jax.Array:
  """Parent levels over uint32[8, cap] chunk values (``n`` real) -> root words [8].

  Pairing adjacent nodes level by level and carrying an odd last node up
  builds BLAKE3's left-balanced tree. The first level runs at width cap / 2;
  the remaining ones as one ``lax.scan`` at width cap / 4, so the compiled
  program does not grow with the tree depth (lanes past a level's node count
  compute values that are never used: about log2(cap) * cap / 4 compressions
  for the tree, against 16 * cap for the chunks).
  """
  cap = cvs.shape[1]
  m = jnp.asarray(n, jnp.uint32)
  if cap == 1:
    return cvs[:, 0]
  buf = _level(_pad_even(cvs), m)
  m = (m + _u32(1)) // _u32(2)
  depth = (cap - 1).bit_length()  # levels needed for cap nodes
  if depth > 1:
    buf = _pad_even(buf)

    def step(carry: tuple, _: Any) -> tuple:
      buf, m = carry
      new = _level(buf, m)
      return (jnp.concatenate([new, buf[:, 1::2]], axis=1), (m + _u32(1)) // _u32(2)), None

    (buf, m), _ = lax.scan(step, (buf, m), None, length=depth - 1)
  return buf[:, 0]


def _blake3_padded(padded: jax.Array, n: Any, last_len: Any) -> jax.Array:
  """BLAKE3 digest (uint8[32]) of the first (n - 1) * 1024 + last_len bytes."""
  return _words_le_bytes(_reduce_tree(_chunk_cvs(padded, n, last_len), n))


_blake3_padded_jit = jax.jit(_blake3_padded)


def _lengths(length: int) -> tuple[int, int]:
  """(chunk count, bytes in the last chunk) of a message of ``length`` bytes."""
  n = _num_chunks(length)
  if n >= 1 << 32:
    raise ValueError("message too long (the chunk counter would need 64 bits)")
  return n, length - (n - 1) * CHUNK_LEN


def _pad_to(msg: jax.Array, cap: int) -> jax.Array:
  return jnp.pad(msg, (0, cap * CHUNK_LEN - msg.shape[0]))


_pad_to_jit = jax.jit(_pad_to, static_argnames="cap")


def blake3_message(msg: jax.Array) -> jax.Array:
  """BLAKE3 (hash mode, 32 bytes) of a 1-D uint8 jax array, as uint8[32].

  Outside jit the message is padded to a bucketed capacity (``capacity``),
  so the hashing program is compiled once per bucket, not per length.
  """
  if msg.ndim != 1 or msg.dtype != jnp.uint8:
    raise TypeError(f"expected a 1-D uint8 message, got {msg.dtype}{list(msg.shape)}")
  n, last_len = _lengths(int(msg.shape[0]))
  if isinstance(msg, jax.core.Tracer):
    return _blake3_padded(_pad_to(msg, n), n, last_len)
  cap = capacity(n)
  return _blake3_padded_jit(_pad_to_jit(msg, cap=cap), np.uint32(n), np.uint32(last_len))


_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def _check_device_dtype(dtype: Any) -> np.dtype:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    raise TypeError("typed PRNG keys are hashed with hashing.hash_key (host)")
  dt = np.dtype(dtype)
  hashing._check_dtype(dt)  # same acceptance as the host path
  if jax.dtypes.itemsize_bits(dt) != 8 * dt.itemsize:
    raise NotImplementedError(f"sub-byte dtype {dt} is not supported on device")
  return dt


def _element_bytes(x: jax.Array) -> jax.Array:
  """The tensor's C-order little-endian bytes, uint8[size * itemsize]."""
  dt = np.dtype(x.dtype)
  flat = x.reshape(-1)
  if dt.kind == "b":
    return flat.astype(jnp.uint8)  # numpy stores bool as one byte, 0 or 1
  if dt.kind == "c":
    # complex = (real, imag) pairs of the component float, as numpy stores it.
    flat = jnp.stack([jnp.real(flat), jnp.imag(flat)], axis=-1).reshape(-1)
    dt = np.dtype(flat.dtype)
  u = lax.bitcast_convert_type(flat, _UNSIGNED[dt.itemsize])
  if dt.itemsize == 1:
    return u
  # Bytes by shifts, least significant first: little-endian on any device.
  one = u.dtype.type
  parts = [lax.shift_right_logical(u, one(8 * k)) & one(0xFF) for k in range(dt.itemsize)]
  return jnp.stack(parts, axis=-1).reshape(-1).astype(jnp.uint8)


def tensor_message_prefix(dtype: Any, shape: tuple[int, ...]) -> bytes:
  """Host bytes that precede the tensor data: tag prefix and dtype/shape header."""
  dt = np.dtype(dtype)
  return hashing._prefix(hashing.TAG_TENSOR) + hashing._tensor_body_header(dt.name, shape)


def _replicated(x: jax.Array) -> jax.Array:
  """``x`` with no explicit sharding axes (a no-op unless the mesh is Explicit).

  Under explicit sharding the byte concatenation below is refused for axes
  that do not divide evenly, so the value is gathered first; under the
  default (auto) sharding the compiler inserts the gathering itself.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is not None and any(p is not None for p in spec):
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    x = jax.sharding.reshard(x, replicated)
  return x


def _tensor_message(x: jax.Array, cap: int) -> jax.Array:
  """prefix || header || bytes(x), zero-padded to uint8[cap * 1024]."""
  x = _replicated(x)
  head = np.frombuffer(tensor_message_prefix(x.dtype, tuple(x.shape)), np.uint8)
  parts = [jnp.asarray(head)]
  if x.size:
    parts.append(_element_bytes(x))
  msg = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
  return _pad_to(msg, cap)


_tensor_message_jit = jax.jit(_tensor_message, static_argnames="cap")


def _message_length(x: jax.Array) -> int:
  dt = _check_device_dtype(x.dtype)
  head = len(tensor_message_prefix(dt, tuple(x.shape)))
  return head + math.prod(x.shape) * dt.itemsize


def hash_array_on_device(x: jax.Array) -> jax.Array:
  """``hashing.hash_array(x)``, computed where ``x`` lives.

  Args:
    x: a jax array (any shape; bool, integer, floating incl. bfloat16/float8,
      complex) on any device or sharding. May also be a tracer: the hash then
      becomes part of the caller's jitted computation. A numpy array is put
      on the default device first (refused if jax would change its dtype).

  Returns:
    uint8[32] device array holding the digest; ``bytes(np.asarray(d))`` equals
    ``hashing.hash_array(x)``. Outside jit this runs two programs: building the
    message (compiled once per shape and dtype) and hashing it (compiled once
    per ``capacity`` bucket of its chunk count).
  """
  if isinstance(x, (np.ndarray, np.generic)):
    host_dtype = x.dtype
    x = jnp.asarray(x)
    if x.dtype != host_dtype:  # e.g. float64 without jax_enable_x64
      raise TypeError(f"jax cannot hold {host_dtype} here (it became {x.dtype})")
  if not isinstance(x, jax.Array):
    raise TypeError(f"expected a jax array, got {type(x).__name__}")
  rows = hashing.chunk_rows(_check_device_dtype(x.dtype), tuple(x.shape))
  if rows is not None:
    return _tree_form_on_device(x, rows)
  n, last_len = _lengths(_message_length(x))
  if isinstance(x, jax.core.Tracer):
    return _blake3_padded(_tensor_message(x, n), n, last_len)
  msg = _tensor_message_jit(x, cap=capacity(n))
  return _blake3_padded_jit(msg, np.uint32(n), np.uint32(last_len))


def _chunk_message(chunk: jax.Array) -> jax.Array:
  head = np.frombuffer(hashing._prefix(hashing.TAG_TENSOR_CHUNK), np.uint8)
  return jnp.concatenate([jnp.asarray(head), _element_bytes(chunk)])


def _tree_form_on_device(x: jax.Array, rows: int) -> jax.Array:
  """A large tensor (docs/hashing.md, "Large tensors"): each chunk's leaf digest on the
  device, then only the 32-byte leaves cross to the host for the small tree above them."""
  if isinstance(x, jax.core.Tracer):
    raise NotImplementedError(f"the tree form of a {x.dtype}{list(x.shape)} tensor (over "
                              f"{hashing.CHUNK_BYTES} bytes) is not built inside jit")
  n = hashing.num_chunks(x.shape, rows)
  leaves = [bytes(np.asarray(blake3_message(_chunk_message(x[j * rows:(j + 1) * rows]))))
            for j in range(n)]
  root = hashing.chunk_tree_root({(j, 1): d for j, d in enumerate(leaves)}, n)
  digest = hashing.tree_digest(np.dtype(x.dtype).name, tuple(x.shape), rows, root)
  return jnp.asarray(np.frombuffer(digest, np.uint8))


def digest_bytes(x: jax.Array) -> bytes:
  """Host helper: the 32-byte digest of ``x`` as bytes (only 32 bytes are copied)."""
  return bytes(np.asarray(hash_array_on_device(x)))
