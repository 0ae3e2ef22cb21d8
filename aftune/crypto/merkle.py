"""RFC 6962 / RFC 9162 Merkle tree over the trace records, with proofs.

Shape of the tree (RFC 9162 §2.1.1), for leaf hashes D[0:n]:

    MTH({})     = H(TAG_EMPTY_TREE)                      (empty body)
    MTH({d0})   = d0                                     (d0 is already a leaf hash)
    MTH(D[0:n]) = node(MTH(D[0:k]), MTH(D[k:n]))         k = largest power of 2 < n

with leaf hash ``H(TAG_LEAF, leaf_bytes)`` and ``node(l, r) = H(TAG_NODE, l || r)``
(``H`` as in ``aftune.hashing``: BLAKE3 over length-prefixed tag then body).
Inclusion and consistency proofs follow RFC 9162 §2.1.3 and §2.1.4 exactly,
only with these hash functions. Byte layouts: ``docs/hashing.md``.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import struct
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Union

from aftune.crypto import hashing
from aftune.crypto.hashing import DIGEST_SIZE
from aftune.crypto.hashing import TAG_EMPTY_TREE
from aftune.crypto.hashing import TAG_LEAF
from aftune.crypto.hashing import TAG_NODE

LeafSource = Union[Sequence[bytes], Callable[[int], bytes]]

_I64 = struct.Struct("<q")
# Proofs longer than this cannot belong to a tree of < 2**64 leaves.
_MAX_PROOF_LEN = 64

_EMPTY_ROOT = hashing.hash_bytes(TAG_EMPTY_TREE, b"")


def empty_root() -> bytes:
  """Root of the tree with no leaves: ``H(TAG_EMPTY_TREE, b"")``."""
  return _EMPTY_ROOT


def leaf_bytes(kind: str, step: int, block: int, payload: bytes) -> bytes:
  """Canonical encoding of one trace record.

  Args:
    kind: record kind, e.g. "fwd_act" (UTF-8, non-empty).
    step: optimizer step, or -1 for job-level records.
    block: layer block, or -1 for per-step (not per-block) records.
    payload: record content, usually a 32-byte digest; last, so unprefixed.

  Returns:
    ``u64le(len(kind)) || kind || i64le(step) || i64le(block) || payload``.
  """
  if not isinstance(kind, str) or not kind:
    raise ValueError(f"leaf kind must be a non-empty str, got {kind!r}")
  for name, v in (("step", step), ("block", block)):
    if not isinstance(v, int) or isinstance(v, bool) or v < -1:
      raise ValueError(f"leaf {name} must be an int >= -1, got {v!r}")
  k = kind.encode("utf-8")
  return b"".join([hashing.u64le(len(k)), k, _I64.pack(step), _I64.pack(block), bytes(payload)])


def leaf_hash(kind: str, step: int, block: int, payload: bytes) -> bytes:
  """Merkle leaf hash of a trace record.

  Args:
    kind, step, block, payload: see ``leaf_bytes``.

  Returns:
    32-byte ``H(TAG_LEAF, leaf_bytes(...))``.
  """
  return hashing.hash_bytes(TAG_LEAF, leaf_bytes(kind, step, block, payload))


def hash_leaf_data(data: bytes) -> bytes:
  """Leaf hash of already-encoded leaf bytes: ``H(TAG_LEAF, data)``."""
  return hashing.hash_bytes(TAG_LEAF, data)


def node_hash(left: bytes, right: bytes) -> bytes:
  """Interior node: ``H(TAG_NODE, left || right)``."""
  return hashing.hash_bytes(TAG_NODE, left + right)


def _largest_pow2_below(n: int) -> int:
  """Largest power of two strictly smaller than n (n >= 2)."""
  return 1 << ((n - 1).bit_length() - 1)


def _getter(leaves: LeafSource) -> Callable[[int], bytes]:
  return leaves if callable(leaves) else leaves.__getitem__


def _range_root(get: Callable[[int], bytes], lo: int, hi: int) -> bytes:
  """MTH(D[lo:hi]) in O(hi - lo) hashes and O(log) memory."""
  s = StreamingMerkle()
  for i in range(lo, hi):
    s.append(get(i))
  return s.root()


def merkle_root(leaves: LeafSource, size: int | None = None) -> bytes:
  """Root of the first ``size`` leaf hashes (all of a sequence by default).

  Args:
    leaves: sequence of 32-byte leaf hashes, or a function index -> hash.
    size: number of leaves (required for a function).

  Returns:
    32-byte root (``empty_root()`` for size 0).
  """
  if size is None:
    if callable(leaves):
      raise ValueError("size is required when leaves is a function")
    size = len(leaves)
  return _range_root(_getter(leaves), 0, size)


class StreamingMerkle:
  """Append-only Merkle accumulator with O(log n) state.

  Keeps the roots of the perfect subtrees that make up the prefix (one per set
  bit of ``size``, largest first) -- the "frontier". The root of the prefix
  folds them right to left, which equals RFC 9162's MTH for any size.
  """

  def __init__(self) -> None:
    self._size = 0
    self._frontier: list[bytes] = []  # perfect-subtree roots, largest first

  @property
  def size(self) -> int:
    """Number of leaves appended so far."""
    return self._size

  def append(self, leaf: bytes) -> int:
    """Appends a leaf hash.

    Args:
      leaf: 32-byte leaf hash (from ``leaf_hash``).

    Returns:
      The index the leaf was given.
    """
    if len(leaf) != DIGEST_SIZE:
      raise ValueError(f"leaf hash must be {DIGEST_SIZE} bytes, got {len(leaf)}")
    index = self._size
    h = bytes(leaf)
    # Each trailing set bit of the old size is a perfect subtree of the same
    # height as the carry: merge, exactly like binary increment.
    n = index
    while n & 1:
      h = node_hash(self._frontier.pop(), h)
      n >>= 1
    self._frontier.append(h)
    self._size += 1
    return index

  def root(self) -> bytes:
    """Root of all leaves so far (``empty_root()`` when empty)."""
    if not self._frontier:
      return _EMPTY_ROOT
    r = self._frontier[-1]
    for h in reversed(self._frontier[:-1]):
      r = node_hash(h, r)
    return r

  def state(self) -> dict[str, Any]:
    """JSON-ready state: ``{"version": 1, "size": n, "frontier": [hex...]}``."""
    return {
      "version": 1,
      "size": self._size,
      "frontier": [h.hex() for h in self._frontier],
    }

  @classmethod
  def from_state(cls, state: Mapping[str, Any]) -> StreamingMerkle:
    """Rebuilds an accumulator from ``state()`` output (crash-safe resume).

    Args:
      state: mapping as produced by ``state()``.

    Returns:
      An accumulator that continues the same tree.

    Raises:
      ValueError: malformed state (wrong version, count, or hex).
    """
    if state.get("version") != 1:
      raise ValueError(f"unsupported Merkle state version {state.get('version')!r}")
    size = state.get("size")
    frontier = state.get("frontier")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
      raise ValueError(f"bad Merkle state size {size!r}")
    if not isinstance(frontier, list) or len(frontier) != bin(size).count("1"):
      raise ValueError(
        f"Merkle state frontier must hold {bin(size).count('1')} hashes for size {size}"
      )
    s = cls()
    s._size = size
    s._frontier = [hashing.from_hex(h) for h in frontier]
    return s


class MerkleTree:
  """All levels of a fixed tree, for serving many proofs cheaply.

  Building costs n - 1 node hashes; each proof then costs O(log^2 n) at worst
  (only subtrees on the right edge are not stored). Levels are kept as flat
  ``bytes`` (32 bytes per hash) to stay compact for millions of leaves.
  """

  def __init__(self, leaves: Sequence[bytes]) -> None:
    for i, h in enumerate(leaves):
      if len(h) != DIGEST_SIZE:
        raise ValueError(f"leaf {i} is not a {DIGEST_SIZE}-byte hash")
    self.size = len(leaves)
    level = b"".join(leaves)
    self._levels = [level]  # _levels[h][32*j:] = root of perfect D[j*2^h:(j+1)*2^h]
    while len(level) >= 2 * DIGEST_SIZE:
      pairs = len(level) // (2 * DIGEST_SIZE)
      level = b"".join(
        node_hash(level[64 * j : 64 * j + 32], level[64 * j + 32 : 64 * j + 64])
        for j in range(pairs)
      )
      self._levels.append(level)

  def leaf(self, index: int) -> bytes:
    """Leaf hash at ``index``."""
    if not 0 <= index < self.size:
      raise IndexError(index)
    return self._levels[0][32 * index : 32 * index + 32]

  def _subtree(self, lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) for a range produced by the RFC recursion."""
    n = hi - lo
    if n == 0:
      return _EMPTY_ROOT
    height = n.bit_length() - 1
    if n == 1 << height and lo % n == 0:
      j = lo >> height
      return self._levels[height][32 * j : 32 * j + 32]
    k = _largest_pow2_below(n)
    return node_hash(self._subtree(lo, lo + k), self._subtree(lo + k, hi))

  def root(self, size: int | None = None) -> bytes:
    """Root of the first ``size`` leaves (default: all)."""
    size = self.size if size is None else size
    _check_size(size, self.size)
    return self._subtree(0, size)

  def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
    """Inclusion proof of leaf ``index`` in the tree of the first ``size`` leaves."""
    size = self.size if size is None else size
    _check_size(size, self.size)
    return _inclusion_path(self._subtree, index, size)

  def consistency_proof(self, m: int, n: int | None = None) -> list[bytes]:
    """Consistency proof from the first ``m`` leaves to the first ``n``."""
    n = self.size if n is None else n
    _check_size(n, self.size)
    return _consistency_path(self._subtree, m, n)


