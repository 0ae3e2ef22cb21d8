"""The model cut into layer blocks: units grouped into blocks of B_L consecutive units.

Every layer block carries a static `BlockSpec` (unit names and NNX graph definitions:
hashable, so it is a static argument of the jitted block functions) and two pure
pytrees: its trainable parameters and its frozen ones, each a dict unit name ->
`nnx.to_pure_dict` of that unit. Block k holds units [k*B_L, (k+1)*B_L).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from aftune.model import family

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """What block `index` computes; static (hashable) under jit."""
  index: int
  num_blocks: int
  arch: str  # the model family's architecture name (`family.get(arch)`)
  unit_names: tuple[str, ...]
  unit_indices: tuple[int, ...]  # position of each unit in the model, for dropout keys
  graphdefs: tuple[Any, ...]

  @property
  def is_first(self) -> bool:
    return self.index == 0

  @property
  def is_last(self) -> bool:
    return self.index == self.num_blocks - 1


@dataclasses.dataclass
class BlockedParams:
  """The model cut into layer blocks: static specs plus per-block pure pytrees."""
  specs: tuple[BlockSpec, ...]
  trainable: list[PyTree]
  frozen: list[PyTree]

  @property
  def num_blocks(self) -> int:
    return len(self.specs)


def num_layer_blocks(num_units: int, units_per_block: int) -> int:
  return -(-num_units // units_per_block)


def split_into_blocks(cfg: Any, units: dict[str, nnx.Module], units_per_block: int) -> BlockedParams:
  """Cuts the ordered units into layer blocks of `units_per_block` (B_L) units.

  Args:
    cfg: the model config (decides what is trainable).
    units: ordered unit name -> module, as `model.build_units` or the importer returns.
    units_per_block: B_L >= 1; the last block may hold fewer units.

  Returns:
    BlockedParams with one spec and one trainable/frozen pytree per layer block.
  """
  if units_per_block < 1:
    raise ValueError(f"units_per_block (B_L) must be >= 1, got {units_per_block}")
  fam = family.of(cfg)
  fam.check_trainable(cfg)
  names = list(units)
  if tuple(names) != fam.unit_names(cfg):
    raise ValueError(f"units {names} do not match the config's unit list {fam.unit_names(cfg)}")
  filt = fam.trainable_filter(cfg)
  n_blocks = num_layer_blocks(len(names), units_per_block)
  specs, trainable, frozen = [], [], []
  for b in range(n_blocks):
    idx = tuple(range(b * units_per_block, min((b + 1) * units_per_block, len(names))))
    graphdefs, t_block, f_block = [], {}, {}
    for i in idx:
      graphdef, t_state, f_state = nnx.split(units[names[i]], filt, ...)
      graphdefs.append(graphdef)
      t_block[names[i]] = nnx.to_pure_dict(t_state)
      f_block[names[i]] = nnx.to_pure_dict(f_state)
    specs.append(BlockSpec(b, n_blocks, cfg.arch, tuple(names[i] for i in idx), idx,
                           tuple(graphdefs)))
    trainable.append(t_block)
    frozen.append(f_block)
  return BlockedParams(tuple(specs), trainable, frozen)


def merge_units(blocked: BlockedParams, trainable: list[PyTree] | None = None) -> dict[str, nnx.Module]:
  """Rebuilds the unit modules (e.g. for generation) from blocked pytrees."""
  trainable = blocked.trainable if trainable is None else trainable
  units = {}
  for spec, t_block, f_block in zip(blocked.specs, trainable, blocked.frozen):
    for name, gd in zip(spec.unit_names, spec.graphdefs):
      units[name] = nnx.merge(gd, t_block[name], f_block[name])
  return units


def abstract_block(cfg: Any, units_per_block: int, block: int) -> tuple[BlockSpec, PyTree, PyTree]:
  """Spec and shape-only trainable/frozen pytrees of one layer block, allocating nothing.

  The verifier builds the block it replays this way: it never holds another block.
  """
  fam = family.of(cfg)
  names = fam.unit_names(cfg)
  n_blocks = num_layer_blocks(len(names), units_per_block)
  if not 0 <= block < n_blocks:
    raise ValueError(f"layer block {block} outside 0..{n_blocks - 1}")
  filt = fam.trainable_filter(cfg)
  idx = tuple(range(block * units_per_block, min((block + 1) * units_per_block, len(names))))
  graphdefs, t_block, f_block = [], {}, {}
  for i in idx:
    graphdef, t_state, f_state = nnx.split(fam.abstract_unit(cfg, names[i]), filt, ...)
    graphdefs.append(graphdef)
    t_block[names[i]] = nnx.to_pure_dict(t_state)
    f_block[names[i]] = nnx.to_pure_dict(f_state)
  spec = BlockSpec(block, n_blocks, cfg.arch, tuple(names[i] for i in idx), idx, tuple(graphdefs))
  return spec, t_block, f_block


def merge_lora(blocked: BlockedParams) -> BlockedParams:
  """The blocked model with every adapter folded into its kernel and no adapters left.

  Each LoRA Linear's kernel becomes kernel + lora_scale * (A @ B) (computed in fp32 at
  HIGHEST precision, stored in the kernel's dtype). The units then have the structure of
  `model.build_units(dataclasses.replace(cfg, lora=None))`; every `nnx.Param` is in
  `trainable`, the rest (a tied head's `TiedEmbedding`) in `frozen`. Same block cut.
  Merged and un-merged logits agree up to round-off, not bitwise.
  """
  units = family.get(blocked.specs[0].arch).merge_lora(merge_units(blocked))
  specs, trainable, frozen = [], [], []
  for spec in blocked.specs:
    graphdefs, t_block, f_block = [], {}, {}
    for name in spec.unit_names:
      graphdef, t_state, f_state = nnx.split(units[name], nnx.Param, ...)
      graphdefs.append(graphdef)
      t_block[name] = nnx.to_pure_dict(t_state)
      f_block[name] = nnx.to_pure_dict(f_state)
    specs.append(dataclasses.replace(spec, graphdefs=tuple(graphdefs)))
    trainable.append(t_block)
    frozen.append(f_block)
  return BlockedParams(tuple(specs), trainable, frozen)
