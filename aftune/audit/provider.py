"""The provider's side of an audit, common to training and inference records.

A provider holds a recorded trace (its leaves and the Merkle tree over them), answers a
challenge with one bundle per cell, and refuses to send a tensor that does not match
its own commitment (`check`; a dishonest provider in the attack suite turns that off).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from typing import Iterable

from aftune import errors
from aftune.audit import bundle as bundle_lib
from aftune.crypto import hashing
from aftune.crypto import merkle
from aftune.model import blocks
from aftune.record import jobspec


class OpeningError(errors.InputError):
  """The provider cannot open a cell honestly (its own trace is inconsistent or damaged)."""


def model_digests(blocked: blocks.BlockedParams, trainable: list | None = None) -> list:
  """The per-parameter digests an opening reveals of a model: [[path components], hex]."""
  return [[list(c), d.hex()] for c, d in
          hashing.pytree_leaf_hashes(jobspec.unit_tree(blocked, trainable))]


class ProviderBase:
  """A recorded trace (leaves in Merkle order, the grid) and the openings made from it."""

  def __init__(self, where: Path, grid: Any, leaves: list, *, strict: bool = True):
    self.where, self.grid, self.strict = Path(where), grid, strict
    self.leaves = {(l.kind, l.step, l.block): l for l in leaves}
    self.tree = merkle.MerkleTree([l.hash() for l in leaves])

  def leaf_entry(self, kind: str, step: int, block: int) -> dict[str, Any]:
    """A revealed leaf: its (kind, step, block), payload and inclusion proof."""
    leaf = self.leaves[(kind, step, block)]
    index = self.grid.index(kind, step, block)
    return {"kind": kind, "step": step, "block": block, "payload": leaf.payload.hex(),
            "proof": [h.hex() for h in self.tree.inclusion_proof(index)]}

  def check(self, kind: str, step: int, block: int, digest: bytes, what: str) -> None:
    """Refuses to send a tensor that does not hash to its committed leaf (when strict)."""
    if self.strict and digest != self.leaves[(kind, step, block)].payload:
      raise OpeningError(f"{self.where}: {what} ({kind}, step {step}, block {block}) does not "
                         "match its committed hash; refusing to open it")

  def open_cell(self, k: int, s: int) -> bundle_lib.Bundle:
    raise NotImplementedError

  def check_cell(self, k: int, s: int) -> None:
    g = self.grid
    if not (0 <= k < g.num_layer_blocks and 0 <= s < g.num_step_blocks):
      raise OpeningError(f"cell ({k}, {s}) outside the {g.num_layer_blocks}x{g.num_step_blocks} grid")

  def open_challenge(self, cells: Iterable[tuple[int, int]], out_dir: str | Path) -> list[Path]:
    """Writes one bundle per cell into out_dir; never overwrites an opening."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, s in sorted(cells):  # in step order per block: each replay continues the last
      path = out_dir / bundle_lib.bundle_name(k, s)
      if path.exists():
        raise OpeningError(f"{path}: exists; refusing to overwrite an opening")
      bundle_lib.write_bundle(path, self.open_cell(k, s))
      paths.append(path)
    return paths
