"""The canonical tensor hash of a sharded array, computed by each process from its own shards.

`hashing.hash_array` is a function of the logical array only: small tensors are hashed
whole, larger ones in the tree form (row chunks under a Merkle tree; docs/hashing.md,
"Large tensors"). Because a chunk is a run of whole rows and the tree's complete subtrees
are the power-of-two runs aligned to their size, a process that holds some rows can hash
them into a few subtree digests (`TensorPart`) without seeing the other rows; any process
merges the parts (`merge`) into the digest of the whole.

Which process hashes what is decided from the sharding alone, so every process agrees
without talking: a chunk is hashed by a process whose devices hold all of its rows (whole
rows: every trailing axis unsplit); where several do (replicated rows), chunk j of n goes to
the (j * holders // n)-th of them, so they share the work in contiguous runs. A small (flat-form) tensor is hashed by
the lowest process that holds all of it. Where no process holds a chunk whole (a split of
a trailing axis, or a row split that cuts a chunk), `needs_regroup` says so and the caller
first re-lays the array out by rows (`row_layout`); that is a collective, so in a run of
several processes every process must call it, in the same order (the training thread does).

Only the bytes of a process's own shards cross from its devices to its host
(`BYTES_FETCHED` counts them, for the benchmark).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aftune.crypto import hashing

# Bytes copied from devices to this host to hash (the benchmark counter, shared with hashing).
BYTES_FETCHED = hashing.BYTES_FETCHED


@dataclasses.dataclass
class TensorPart:
  """One process's share of a tensor digest: complete subtrees of the chunk tree (tree form)
  or the whole digest (flat form, from the owner). `merge` combines the parts of all processes."""
  dtype: str
  shape: tuple[int, ...]
  nodes: dict[tuple[int, int], bytes]
  flat: bytes | None = None

  def to_json(self) -> dict[str, Any]:
    return {"dtype": self.dtype, "shape": list(self.shape),
            "flat": None if self.flat is None else self.flat.hex(),
            "nodes": [[s, n, d.hex()] for (s, n), d in sorted(self.nodes.items())]}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "TensorPart":
    return cls(str(d["dtype"]), tuple(int(x) for x in d["shape"]),
               {(int(s), int(n)): hashing.from_hex(h) for s, n, h in d["nodes"]},
               None if d["flat"] is None else hashing.from_hex(d["flat"]))


def merge(parts: Sequence[TensorPart]) -> bytes:
  """The tensor digest from the parts of every process (order does not matter)."""
  if not parts:
    raise ValueError("no parts to merge")
  dtype, shape = parts[0].dtype, parts[0].shape
  if any((p.dtype, p.shape) != (dtype, shape) for p in parts):
    raise ValueError(f"parts of different tensors: {[(p.dtype, p.shape) for p in parts]}")
  rows = hashing.chunk_rows(np.dtype(dtype), shape)
  if rows is None:
    flats = {p.flat for p in parts if p.flat is not None}
    if len(flats) != 1:
      raise ValueError(f"a {dtype}{list(shape)} tensor needs one whole digest, got {len(flats)}")
    return flats.pop()
  nodes: dict[tuple[int, int], bytes] = {}
  for p in parts:
    for key, d in p.nodes.items():
      if nodes.setdefault(key, d) != d:
        raise ValueError(f"two processes disagree on chunks {key} of a {dtype}{list(shape)} tensor")
  return hashing.tree_digest(dtype, shape, rows,
                             hashing.chunk_tree_root(nodes, hashing.num_chunks(shape, rows)))


def _whole_rows(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, int] | None:
  """The row range of a shard index if it holds whole rows, else None."""
  for sl, d in zip(index[1:], shape[1:]):
    if sl.indices(d)[:2] != (0, d):
      return None
  lo, hi, _ = index[0].indices(shape[0])
  return lo, hi


def _holdings(x: jax.Array) -> dict[int, list[tuple[int, int]]]:
  """Per process, the disjoint row runs it holds whole (from the sharding: global knowledge)."""
  shape = tuple(x.shape)
  ranges: dict[int, set[tuple[int, int]]] = {}
  for dev, index in x.sharding.devices_indices_map(shape).items():
    r = _whole_rows(index, shape) if shape else (0, 1)
    if r is not None and r[1] > r[0]:
      ranges.setdefault(dev.process_index, set()).add(r)
  out = {}
  for proc, rs in ranges.items():
    runs: list[list[int]] = []
    for lo, hi in sorted(rs):
      if runs and lo <= runs[-1][1]:
        runs[-1][1] = max(runs[-1][1], hi)
      else:
        runs.append([lo, hi])
    out[proc] = [(lo, hi) for lo, hi in runs]
  return out


def _owners(x: jax.Array) -> tuple[dict[int, list[int]], int | None, bool]:
  """(process -> the chunk indices it hashes, rows per chunk, every chunk has an owner)."""
  shape = tuple(x.shape)
  holdings = _holdings(x)
  rows = hashing.chunk_rows(np.dtype(x.dtype), shape)
  n_rows = shape[0] if shape else 1
  if rows is None:  # flat: the lowest process holding every row
    whole = sorted(p for p, runs in holdings.items() if runs == [(0, n_rows)])
    return ({whole[0]: [0]} if whole else {}), None, bool(whole) or n_rows == 0
  n = hashing.num_chunks(shape, rows)
  owners: dict[int, list[int]] = {}
  complete = True
  for j in range(n):
    lo, hi = j * rows, min((j + 1) * rows, n_rows)
    who = [p for p in sorted(holdings) if any(a <= lo and hi <= b for a, b in holdings[p])]
    if who:  # several holders (replicated rows): they take contiguous shares of the chunks
      owners.setdefault(who[j * len(who) // n], []).append(j)
    else:
      complete = False
  return owners, rows, complete


def needs_regroup(x: jax.Array) -> bool:
  """True when some chunk (or a small tensor) is held whole by no process: re-lay it out
  with `row_layout` before `local_part`."""
  if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
    return False
  return not _owners(x)[2]


def row_layout(x: jax.Array) -> jax.Array:
  """`x` re-laid out so that `needs_regroup` is False: rows split over all of its mesh's
  devices when the chunks allow it, else replicated. A collective (see the module doc)."""
  sharding = x.sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is None:
    mesh = jax.sharding.Mesh(np.asarray(sorted(sharding.device_set, key=lambda d: d.id)), ("all",))
  shape = tuple(x.shape)
  rows = hashing.chunk_rows(np.dtype(x.dtype), shape)
  n_dev = math.prod(mesh.devices.shape)
  if rows is not None and shape[0] % n_dev == 0 and (shape[0] // n_dev) % rows == 0:
    target = NamedSharding(mesh, P(tuple(mesh.axis_names)))
  else:
    target = NamedSharding(mesh, P())
  # Waited for: on host devices, a process that runs ahead into the next re-layout while this
  # one is still in flight can interleave the two collectives differently from the others
  # and hang (seen with 2 processes x 2 CPU devices and gloo).
  return jax.block_until_ready(jax.device_put(x, target))


def writer_rows(x: Any) -> list[tuple[int, np.ndarray]]:
  """(first row, rows) runs of `x` that this process stores: the rows it holds whole and no
  lower-numbered process does (all of `x` on one process). Every row must be held whole by
  some process (`needs_regroup` False). Only this process's shards are copied."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:  # held whole here: process 0 writes
    if jax.process_index() != 0:
      return []
    return [(0, _fetch(x) if isinstance(x, jax.Array) else np.asarray(x))]
  holdings = _holdings(x)
  me = jax.process_index()
  taken: list[tuple[int, int]] = [r for p in sorted(holdings) if p < me for r in holdings[p]]
  out = []
  for lo, hi in holdings.get(me, []):
    at = lo
    for a, b in sorted(taken):  # subtract the rows lower processes write
      if b <= at or a >= hi:
        continue
      if a > at:
        out.append((at, _local_rows(x, at, a)))
      at = max(at, b)
    if at < hi:
      out.append((at, _local_rows(x, at, hi)))
  return out


