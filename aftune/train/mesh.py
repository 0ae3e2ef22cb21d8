"""Meshes from the run sheet: data parallel and FSDP placement of a job, with JAX's own
`jax.sharding` (a `Mesh` of named axes, `NamedSharding` per array).

  config.mesh.shape = (data, fsdp)   e.g. (4, 1) data parallel, (1, 4) FSDP, (2, 2) both
  config.mesh.shape = (data, fsdp, tensor)   e.g. (1, 2, 2): FSDP and tensor parallelism
  config.mesh.axes  = ("data", "fsdp")  (with three sizes: ("data", "fsdp", "tensor"))

Rules (`Placement`):
- a batch is sharded on its leading (example) axis over "data" and "fsdp" (every device
  of a "tensor" group holds the same examples);
- tensor parallel: a parameter the model family names (`TENSOR_PARALLEL`: path pattern ->
  axis; Llama: q/k/v and gate/up split their output columns, o and down their input rows,
  the Megatron arrangement) is split over "tensor" on that axis, and its optimizer moments
  like it;
- a parameter or optimizer-state leaf (FSDP) is sharded over "fsdp" on its first axis
  that the fsdp size divides, and replicated over "data"; leaves too small to be worth it
  (< `min_shard_elems`) and scalars are replicated.
Boundary tensors and gradients follow from jit's sharding propagation; the global
gradient norm and the loss are global scalars (the same jitted functions compute them).

What a mesh changes for the audit. The committed hashes are of the *logical* arrays
(`hashing.hash_array` of the gathered value), so a parameter, a batch or a boundary has
the same hash on 1 device or on any mesh. The values computed are another matter: a
reduction over a sharded axis (the loss and gradients over the data axis, a matmul over an
FSDP-gathered weight) may sum in another order. The mesh is therefore part of the job
spec (`hyperparameters.mesh`): an exact replay places the cell's arrays by the same rules
on the same mesh, and refuses (one clear error) when the verifier has fewer devices;
tolerance mode replays on whatever it has (docs/sharding.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aftune import errors
from aftune.crypto import hashing

PyTree = Any
AXES = ("data", "fsdp")
TENSOR = "tensor"  # the optional third axis: tensor parallelism by the family's rules


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """The committed description of a mesh (job spec `hyperparameters.mesh`)."""
  shape: tuple[int, ...]
  axes: tuple[str, ...] = AXES
  min_shard_elems: int = 16384

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def sizes(self) -> dict[str, int]:
    return {TENSOR: 1, **dict(zip(self.axes, self.shape))}

  @property
  def batch_axes(self) -> tuple[str, ...]:
    """The axes a batch's examples are split over (the tensor axis holds whole examples)."""
    return tuple(a for a in self.axes if a != TENSOR)

  @property
  def rules(self) -> str:
    return "fsdp+tensor" if TENSOR in self.axes else "fsdp"

  def to_dict(self) -> dict[str, Any]:
    return {"shape": list(self.shape), "axes": list(self.axes), "rules": self.rules,
            "min_shard_elems": self.min_shard_elems}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MeshSpec":
    spec = cls(tuple(int(s) for s in d["shape"]), tuple(d["axes"]), int(d["min_shard_elems"]))
    if d.get("rules") != spec.rules:
      raise errors.InputError(f"unknown mesh rules {d.get('rules')!r} for axes {list(spec.axes)}")
    return spec


