"""The committed trace of a run: where every leaf sits, and the append-only leaf file.

Leaf order (the Merkle position of every record is a pure function of the grid, so a
provider cannot commit two values for one (kind, step, layer block)):

  0                     job_spec                      (step -1, block -1)
  for t in 0..T-1:
    if t % B_S == 0:    params[k], opt_state[k]       (k = 0..K-1; state at step t)
                        indices, batch, step_key, loss, grad_norm      (block -1)
                        fwd_out[k], bwd_in[k], sq_norms[k]             (k = 0..K-1)
                        unit_out[u]   (u: every unit but the last of its block, in order;
                                       the leaf's block field holds the unit index u)
  at T:                 params[k], opt_state[k]       (the final state)

On disk, `trace/leaves.bin` holds one fixed-size record per leaf: kind id (u8), step
(i64 LE), block (i64 LE), payload (32 bytes). The Merkle leaf hash is
`merkle.leaf_hash(kind, step, block, payload)` (docs/hashing.md).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any
from typing import Iterator

from aftune import errors
from aftune.crypto import merkle

JOB_KINDS = ("job_spec",)
STATE_KINDS = ("params", "opt_state")
GLOBAL_KINDS = ("indices", "batch", "step_key", "loss", "grad_norm")
BLOCK_KINDS = ("fwd_out", "bwd_in", "sq_norms")
# Inference records (aftune/inference.py): appended, so training kind ids never change.
INFERENCE_KINDS = ("inf_spec", "tokens", "sample_key", "inf_out")
INFERENCE_STEP_KINDS = ("tokens", "sample_key")
UNIT_KINDS = ("unit_out",)  # inner-unit outputs: locate a failing replay to the unit
KINDS = JOB_KINDS + STATE_KINDS + GLOBAL_KINDS + BLOCK_KINDS + INFERENCE_KINDS + UNIT_KINDS
_KIND_ID = {k: i for i, k in enumerate(KINDS)}

RECORD = struct.Struct("<Bqq32s")


class TraceError(errors.InputError):
  """A trace that is missing, truncated, corrupt or inconsistent (names the file)."""


@dataclasses.dataclass(frozen=True)
class Grid:
  """The audit grid of a run: T steps in step blocks of B_S, K layer blocks of B_L units."""
  num_steps: int
  steps_per_block: int  # B_S
  num_layer_blocks: int  # K
  units_per_block: int  # B_L
  checkpoint_interval: int = 1  # I_C, in step blocks
  activation_interval: int = 1  # I_A, in layer blocks
  num_units: int = 0  # units of the model; 0: no unit_out leaves

  def __post_init__(self):
    for name in ("num_steps", "steps_per_block", "num_layer_blocks", "units_per_block",
                 "checkpoint_interval", "activation_interval"):
      if getattr(self, name) < 1:
        raise ValueError(f"grid {name} must be >= 1, got {getattr(self, name)}")
    if self.num_units and -(-self.num_units // self.units_per_block) != self.num_layer_blocks:
      raise ValueError(f"{self.num_units} units in blocks of {self.units_per_block} do not make "
                       f"{self.num_layer_blocks} layer blocks")

  @property
  def num_step_blocks(self) -> int:
    return -(-self.num_steps // self.steps_per_block)

  @property
  def checkpoint_every_steps(self) -> int:
    return self.steps_per_block * self.checkpoint_interval

  def step_block_range(self, step_block: int) -> range:
    lo = step_block * self.steps_per_block
    return range(lo, min(lo + self.steps_per_block, self.num_steps))

  def is_state_step(self, step: int) -> bool:
    return step % self.steps_per_block == 0 or step == self.num_steps

  def stores_boundary(self, block: int) -> bool:
    """Boundary tensors are stored for every I_A-th layer block (the rest is replayed)."""
    return block % self.activation_interval == 0

  def is_checkpoint_step(self, step: int) -> bool:
    return step % self.checkpoint_every_steps == 0 or step == self.num_steps

  @property
  def inner_units(self) -> tuple[int, ...]:
    """Units whose output is not a block boundary (all but the last unit of each block)."""
    b_l = self.units_per_block
    return tuple(u for u in range(self.num_units) if u % b_l != b_l - 1 and u != self.num_units - 1)

  def block_of_unit(self, unit: int) -> int:
    return unit // self.units_per_block

  def _per_step(self) -> int:
    return len(GLOBAL_KINDS) + len(BLOCK_KINDS) * self.num_layer_blocks + len(self.inner_units)

  def offset(self, step: int) -> int:
    """Index of the first leaf of `step` (0 <= step <= T): the leaf count before it."""
    if not 0 <= step <= self.num_steps:
      raise ValueError(f"step {step} outside 0..{self.num_steps}")
    state_steps_before = -(-step // self.steps_per_block)
    return 1 + step * self._per_step() + state_steps_before * len(STATE_KINDS) * self.num_layer_blocks

  @property
  def num_leaves(self) -> int:
    return self.offset(self.num_steps) + len(STATE_KINDS) * self.num_layer_blocks

  def index(self, kind: str, step: int, block: int) -> int:
    """The Merkle position of a record."""
    k_count = self.num_layer_blocks
    if kind == "job_spec":
      if (step, block) != (-1, -1):
        raise ValueError("job_spec is at step -1, block -1")
      return 0
    if kind in STATE_KINDS:
      if not self.is_state_step(step) or not 0 <= block < k_count:
        raise ValueError(f"no {kind} leaf at step {step}, block {block}")
      return self.offset(step) + STATE_KINDS.index(kind) * k_count + block
    if not 0 <= step < self.num_steps:
      raise ValueError(f"no {kind} leaf at step {step} (steps 0..{self.num_steps - 1})")
    base = self.offset(step) + (len(STATE_KINDS) * k_count if self.is_state_step(step) else 0)
    if kind in GLOBAL_KINDS:
      if block != -1:
        raise ValueError(f"{kind} is a per-step record (block -1), got block {block}")
      return base + GLOBAL_KINDS.index(kind)
    if kind in BLOCK_KINDS:
      if not 0 <= block < k_count:
        raise ValueError(f"block {block} outside 0..{k_count - 1}")
      return base + len(GLOBAL_KINDS) + BLOCK_KINDS.index(kind) * k_count + block
    if kind == "unit_out":
      if block not in self.inner_units:
        raise ValueError(f"unit {block} has no unit_out leaf (inner units: {self.inner_units})")
      return base + len(GLOBAL_KINDS) + len(BLOCK_KINDS) * k_count + self.inner_units.index(block)
    raise ValueError(f"unknown leaf kind {kind!r}")

  def key_at(self, index: int) -> tuple[str, int, int]:
    """(kind, step, block) of the leaf at Merkle position `index` (inverse of `index`)."""
    if not 0 <= index < self.num_leaves:
      raise ValueError(f"leaf index {index} outside 0..{self.num_leaves - 1}")
    if index == 0:
      return ("job_spec", -1, -1)
    lo, hi = 0, self.num_steps  # the step t with offset(t) <= index < offset(t + 1)
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if self.offset(mid) <= index:
        lo = mid
      else:
        hi = mid - 1
    t, r, k_count = lo, index - self.offset(lo), self.num_layer_blocks
    if self.is_state_step(t):
      if r < len(STATE_KINDS) * k_count:
        return (STATE_KINDS[r // k_count], t, r % k_count)
      r -= len(STATE_KINDS) * k_count
    if r < len(GLOBAL_KINDS):
      return (GLOBAL_KINDS[r], t, -1)
    r -= len(GLOBAL_KINDS)
    if r < len(BLOCK_KINDS) * k_count:
      return (BLOCK_KINDS[r // k_count], t, r % k_count)
    return ("unit_out", t, self.inner_units[r - len(BLOCK_KINDS) * k_count])

  def keys(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, int, int]]:
    """(kind, step, block) of the leaves [start, stop) in Merkle order."""
    stop = self.num_leaves if stop is None else min(stop, self.num_leaves)
    return (self.key_at(i) for i in range(start, stop))

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "num_step_blocks": self.num_step_blocks,
            "num_leaves": self.num_leaves}

  @classmethod
  def from_dict(cls, d: dict) -> "Grid":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: int(v) for k, v in d.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class InferenceGrid:
  """Token positions x layer blocks of one served batch (a cell is (block k, step t))."""
  num_steps: int
  num_layer_blocks: int
  units_per_block: int
  activation_interval: int = 1

  @property
  def num_leaves(self) -> int:
    return 1 + self.num_steps * (len(INFERENCE_STEP_KINDS) + self.num_layer_blocks)

  def stores_boundary(self, block: int) -> bool:
    return block % self.activation_interval == 0

  @property
  def num_step_blocks(self) -> int:
    """The challenge's column count: every generation step is its own column."""
    return self.num_steps

  def index(self, kind: str, step: int, block: int) -> int:
    per = len(INFERENCE_STEP_KINDS) + self.num_layer_blocks
    if kind == "inf_spec":
      if (step, block) != (-1, -1):
        raise ValueError("inf_spec is at step -1, block -1")
      return 0
    if not 0 <= step < self.num_steps:
      raise ValueError(f"no {kind} leaf at step {step} (steps 0..{self.num_steps - 1})")
    if kind in INFERENCE_STEP_KINDS:
      if block != -1:
        raise ValueError(f"{kind} is a per-step record (block -1), got block {block}")
      return 1 + step * per + INFERENCE_STEP_KINDS.index(kind)
    if kind == "inf_out":
      if not 0 <= block < self.num_layer_blocks:
        raise ValueError(f"block {block} outside 0..{self.num_layer_blocks - 1}")
      return 1 + step * per + len(INFERENCE_STEP_KINDS) + block
    raise ValueError(f"unknown inference leaf kind {kind!r}")

  def key_at(self, index: int) -> tuple[str, int, int]:
    if not 0 <= index < self.num_leaves:
      raise ValueError(f"leaf index {index} outside 0..{self.num_leaves - 1}")
    if index == 0:
      return ("inf_spec", -1, -1)
    t, r = divmod(index - 1, len(INFERENCE_STEP_KINDS) + self.num_layer_blocks)
    if r < len(INFERENCE_STEP_KINDS):
      return (INFERENCE_STEP_KINDS[r], t, -1)
    return ("inf_out", t, r - len(INFERENCE_STEP_KINDS))

  def to_dict(self) -> dict[str, int]:
    # num_step_blocks: the challenge module draws (layer block, step) cells over this grid.
    return {**dataclasses.asdict(self), "num_step_blocks": self.num_step_blocks,
            "num_leaves": self.num_leaves}

  @classmethod
  def from_dict(cls, d: dict) -> "InferenceGrid":
    return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Leaf:
  kind: str
  step: int
  block: int
  payload: bytes

  def hash(self) -> bytes:
    return merkle.leaf_hash(self.kind, self.step, self.block, self.payload)

  def pack(self) -> bytes:
    return RECORD.pack(_KIND_ID[self.kind], self.step, self.block, self.payload)