def _check_size(size: int, available: int) -> None:
  if not 0 <= size <= available:
    raise ValueError(f"tree size {size} outside [0, {available}]")


def _inclusion_path(subtree: Callable[[int, int], bytes], index: int, size: int) -> list[bytes]:
  """RFC 9162 §2.1.3.1 PATH(m, D[n]), leaf to root order."""
  if not 0 <= index < size:
    raise ValueError(f"leaf index {index} outside tree of size {size}")
  path: list[bytes] = []
  lo, hi = 0, size
  while hi - lo > 1:
    k = _largest_pow2_below(hi - lo)
    if index < lo + k:
      path.append(subtree(lo + k, hi))
      hi = lo + k
    else:
      path.append(subtree(lo, lo + k))
      lo = lo + k
  path.reverse()  # the recursion descends from the root; proofs go upward
  return path


def _consistency_path(subtree: Callable[[int, int], bytes], m: int, n: int) -> list[bytes]:
  """RFC 9162 §2.1.4.1 PROOF(m, D[n]); empty when m == 0 or m == n."""
  if not 0 <= m <= n:
    raise ValueError(f"consistency needs 0 <= m <= n, got m={m} n={n}")
  if m == 0 or m == n:
    return []
  path: list[bytes] = []
  lo, hi, b = 0, n, True  # SUBPROOF(m - lo, D[lo:hi], b)
  while True:
    size = hi - lo
    mm = m - lo
    if mm == size:
      if not b:
        path.append(subtree(lo, hi))
      break
    k = _largest_pow2_below(size)
    if mm <= k:
      path.append(subtree(lo + k, hi))
      hi = lo + k
    else:
      path.append(subtree(lo, lo + k))
      lo, b = lo + k, False
  path.reverse()
  return path


