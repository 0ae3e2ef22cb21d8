"""The training step as a composition of pure, jitted, per-layer-block functions.

One optimizer step of the blocked model is

  forward:  x_{k+1}, vjp_k = block_fwd(spec_k, params_k, frozen_k, x_k, batch, key)
            (x_0 is the token batch; the last block returns the loss)
  backward: grads_k, ct_k = block_bwd(vjp_k, ct_{k+1})   (ct_K = 1.0, the loss's cotangent)
  norm:     partials_k = block_sq_norms(grads_k); g = global_norm(partials_0..K-1)
  update:   params_k, opt_k = block_update(opt_cfg, params_k, opt_k, grads_k, g)

The verifier replays a cell with these very functions: there is no second code path.
`plain_step` composes the same pure functions in one `jit`: the unaudited baseline.

Boundary tensors, by name: `fwd_out[k]` is the activation leaving block k (the loss
for the last block) and `bwd_in[k]` is the cotangent entering block k from above
(d loss / d fwd_out[k]; 1.0 for the last block).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from aftune import grid
from aftune import model as model_lib
from aftune import optim

PyTree = Any
Batch = Mapping[str, jax.Array]  # tokens, targets, loss_mask, attn_mask: [B, T]


def positions_from_mask(attn_mask_BxT: jax.Array) -> jax.Array:
  """Position ids that skip padding (right padding: 0..T-1; left padding also works)."""
  return jnp.maximum(jnp.cumsum(attn_mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def block_forward(spec: grid.BlockSpec, params: PyTree, frozen: PyTree, x_in: jax.Array,
                  batch: Batch, step_key: jax.Array | None) -> tuple[jax.Array, list[jax.Array]]:
  """Pure forward of one layer block.

  Returns:
    (its output boundary: the loss for the last block; the outputs of its inner units,
    i.e. of every unit but the last, which the recorder commits so that a failing
    replay can be located to the unit).
  """
  ctx = {"positions": positions_from_mask(batch["attn_mask"]), "attn_mask": batch["attn_mask"]}
  x = x_in
  inner = []
  for name, unit_index, graphdef in zip(spec.unit_names, spec.unit_indices, spec.graphdefs):
    if name != spec.unit_names[0]:
      inner.append(x)
    unit = nnx.merge(graphdef, params[name], frozen[name])
    # Dropout keys depend on (step, unit), never on how units are grouped into blocks.
    unit_key = None if step_key is None else jax.random.fold_in(step_key, unit_index)
    x = unit(x, {**ctx, "key": unit_key})
  if spec.is_last:
    x = model_lib.masked_cross_entropy(x, batch["targets"], batch["loss_mask"])
  return x, inner


@functools.partial(jax.jit, static_argnums=0)
def block_fwd(spec: grid.BlockSpec, params: PyTree, frozen: PyTree, x_in: jax.Array, batch: Batch,
              step_key: jax.Array | None):
  """Forward of one block: (output boundary, VJP closure over its residuals, inner unit outputs)."""
  if spec.is_first:  # token ids have no cotangent
    y, vjp, inner = jax.vjp(lambda p: block_forward(spec, p, frozen, x_in, batch, step_key), params,
                            has_aux=True)
  else:
    y, vjp, inner = jax.vjp(lambda p, x: block_forward(spec, p, frozen, x, batch, step_key), params,
                            x_in, has_aux=True)
  return y, vjp, inner


@jax.jit
def block_bwd(vjp: Any, ct_out: jax.Array) -> tuple[PyTree, jax.Array | None]:
  """Applies a block's VJP: (parameter gradients, cotangent passed down or None)."""
  out = vjp(ct_out)
  return out[0], (out[1] if len(out) > 1 else None)


@jax.jit
def block_sq_norms(grads: PyTree) -> jax.Array:
  return optim.sq_norm_partials(grads)


@jax.jit
def combine_norms(partials: Sequence[jax.Array]) -> jax.Array:
  return optim.global_norm(partials)


@functools.partial(jax.jit, static_argnums=0)
def block_update(opt_cfg: optim.OptimConfig, params: PyTree, opt_state: PyTree, grads: PyTree,
                 g_norm: jax.Array) -> tuple[PyTree, PyTree]:
  return optim.apply_update(opt_cfg, params, opt_state, grads, g_norm)


def loss_seed(loss: jax.Array) -> jax.Array:
  return jnp.ones_like(loss)


@dataclasses.dataclass
class StepTrace:
  """Everything one blocked step exposes to the recorder (device arrays, not yet fetched)."""
  loss: jax.Array
  fwd_out: list[jax.Array]  # [num_blocks]; last is the loss
  unit_out: list[list[jax.Array]]  # [num_blocks][inner units]: outputs of all but the last unit
  bwd_in: list[jax.Array]  # [num_blocks]; cotangent entering block k from above
  sq_norm_partials: list[jax.Array]  # [num_blocks] of f32[num_leaves_k]
  grad_norm: jax.Array


def blocked_step(specs: Sequence[grid.BlockSpec], opt_cfg: optim.OptimConfig,
                 params: list[PyTree], opt_states: list[PyTree], frozen: list[PyTree],
                 batch: Batch, step_key: jax.Array | None):
  """One optimizer step as per-block jitted calls (dispatched asynchronously).

  Args:
    specs: the static block specs.
    opt_cfg: optimizer settings.
    params, opt_states, frozen: per-block pytrees.
    batch: the step's batch.
    step_key: fold_in(root_key, step), or None without dropout.

  Returns:
    (new params, new opt states, StepTrace).
  """
  x = batch["tokens"]
  fwd_out, vjps, unit_out = [], [], []
  for spec, p, f in zip(specs, params, frozen):
    x, vjp, inner = block_fwd(spec, p, f, x, batch, step_key)
    fwd_out.append(x)
    vjps.append(vjp)
    unit_out.append(inner)
  n = len(specs)
  bwd_in: list[Any] = [None] * n
  grads: list[Any] = [None] * n
  ct = loss_seed(fwd_out[-1])
  for k in reversed(range(n)):
    bwd_in[k] = ct
    grads[k], ct = block_bwd(vjps[k], ct)
  del vjps  # frees the residuals before the update allocates
  partials = [block_sq_norms(g) for g in grads]
  g_norm = combine_norms(partials)
  new_params, new_opt = [], []
  for p, o, g in zip(params, opt_states, grads):
    p, o = block_update(opt_cfg, p, o, g, g_norm)
    new_params.append(p)
    new_opt.append(o)
  return new_params, new_opt, StepTrace(fwd_out[-1], fwd_out, unit_out, bwd_in, partials, g_norm)


@functools.partial(jax.jit, static_argnums=(0, 1))
def plain_step(specs: tuple[grid.BlockSpec, ...], opt_cfg: optim.OptimConfig,
               params: list[PyTree], opt_states: list[PyTree], frozen: list[PyTree],
               batch: Batch, step_key: jax.Array | None):
  """The unaudited baseline: the same math as `blocked_step`, as one XLA program.

  Returns:
    (new params, new opt states, loss, grad norm).
  """

  def loss_fn(all_params):
    x = batch["tokens"]
    for spec, p, f in zip(specs, all_params, frozen):
      x, _ = block_forward(spec, p, f, x, batch, step_key)
    return x

  loss, grads = jax.value_and_grad(loss_fn)(params)
  g_norm = optim.global_norm([optim.sq_norm_partials(g) for g in grads])
  new = [optim.apply_update(opt_cfg, p, o, g, g_norm) for p, o, g in zip(params, opt_states, grads)]
  return [p for p, _ in new], [o for _, o in new], loss, g_norm