def _unpack(path: Path, index: int, raw: bytes) -> Leaf:
  kind_id, step, block, payload = RECORD.unpack(raw)
  if kind_id >= len(KINDS):
    raise TraceError(f"{path}: record {index} has unknown kind id {kind_id}")
  return Leaf(KINDS[kind_id], step, block, payload)


def read_leaves(path: Path, grid: Any, *, allow_partial: bool = False) -> list[Leaf]:
  """Reads and validates leaf records: each must sit where the grid says.

  Args:
    path: trace/leaves.bin.
    grid: the layout: a training `Grid` or an `InferenceGrid`.
    allow_partial: accept fewer than grid.num_leaves records (a run in progress;
      a torn last record is dropped).

  Returns:
    The leaves in Merkle order.
  """
  try:
    data = Path(path).read_bytes()
  except FileNotFoundError:
    raise TraceError(f"{path}: trace leaf file missing") from None
  n, rest = divmod(len(data), RECORD.size)
  if rest and not allow_partial:
    raise TraceError(f"{path}: truncated ({len(data)} bytes is not a whole number of "
                     f"{RECORD.size}-byte records)")
  if not allow_partial and n != grid.num_leaves:
    raise TraceError(f"{path}: holds {n} records, the grid needs {grid.num_leaves} (truncated?)")
  if n > grid.num_leaves:
    raise TraceError(f"{path}: holds {n} records, more than the grid's {grid.num_leaves}")
  leaves = []
  for i in range(n):
    key = grid.key_at(i)
    leaf = _unpack(path, i, data[i * RECORD.size:(i + 1) * RECORD.size])
    if (leaf.kind, leaf.step, leaf.block) != key:
      raise TraceError(f"{path}: record {i} is {(leaf.kind, leaf.step, leaf.block)}, expected {key}")
    leaves.append(leaf)
  return leaves


