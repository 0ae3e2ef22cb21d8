"""Optimizers (optax) with clipping by a global norm that is summed in one canonical order.

Clipping couples every layer block through one scalar, the global gradient norm. The
blocked step and the verifier of one block must get the same bits for it, so it is not
optax's `clip_by_global_norm` (whose per-leaf sum order depends on the tree it sees)
but: per leaf, the fp32 sum of squares; then one left-to-right chain of additions over
all leaves in model order: units in their order in the model (the block spec's unit
order, which the model family defines), and
inside a unit the `jax.tree_util` leaf order of its parameters. The order does not
depend on how units are grouped into blocks. The per-leaf partial sums are what the
recorder commits, so a verifier of one block can check its share. (The single-jit
baseline sums in the same order but XLA may round the squares differently inside one
big program: docs/determinism.md.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

PyTree = Any


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Hashable optimizer settings (static under jit)."""
  name: str = "sgd"  # "sgd" | "adamw"
  learning_rate: float = 1e-5
  momentum: float = 0.0  # sgd only; 0 disables the trace
  nesterov: bool = False
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  schedule: str = "constant"  # "constant" | "cosine" | "linear"
  warmup_steps: int = 0
  total_steps: int = 1
  end_lr_fraction: float = 0.0  # final lr / peak lr for cosine and linear decay
  clip_norm: float = 0.0  # 0 disables clipping

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Warmup (linear from 0) followed by constant, cosine or linear decay."""
  peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_fraction
  decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
  if cfg.schedule == "constant":
    decay = optax.constant_schedule(peak)
  elif cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_fraction)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    raise ValueError(f"unknown learning-rate schedule {cfg.schedule!r} (constant, cosine, linear)")
  if cfg.warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


@functools.lru_cache(maxsize=None)
def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """The per-leaf optimizer (clipping is applied before it, see `clip_by_norm`)."""
  lr = make_schedule(cfg)
  if cfg.name == "sgd":
    tx = optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    if cfg.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    return tx
  if cfg.name == "adamw":
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  raise ValueError(f"unknown optimizer {cfg.name!r} (sgd, adamw)")


def sq_norm_partials(grads: PyTree, unit_order: Sequence[str] | None = None) -> jax.Array:
  """fp32 sum of squares of every leaf: f32[num_leaves], units in model order.

  Args:
    grads: a block's gradients, {unit name: parameter tree}.
    unit_order: the block's units in model order (jax would sort the dict's keys:
      "layer_10" < "layer_2"); None: the tree's own leaf order.
  """
  if unit_order is not None:
    leaves = [x for name in unit_order for x in jax.tree_util.tree_leaves(grads[name])]
  else:
    leaves = jax.tree_util.tree_leaves(grads)
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  return jnp.stack([jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves])


def global_norm(partials: Sequence[jax.Array]) -> jax.Array:
  """sqrt of the left-to-right sum of every block's partial sums (the canonical order)."""
  total = jnp.zeros((), jnp.float32)
  for p in partials:
    for i in range(p.shape[0]):
      total = total + p[i]
  return jnp.sqrt(total)


def clip_by_norm(grads: PyTree, g_norm: jax.Array, clip_norm: float) -> PyTree:
  """Same arithmetic as optax.clip_by_global_norm, with the norm given."""
  if not clip_norm:
    return grads
  trigger = g_norm < clip_norm
  return jax.tree.map(
      lambda g: jnp.where(trigger, g, (g / g_norm.astype(g.dtype)) * clip_norm), grads)


def apply_update(cfg: OptimConfig, params: PyTree, opt_state: PyTree, grads: PyTree,
                 g_norm: jax.Array) -> tuple[PyTree, PyTree]:
  """One optimizer update of one block (pure; jitted by the caller)."""
  tx = make_optimizer(cfg)
  grads = clip_by_norm(grads, g_norm, cfg.clip_norm)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def init_opt_state(cfg: OptimConfig, params: PyTree) -> PyTree:
  return make_optimizer(cfg).init(params)


def learning_rate_at(cfg: OptimConfig, step: int) -> float:
  return float(make_schedule(cfg)(step))
