"""The training step as a composition of pure, per-layer-block functions, jitted once.

One optimizer step of the blocked model is

  forward:  x_{k+1}, vjp_k, inner_k, state_k = fwd(spec_k, params_k, frozen_k, x_k, batch, key)
            (x_0 is the batch's input field; the last block returns the loss)
  backward: grads_k, ct_k = bwd(vjp_k, ct_{k+1})   (ct_K = 1.0, the loss's cotangent)
  norm:     partials_k = sq_norms(spec_k, grads_k); g = combine(partials_0..K-1)
  update:   params_k, opt_k = update(opt_cfg, params_k, opt_k, grads_k, g, state_k)

`state_k` is the non-parameter state a training forward updates (a family's
`TRAIN_STATE`, e.g. BatchNorm running statistics), kept in the block's parameter tree:
the update writes it over the optimizer's result. It is {} for families without one.

The pure functions are defined here; `BlockFns` jits them once, and that one object is
what training, the provider's regeneration, every dishonest provider, the verifier's
replay, the benchmarks and the program fingerprint all call: there is no second code
path. `blocked_step` is one step of the whole model; `block_step` one step of one block
(the global norm from the caller): the verifier's and the provider's one-block replay.
`plain_step` composes the same math in one `jit`: the unaudited baseline.

What a unit computes, its per-batch context and the loss come from the model family
(`aftune/model/family.py`), named by the block spec.

Boundary tensors, by name: `fwd_out[k]` is the activation leaving block k (the loss
for the last block) and `bwd_in[k]` is the cotangent entering block k from above
(d loss / d fwd_out[k]; 1.0 for the last block).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from aftune.model import blocks
from aftune.model import family
from aftune.train import optim

PyTree = Any
Batch = Mapping[str, jax.Array]  # the family's batch fields, e.g. tokens, targets, masks [B, T]


# ---- the pure functions --------------------------------------------------------------


def block_forward(spec: blocks.BlockSpec, params: PyTree, frozen: PyTree, x_in: jax.Array,
                  batch: Batch, step_key: jax.Array | None
                  ) -> tuple[jax.Array, tuple[list[jax.Array], PyTree]]:
  """Pure forward of one layer block.

  Returns:
    (its output boundary: the loss for the last block; (the outputs of its inner units,
    i.e. of every unit but the last, which the recorder commits so that a failing
    replay can be located to the unit; the updated training state, unit name -> pure
    dict of the family's `TRAIN_STATE` variables, {} without any)).
  """
  fam = family.get(spec.arch)
  state_type = getattr(fam, "TRAIN_STATE", None)
  ctx = fam.context(batch)
  x = x_in
  inner, updates = [], {}
  for name, unit_index, graphdef in zip(spec.unit_names, spec.unit_indices, spec.graphdefs):
    if name != spec.unit_names[0]:
      inner.append(x)
    unit = nnx.merge(graphdef, params[name], frozen[name])
    # Dropout and augmentation keys depend on (step, unit), never on how units are
    # grouped into blocks.
    unit_key = None if step_key is None else jax.random.fold_in(step_key, unit_index)
    x = unit(x, {**ctx, "key": unit_key})
    if state_type is not None:
      new_state = nnx.to_pure_dict(nnx.state(unit, state_type))
      if new_state:
        updates[name] = new_state
  if spec.is_last:
    x = fam.loss(x, batch)
  return x, (inner, updates)


def with_state(params: PyTree, updates: PyTree) -> PyTree:
  """`params` with the leaves `updates` names replaced (nested dicts of the same paths)."""
  if not isinstance(updates, dict):
    return updates
  if not updates:
    return params
  out = dict(params)
  for k, v in updates.items():
    out[k] = with_state(params[k], v)
  return out


def block_fwd(spec: blocks.BlockSpec, params: PyTree, frozen: PyTree, x_in: jax.Array, batch: Batch,
              step_key: jax.Array | None):
  """Forward of one block: (output boundary, VJP closure over its residuals, inner unit outputs,
  updated training state)."""
  if spec.is_first:  # the model's input (token ids, images) gets no cotangent
    y, vjp, (inner, updates) = jax.vjp(
        lambda p: block_forward(spec, p, frozen, x_in, batch, step_key), params, has_aux=True)
  else:
    y, vjp, (inner, updates) = jax.vjp(
        lambda p, x: block_forward(spec, p, frozen, x, batch, step_key), params, x_in, has_aux=True)
  return y, vjp, inner, updates


def block_bwd(vjp: Any, ct_out: jax.Array) -> tuple[PyTree, jax.Array | None]:
  """Applies a block's VJP: (parameter gradients, cotangent passed down or None)."""
  out = vjp(ct_out)
  return out[0], (out[1] if len(out) > 1 else None)


def block_sq_norms(spec: blocks.BlockSpec, grads: PyTree) -> jax.Array:
  return optim.sq_norm_partials(grads, spec.unit_names)


def combine_norms(partials: Sequence[jax.Array]) -> jax.Array:
  return optim.global_norm(partials)


def block_update(opt_cfg: optim.OptimConfig, params: PyTree, opt_state: PyTree, grads: PyTree,
                 g_norm: jax.Array, updates: PyTree) -> tuple[PyTree, PyTree]:
  """The optimizer step, then the forward's training state written over its leaves (their
  gradients are zero; what the optimizer did to them, e.g. weight decay, is discarded)."""
  params, opt_state = optim.apply_update(opt_cfg, params, opt_state, grads, g_norm)
  return with_state(params, updates), opt_state


def plain_step(specs: tuple[blocks.BlockSpec, ...], opt_cfg: optim.OptimConfig,
               params: list[PyTree], opt_states: list[PyTree], frozen: list[PyTree],
               batch: Batch, step_key: jax.Array | None):
  """The unaudited baseline: the same math as `blocked_step`, as one XLA program.

  Returns:
    (new params, new opt states, loss, grad norm).
  """

  def loss_fn(all_params):
    x = batch[family.get(specs[0].arch).INPUT_KEY]
    updates = []
    for spec, p, f in zip(specs, all_params, frozen):
      x, (_, u) = block_forward(spec, p, f, x, batch, step_key)
      updates.append(u)
    return x, updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  g_norm = optim.global_norm([optim.sq_norm_partials(g, s.unit_names) for s, g in zip(specs, grads)])
  new = [block_update(opt_cfg, p, o, g, g_norm, u)
         for p, o, g, u in zip(params, opt_states, grads, updates)]
  return [p for p, _ in new], [o for _, o in new], loss, g_norm


def loss_seed(loss: jax.Array) -> jax.Array:
  return jnp.ones_like(loss)


# ---- jitted once ---------------------------------------------------------------------


class BlockFns:
  """The jitted block functions, built once and handed to everything that runs a step.

  The jit objects keep their names (`jit_block_fwd`, ...): the lowered programs, and
  so the committed program fingerprint, are those of the pure functions above. This
  is the one place where placement (in/out shardings, donation) is decided; the
  sharded runs of a mesh pass it here.
  """

  def __init__(self):
    # The block spec and the optimizer config are static: hashable, they select the
    # program; everything else is traced.
    self.fwd = jax.jit(block_fwd, static_argnums=0)
    self.bwd = jax.jit(block_bwd)
    self.sq_norms = jax.jit(block_sq_norms, static_argnums=0)
    self.combine = jax.jit(combine_norms)
    self.update = jax.jit(block_update, static_argnums=0)
    self.plain_step = jax.jit(plain_step, static_argnums=(0, 1))


@functools.cache
def default_fns() -> BlockFns:
  """The process's BlockFns: one set of compiled programs for training and verification."""
  return BlockFns()


# ---- compositions --------------------------------------------------------------------


@dataclasses.dataclass
class StepTrace:
  """Everything one blocked step exposes to the recorder (device arrays, not yet fetched)."""
  loss: jax.Array
  fwd_out: list[jax.Array]  # [num_blocks]; last is the loss
  unit_out: list[list[jax.Array]]  # [num_blocks][inner units]: outputs of all but the last unit
  bwd_in: list[jax.Array]  # [num_blocks]; cotangent entering block k from above
  sq_norm_partials: list[jax.Array]  # [num_blocks] of f32[num_leaves_k]
  grad_norm: jax.Array


def blocked_step(specs: Sequence[blocks.BlockSpec], opt_cfg: optim.OptimConfig,
                 params: list[PyTree], opt_states: list[PyTree], frozen: list[PyTree],
                 batch: Batch, step_key: jax.Array | None, *, fns: BlockFns | None = None):
  """One optimizer step of the whole model as per-block jitted calls (dispatched asynchronously).

  Args:
    specs: the static block specs.
    opt_cfg: optimizer settings.
    params, opt_states, frozen: per-block pytrees.
    batch: the step's batch.
    step_key: fold_in(root_key, step), or None without dropout.
    fns: the jitted functions (default: the process's).

  Returns:
    (new params, new opt states, StepTrace).
  """
  fns = fns or default_fns()
  x = batch[family.get(specs[0].arch).INPUT_KEY]
  fwd_out, vjps, unit_out, updates = [], [], [], []
  for spec, p, f in zip(specs, params, frozen):
    x, vjp, inner, u = fns.fwd(spec, p, f, x, batch, step_key)
    fwd_out.append(x)
    vjps.append(vjp)
    unit_out.append(inner)
    updates.append(u)
  n = len(specs)
  bwd_in: list[Any] = [None] * n
  grads: list[Any] = [None] * n
  ct = loss_seed(fwd_out[-1])
  for k in reversed(range(n)):
    bwd_in[k] = ct
    grads[k], ct = fns.bwd(vjps[k], ct)
  del vjps  # frees the residuals before the update allocates
  partials = [fns.sq_norms(s, g) for s, g in zip(specs, grads)]
  g_norm = fns.combine(partials)
  new_params, new_opt = [], []
  for p, o, g, u in zip(params, opt_states, grads, updates):
    p, o = fns.update(opt_cfg, p, o, g, g_norm, u)
    new_params.append(p)
    new_opt.append(o)
  return new_params, new_opt, StepTrace(fwd_out[-1], fwd_out, unit_out, bwd_in, partials, g_norm)


@dataclasses.dataclass
class BlockStep:
  """One step of one block: its new state and every tensor a replay compares."""
  params: PyTree
  opt_state: PyTree
  out: jax.Array  # fwd_out[k] (the loss for the last block)
  inner: list[jax.Array]  # inner unit outputs
  ct_in: jax.Array  # the cotangent it received from above (1.0 for the last block)
  ct_down: jax.Array | None  # the cotangent it passes down (None for the first block)
  sq_norms: jax.Array  # its norm partials
  grad_norm: jax.Array  # the global norm its update used


def block_step(spec: blocks.BlockSpec, opt_cfg: optim.OptimConfig, params: PyTree,
               opt_state: PyTree, frozen: PyTree, x_in: jax.Array, batch: Batch,
               step_key: jax.Array | None, ct_from_above: jax.Array | None,
               grad_norm: Callable[[jax.Array], jax.Array], *,
               fns: BlockFns | None = None) -> BlockStep:
  """One optimizer step of layer block `spec.index` alone, with the same jitted functions.

  Args:
    spec, opt_cfg, params, opt_state, frozen: the block and its state.
    x_in: the block's input boundary (the batch's input field for block 0).
    batch, step_key: the step's batch and key.
    ct_from_above: bwd_in[k], the cotangent from the block above (ignored for the last
      block, which seeds its loss with 1.0).
    grad_norm: maps this block's norm partials to the global norm its update uses (the
      committed scalar, or the partials combined with the other blocks' committed ones).
    fns: the jitted functions (default: the process's).

  Returns:
    The BlockStep.
  """
  fns = fns or default_fns()
  y, vjp, inner, updates = fns.fwd(spec, params, frozen, x_in, batch, step_key)
  ct = loss_seed(y) if spec.is_last else ct_from_above
  grads, ct_down = fns.bwd(vjp, ct)
  partial = fns.sq_norms(spec, grads)
  g_norm = grad_norm(partial)
  params, opt_state = fns.update(opt_cfg, params, opt_state, grads, g_norm, updates)
  return BlockStep(params, opt_state, y, inner, ct, ct_down, partial, g_norm)