def _local_rows(x: jax.Array, lo: int, hi: int) -> np.ndarray:
  """Rows [lo, hi) of `x` from this process's own shards (copies only those bytes)."""
  shape = tuple(x.shape)
  pieces: dict[tuple[int, int], Any] = {}
  for shard in x.addressable_shards:
    r = _whole_rows(shard.index, shape) if shape else (0, 1)
    if r is not None and r[0] < hi and lo < r[1]:
      pieces.setdefault(r, shard.data)
  out, at = [], lo
  for (a, b), data in sorted(pieces.items()):
    if b <= at:
      continue
    # Sliced on the device, so only these rows cross (this dispatches a computation: call it
    # from the training thread, as multihost.global_digests does, not beside it).
    host = np.asarray(data[at - a:min(b, hi) - a]) if shape else np.asarray(data)
    BYTES_FETCHED[0] += host.nbytes
    out.append(host)
    at = min(b, hi)
    if at >= hi:
      break
  if at < hi and shape:
    raise ValueError(f"this process does not hold rows {at}..{hi} whole")
  return out[0] if len(out) == 1 else np.concatenate(out)


def _nodes(block: np.ndarray, a: int, b: int, rows: int) -> dict[tuple[int, int], bytes]:
  """Complete subtrees over chunks [a, b), from their rows `block`."""
  leaves = [hashing.hash_chunk(block[i * rows:(i + 1) * rows]) for i in range(b - a)]
  return {(s, k): hashing.subtree(leaves[s - a:s - a + k]) for s, k in hashing.aligned_pieces(a, b)}