def force_host_devices(n: int) -> None:
  """Makes XLA:CPU expose n host devices (XLA_FLAGS), unless a count is set already; must
  run before JAX starts its backend. No effect on a GPU or TPU backend's real devices."""
  flags = os.environ.get("XLA_FLAGS", "")
  if n > 1 and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def force_host_devices_for(spec: Any, num_processes: int = 1) -> None:
  """The same for a job spec (or a bundle manifest's spec) with a committed mesh, split over
  `num_processes` processes."""
  mesh = spec.get("hyperparameters", {}).get("mesh") if isinstance(spec, dict) else None
  shape = mesh.get("shape") if isinstance(mesh, dict) else None
  if isinstance(shape, list) and shape and all(isinstance(d, int) and 0 < d <= 4096 for d in shape):
    force_host_devices(max(1, math.prod(shape) // max(1, num_processes)))


def spec_from_sheet(config: Any) -> MeshSpec | None:
  """The run sheet's mesh, or None for one device (no `mesh` field, or shape all ones)."""
  m = config.get("mesh") if hasattr(config, "get") else None
  if m is None:
    return None
  shape = tuple(int(s) for s in m.shape)
  axes = tuple(m.get("axes", AXES))
  if len(shape) == 3 and axes == AXES:
    axes = (*AXES, TENSOR)  # (data, fsdp, tensor)
  if len(shape) != len(axes) or set(axes) not in (set(AXES), {*AXES, TENSOR}) or min(shape) < 1:
    raise errors.ConfigError(f"mesh.shape {list(shape)} / mesh.axes {list(axes)}: give one size "
                             f"per axis of {AXES}, or of {(*AXES, TENSOR)}")
  spec = MeshSpec(shape, axes, int(m.get("min_shard_elems", 16384)))
  return spec if spec.size > 1 else None


class Placement:
  """Where a job's arrays live on a mesh (the rules in the module docstring)."""

  def __init__(self, spec: MeshSpec, devices: list[Any] | None = None,
               tensor_rules: tuple[tuple[str, int], ...] = ()):
    devices = jax.devices() if devices is None else devices
    if len(devices) < spec.size:
      raise errors.ConfigError(
          f"the mesh {dict(zip(spec.axes, spec.shape))} needs {spec.size} devices, this process "
          f"has {len(devices)} (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count="
          f"{spec.size})")
    self.spec = spec
    self.mesh = jax.sharding.Mesh(np.asarray(devices[:spec.size]).reshape(spec.shape), spec.axes)
    self.fsdp = spec.sizes["fsdp"]
    self.tensor = spec.sizes[TENSOR]
    if self.tensor > 1 and not tensor_rules:
      raise errors.ConfigError("this model family has no tensor-parallel rules; use a mesh "
                               "without the tensor axis")
    self.tensor_rules = tuple((re.compile(rx), ax) for rx, ax in tensor_rules)

  def leaf_sharding(self, x: Any, path: str = "") -> NamedSharding:
    """The rules: the family's tensor-parallel axis (by parameter path) over "tensor", then
    FSDP over "fsdp" on the first other axis it divides; the rest replicated."""
    shape = np.shape(x)
    parts: list[str | None] = [None] * len(shape)
    if self.tensor > 1 and path:
      for rx, ax in self.tensor_rules:
        if rx.search(path) and ax < len(shape) and shape[ax] % self.tensor == 0:
          parts[ax] = TENSOR
          break
    if self.fsdp > 1 and math.prod(shape) >= self.spec.min_shard_elems:
      # The first axis the fsdp size divides: a split of the rows leaves each host whole
      # rows, which it hashes without the others' (crypto/shards.py).
      axes = [i for i, d in enumerate(shape) if d % self.fsdp == 0 and parts[i] is None]
      if axes:
        parts[axes[0]] = "fsdp"
    return NamedSharding(self.mesh, P(*parts))

  def _map(self, fn, tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(x, self.leaf_sharding(x, "/".join(hashing.path_components(p)))), tree)

  def state(self, tree: PyTree) -> PyTree:
    """Parameters or optimizer state, placed by the rules (an optimizer moment's path ends
    like its parameter's, so it is split like it)."""
    return self._map(_put, tree)

  def abstract(self, tree: PyTree) -> PyTree:
    """ShapeDtypeStructs with the rules' shardings (restore targets: Orbax reads each
    process's shards straight onto its devices)."""
    return self._map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree)

  def batch(self, batch: dict[str, Any]) -> dict[str, Any]:
    """Batch fields sharded on the example axis over every mesh axis."""
    n = math.prod(self.spec.sizes[a] for a in self.spec.batch_axes)
    out = {}
    for k, v in batch.items():
      if np.shape(v)[0] % n:
        raise errors.ConfigError(f"batch field {k!r} has {np.shape(v)[0]} examples, not a multiple "
                                 f"of the {n} data-parallel devices of the mesh")
      out[k] = _put(v, NamedSharding(self.mesh, P(self.spec.batch_axes)))
    return out

  def boundary(self, x: Any) -> Any:
    """A boundary tensor (activation or cotangent) as the training step leaves it: sharded on
    its leading (example) axis; a scalar (the loss, its cotangent) replicated."""
    n = math.prod(self.spec.sizes[a] for a in self.spec.batch_axes)
    if np.ndim(x) == 0 or np.shape(x)[0] % n:
      return _put(x, NamedSharding(self.mesh, P()))
    return _put(x, NamedSharding(self.mesh, P(self.spec.batch_axes)))


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
  """`jax.device_put`; with several processes a value held whole on this host (the same on
  every process: base weights, the batch) goes through numpy, each process placing its rows."""
  if jax.process_count() > 1 and not (isinstance(x, jax.Array) and not x.is_fully_addressable):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.device_put(x, sharding)
    x = np.asarray(x)
  return jax.device_put(x, sharding)
