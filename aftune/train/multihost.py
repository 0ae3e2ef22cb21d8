"""Several processes (hosts) in one run, with JAX's own runtime: `jax.distributed`.

Every process runs the same program on its own devices (multi-controller SPMD); a mesh
spans the devices of all of them. What aftune adds is small:

- `initialize`: `jax.distributed.initialize` from flags or the environment
  (`--coordinator` / `JAX_COORDINATOR_ADDRESS`, `--num_processes` / `JAX_NUM_PROCESSES`,
  `--process_id` / `JAX_PROCESS_ID`), with CPU collectives (gloo) so that a run of several
  processes works on host devices too;
- `global_digests`: the canonical digests of arrays (and pytrees) that span processes.
  Each process hashes only what it holds (`crypto/shards.py`), the parts (a few 32-byte
  subtree digests per tensor) are exchanged with one all-gather, and every process merges
  them into the same digests; only the primary process writes them;
- `allgather_bytes`, `barrier`, `is_primary`.

Collectives must be issued by every process in the same order, so all of this runs on the
training thread, never on the recorder's worker thread.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from aftune import errors
from aftune.crypto import hashing
from aftune.crypto import shards

PyTree = Any


def process_count_from(num_processes: int | None = None) -> int:
  """The run's process count from a flag or JAX_NUM_PROCESSES (1 if neither), before JAX starts."""
  try:
    return int(num_processes or os.environ.get("JAX_NUM_PROCESSES") or 1)
  except ValueError as e:
    raise errors.ConfigError(f"JAX_NUM_PROCESSES: {e}") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins a run of several processes (True), or does nothing when there is one (False).

  Arguments left None come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. Must run before anything touches a JAX backend.
  """
  env = os.environ
  coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = process_count_from(num_processes)
  try:
    process_id = int(process_id if process_id is not None else env.get("JAX_PROCESS_ID", 0))
  except ValueError as e:
    raise errors.ConfigError(f"JAX_PROCESS_ID: {e}") from None
  if num_processes <= 1:
    return False
  if not coordinator or not 0 <= process_id < num_processes:
    raise errors.ConfigError(
        f"a run of {num_processes} processes needs a coordinator address (host:port) and a "
        f"process id in [0, {num_processes}); got {coordinator!r} and {process_id}")
  # Host (CPU) devices need a collectives library to reach the other processes' devices.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  return True


def is_primary() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)


def allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order (two all-gathers: the lengths, then the bytes)."""
  if jax.process_count() == 1:
    return [data]
  from jax.experimental import multihost_utils  # noqa: PLC0415
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int64)))
  width = int(lengths.max())
  buf = np.zeros(width, np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [bytes(rows[p, :int(lengths[p, 0])]) for p in range(rows.shape[0])]


def _spans_processes(x: Any) -> bool:
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def _local_parts(x: Any) -> dict[str, Any]:
  if _spans_processes(x) and shards.needs_regroup(x):
    x = shards.row_layout(x)  # a collective: every process takes this branch for this array
  return shards.local_part(x).to_json()


def global_digests(items: list[tuple[str, Any]]) -> list[bytes]:
  """Digests of ("tensor" | "pytree" | "batch", value) items, equal to `hashing.hash_array`,
  `hash_pytree`, `hash_batch` of the logical values, on every process.

  On one process this is those functions. On several, each process hashes its own rows
  and one all-gather carries the parts (see the module doc); every process must call it
  with the same items in the same order.
  """
  if jax.process_count() == 1:
    fn = {"tensor": hashing.hash_array, "pytree": hashing.hash_pytree, "batch": hashing.hash_batch}
    return [fn[kind](v) for kind, v in items]
  local = []
  for kind, v in items:
    if kind == "tensor":
      local.append([[[], _local_parts(v)]])
    elif kind in ("pytree", "batch"):
      local.append([[list(path), _local_parts(leaf)] for path, leaf in hashing._flatten(v)])
    else:
      raise ValueError(f"unknown digest kind {kind!r}")
  gathered = [json.loads(b) for b in allgather_bytes(json.dumps(local).encode())]
  out = []
  for i, (kind, _) in enumerate(items):
    per_leaf = list(zip(*(g[i] for g in gathered)))
    digests = [(tuple(entries[0][0]), shards.merge([shards.TensorPart.from_json(e[1])
                                                     for e in entries])) for entries in per_leaf]
    if kind == "tensor":
      out.append(digests[0][1])
    else:
      tag = hashing.TAG_BATCH if kind == "batch" else hashing.TAG_PYTREE
      out.append(hashing.hash_leaf_digests(digests, tag=tag))
  return out


def host_value(x: Any) -> np.ndarray:
  """The whole value of an array on this host (an all-gather when it spans processes: only
  for what must be stored in one place, e.g. the trace's boundary tensors)."""
  if _spans_processes(x):
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