def local_part(x: Any) -> TensorPart:
  """This process's part of `hash_array(x)`; on one process, `merge([local_part(x)])` is it."""
  if not isinstance(x, jax.Array) or (len(x.sharding.device_set) == 1 and x.is_fully_addressable):
    a = _fetch(x) if isinstance(x, jax.Array) else np.asarray(x)
    rows = hashing.chunk_rows(a.dtype, a.shape)
    if rows is None:
      return TensorPart(a.dtype.name, a.shape, {}, hashing.hash_array(a))
    return TensorPart(a.dtype.name, a.shape, _nodes(a, 0, hashing.num_chunks(a.shape, rows), rows))
  dtype, shape = np.dtype(x.dtype), tuple(x.shape)
  if x.size == 0:  # nothing to hold: process 0 states the digest of the empty tensor
    flat = hashing.hash_array(np.zeros(shape, dtype)) if jax.process_index() == 0 else None
    return TensorPart(dtype.name, shape, {}, flat)
  owners, rows, complete = _owners(x)
  if not complete:
    raise ValueError(f"no process holds some rows of this {dtype.name}{list(shape)} array whole; "
                     "call shards.row_layout first")
  mine = owners.get(jax.process_index(), [])
  part = TensorPart(dtype.name, shape, {})
  if rows is None:
    if mine:
      part.flat = hashing.hash_array(_local_rows(x, 0, shape[0] if shape else 1))
    return part
  runs: list[list[int]] = []
  for j in mine:
    if runs and runs[-1][1] == j:
      runs[-1][1] = j + 1
    else:
      runs.append([j, j + 1])
  for a, b in runs:
    part.nodes.update(_nodes(_local_rows(x, a * rows, min(b * rows, shape[0])), a, b, rows))
  return part


def host_copy(x: Any) -> Any:
  """The value of `x` on the host, copied shard by shard from this process's devices.

  Never a computation across devices: `jax.device_get` of a sharded array may run a
  gathering program, and one issued from a second thread (the recorder's) beside the
  training thread's collectives can leave an in-process rendezvous short of a participant
  (XLA:CPU aborts after 40 s; seen on (4, 1) and (1, 4) meshes of host devices). A
  single-device copy is safe from any thread."""
  if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
    return np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else x
  if not x.is_fully_addressable:
    raise ValueError("host_copy needs every shard on this process")
  out = np.empty(x.shape, np.dtype(x.dtype))
  seen = set()
  for shard in x.addressable_shards:
    key = tuple(sl.indices(d)[:2] for sl, d in zip(shard.index, x.shape))
    if key not in seen:
      seen.add(key)
      out[shard.index] = np.asarray(shard.data)
  return out


def _fetch(x: jax.Array) -> np.ndarray:
  host = np.asarray(host_copy(x))
  BYTES_FETCHED[0] += host.nbytes
  return host


def hash_sharded(x: jax.Array) -> bytes:
  """`hash_array` of an array whose shards this process holds all of, shard by shard
  (no gathered copy of the whole array)."""
  if needs_regroup(x):
    return hashing.hash_array(_fetch(x))  # e.g. a trailing-axis split: gather (one process)
  return merge([local_part(x)])