def _source_subtree(leaves: LeafSource) -> Callable[[int, int], bytes]:
  get = _getter(leaves)
  return lambda lo, hi: _range_root(get, lo, hi)


def inclusion_proof(leaves: LeafSource, index: int, size: int) -> list[bytes]:
  """Audit path for leaf ``index`` in the tree of the first ``size`` leaves.

  Costs O(size) hashes; build a ``MerkleTree`` to serve many proofs.

  Args:
    leaves: sequence of leaf hashes, or a function index -> leaf hash.
    index: leaf position, ``0 <= index < size``.
    size: tree size the proof is against.

  Returns:
    Sibling hashes from the leaf upward (RFC 9162 order).
  """
  return _inclusion_path(_source_subtree(leaves), index, size)


def consistency_proof(leaves: LeafSource, m: int, n: int) -> list[bytes]:
  """Proof that the tree of the first ``m`` leaves is a prefix of the first ``n``.

  Args:
    leaves: sequence of leaf hashes, or a function index -> leaf hash.
    m: older tree size, ``0 <= m <= n``.
    n: newer tree size.

  Returns:
    RFC 9162 consistency path (empty for m == 0 or m == n).
  """
  return _consistency_path(_source_subtree(leaves), m, n)


def _as_count(x: Any) -> int | None:
  """x as a non-negative int (numpy ints too), or None; bools are refused."""
  if isinstance(x, bool):
    return None
  try:
    x = operator.index(x)
  except TypeError:
    return None
  return x if x >= 0 else None