class LeafWriter:
  """Appends leaf records and keeps the streaming Merkle root; resumable at a leaf count."""

  def __init__(self, path: Path, grid: Any, resume_at: int = 0):
    self.path, self.grid = Path(path), grid
    self.tree = merkle.StreamingMerkle()
    self.leaf_hashes: list[bytes] = []
    if resume_at:
      leaves = read_leaves(self.path, grid, allow_partial=True)
      if len(leaves) < resume_at:
        raise TraceError(f"{self.path}: holds {len(leaves)} records, cannot resume at {resume_at}")
      for leaf in leaves[:resume_at]:
        self._add(leaf.hash())
      # Records past the resume point were written after the checkpoint we resume
      # from; the resumed run rewrites them, bit for bit (periodic roots check it).
      with open(self.path, "r+b") as f:
        f.truncate(resume_at * RECORD.size)
    else:
      if self.path.exists() and self.path.stat().st_size:
        raise TraceError(f"{self.path}: a trace already exists; refusing to overwrite it")
    self._f = open(self.path, "ab")

  def _add(self, h: bytes) -> None:
    self.tree.append(h)
    self.leaf_hashes.append(h)

  @property
  def size(self) -> int:
    return self.tree.size

  def append(self, leaf: Leaf) -> None:
    expected = self.grid.key_at(self.size) if self.size < self.grid.num_leaves else None
    if (leaf.kind, leaf.step, leaf.block) != expected:
      raise TraceError(f"{self.path}: leaf {self.size} would be "
                       f"{(leaf.kind, leaf.step, leaf.block)}, the layout says {expected}")
    self._f.write(leaf.pack())
    self._add(leaf.hash())

  def sync(self) -> None:
    self._f.flush()
    os.fsync(self._f.fileno())

  def close(self) -> None:
    if not self._f.closed:
      self.sync()
      self._f.close()