def _valid_path(proof: Sequence[bytes]) -> bool:
  return len(proof) <= _MAX_PROOF_LEN and all(
    isinstance(p, (bytes, bytearray)) and len(p) == DIGEST_SIZE for p in proof
  )


def verify_inclusion(
  leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
  """Checks an inclusion proof (RFC 9162 §2.1.3.2).

  Args:
    leaf: 32-byte leaf hash.
    index: claimed leaf position.
    size: tree size of ``root``.
    proof: audit path from ``inclusion_proof``.
    root: trusted root of the tree of ``size`` leaves.

  Returns:
    True iff ``leaf`` sits at ``index`` in the tree of that size and root.
  """
  index, size = _as_count(index), _as_count(size)
  if index is None or size is None or index >= size:
    return False
  if not _valid_path(proof) or len(leaf) != DIGEST_SIZE:
    return False
  fn, sn, r = index, size - 1, bytes(leaf)
  for p in proof:
    if sn == 0:
      return False
    if fn & 1 or fn == sn:
      r = node_hash(p, r)
      while not fn & 1 and fn != 0:
        fn >>= 1
        sn >>= 1
    else:
      r = node_hash(r, p)
    fn >>= 1
    sn >>= 1
  return sn == 0 and r == root


def verify_consistency(
  m: int, n: int, root_m: bytes, root_n: bytes, proof: Sequence[bytes]
) -> bool:
  """Checks that the tree of size ``m`` is a prefix of the tree of size ``n``.

  RFC 9162 §2.1.4.2, extended with: ``m == n`` needs an empty proof and equal
  roots; ``m == 0`` needs an empty proof and ``root_m == empty_root()``.

  Args:
    m: older size; n: newer size (``m <= n``).
    root_m: trusted root at size m; root_n: trusted root at size n.
    proof: path from ``consistency_proof``.

  Returns:
    True iff the proof shows append-only growth from root_m to root_n.
  """
  m, n = _as_count(m), _as_count(n)
  if m is None or n is None or m > n or not _valid_path(proof):
    return False
  if m == 0:
    return not proof and root_m == _EMPTY_ROOT
  if m == n:
    return not proof and root_m == root_n
  if not proof:
    return False
  path = list(proof)
  if m & (m - 1) == 0:  # m is a power of two: its root is a subtree of n
    path.insert(0, bytes(root_m))
  fn, sn = m - 1, n - 1
  while fn & 1:
    fn >>= 1
    sn >>= 1
  fr = sr = path[0]
  for c in path[1:]:
    if sn == 0:
      return False
    if fn & 1 or fn == sn:
      fr = node_hash(c, fr)
      sr = node_hash(c, sr)
      while not fn & 1 and fn != 0:
        fn >>= 1
        sn >>= 1
    else:
      sr = node_hash(sr, c)
    fn >>= 1
    sn >>= 1
  return fr == root_m and sr == root_n and sn == 0


@dataclasses.dataclass(frozen=True)
class MerkleProof:
  """An inclusion or consistency proof, serialisable with hex hashes.

  Attributes:
    type: "inclusion" or "consistency".
    size: tree size of the (newer) root.
    path: proof hashes.
    index: leaf position (inclusion only).
    old_size: older tree size (consistency only).
  """

  type: str
  size: int
  path: tuple[bytes, ...]
  index: int | None = None
  old_size: int | None = None

  @classmethod
  def inclusion(cls, leaves: LeafSource | MerkleTree, index: int, size: int) -> MerkleProof:
    """Builds an inclusion proof from leaves or a ``MerkleTree``."""
    if isinstance(leaves, MerkleTree):
      path = leaves.inclusion_proof(index, size)
    else:
      path = inclusion_proof(leaves, index, size)
    return cls("inclusion", size, tuple(path), index=index)

  @classmethod
  def consistency(cls, leaves: LeafSource | MerkleTree, m: int, n: int) -> MerkleProof:
    """Builds a consistency proof from leaves or a ``MerkleTree``."""
    if isinstance(leaves, MerkleTree):
      path = leaves.consistency_proof(m, n)
    else:
      path = consistency_proof(leaves, m, n)
    return cls("consistency", n, tuple(path), old_size=m)

  def verify_inclusion(self, leaf: bytes, root: bytes) -> bool:
    """Verifies this inclusion proof for ``leaf`` against ``root``."""
    return self.type == "inclusion" and verify_inclusion(
      leaf, self.index, self.size, self.path, root
    )

  def verify_consistency(self, old_root: bytes, root: bytes) -> bool:
    """Verifies this consistency proof between ``old_root`` and ``root``."""
    return self.type == "consistency" and verify_consistency(
      self.old_size, self.size, old_root, root, self.path
    )

  def to_json(self) -> dict[str, Any]:
    """JSON-ready dict, e.g. ``{"type": "inclusion", "index": 3, "size": 5,
    "path": [hex, ...]}`` (``old_size`` instead of ``index`` for consistency)."""
    out: dict[str, Any] = {"type": self.type, "size": self.size}
    if self.type == "inclusion":
      out["index"] = self.index
    else:
      out["old_size"] = self.old_size
    out["path"] = [p.hex() for p in self.path]
    return out

  @classmethod
  def from_json(cls, obj: Mapping[str, Any] | str | bytes) -> MerkleProof:
    """Parses ``to_json`` output (a dict, or its JSON text).

    Raises:
      ValueError: missing or malformed fields.
    """
    if isinstance(obj, (str, bytes)):
      obj = json.loads(obj)
    if not isinstance(obj, Mapping):
      raise ValueError("a Merkle proof must be a JSON object")
    kind = obj.get("type")
    expected = {
      "inclusion": {"type", "size", "index", "path"},
      "consistency": {"type", "size", "old_size", "path"},
    }
    if kind not in expected:
      raise ValueError(f"unknown Merkle proof type {kind!r}")
    if set(obj) != expected[kind]:
      raise ValueError(f"{kind} proof fields must be {sorted(expected[kind])}, got {sorted(obj)}")
    ints = ["size", "index" if kind == "inclusion" else "old_size"]
    for f in ints:
      if type(obj[f]) is not int or obj[f] < 0:
        raise ValueError(f"proof field {f!r} must be a non-negative int")
    if not isinstance(obj["path"], list) or len(obj["path"]) > _MAX_PROOF_LEN:
      raise ValueError("proof path must be a list of at most 64 hex hashes")
    path = tuple(hashing.from_hex(h) for h in obj["path"])
    if kind == "inclusion":
      return cls(kind, obj["size"], path, index=obj["index"])
    return cls(kind, obj["size"], path, old_size=obj["old_size"])
