"""`run_steps`: the one loop over optimizer steps, with its hooks, observer and checkpoints.

Training, the honest provider's regeneration, every dishonest provider and the
recording benchmark run steps through `run_steps`; only what they plug in differs:

  hooks        a provider's deviations from the agreed run (`TrainHooks`; the identity
               `Honest` for everyone but the attacks in aftune/attacks/)
  observer     the recorder (`StepObserver`), which commits what each step did
  checkpointer where the state is saved every B_S * I_C steps and at the end
  on_step      what the caller keeps of each step (losses, boundary tensors)

Per step t the order is fixed: batch and key (hooks.batch, hooks.opt_cfg), observer's
step-block start, the step, hooks.after_step, observer.after_step, on_step; then at the
last step hooks.final, and at a checkpoint step observer.before_checkpoint and the save.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Callable
from typing import Protocol

import jax
import numpy as np

from aftune.train import checkpoint as ckpt_lib
from aftune.train import optim
from aftune.train import step as step_lib

PyTree = Any


class StepObserver(Protocol):
  """What the loop tells a recorder (`record.recorder.Recorder`). Arrays may still be in flight."""

  def step_block_start(self, step: int, params: list[PyTree], opt_states: list[PyTree]) -> None:
    ...

  def after_step(self, step: int, indices: np.ndarray, batch: dict[str, jax.Array],
                 step_key: jax.Array, trace: step_lib.StepTrace) -> None:
    ...

  def before_checkpoint(self, step: int) -> None:
    ...


class TrainHooks(Protocol):
  """A provider's deviations from the agreed run, called by `run_steps` in this order."""

  def initial(self, params: list[PyTree]) -> list[PyTree]:
    """The starting parameters (once, on the base model)."""

  def batch(self, step: int, indices: np.ndarray, batch: dict[str, jax.Array],
            job: Any) -> tuple[np.ndarray, dict[str, jax.Array]]:
    """What step `step` trains on and commits."""

  def opt_cfg(self, step: int, opt_cfg: optim.OptimConfig) -> optim.OptimConfig:
    """The optimizer settings of the step."""

  def after_step(self, step: int, old_params: list[PyTree], old_opt_states: list[PyTree],
                 new_params: list[PyTree], new_opt_states: list[PyTree],
                 trace: step_lib.StepTrace) -> tuple[list[PyTree], list[PyTree], step_lib.StepTrace]:
    """What is kept and what is recorded."""

  def final(self, params: list[PyTree]) -> list[PyTree]:
    """The final model, just before the final checkpoint and commitment."""


class Honest:
  """The honest provider: every hook is the identity (the base class of every attack)."""

  def initial(self, params):
    return params

  def batch(self, step, indices, batch, job):
    return indices, batch

  def opt_cfg(self, step, opt_cfg):
    return opt_cfg

  def after_step(self, step, old_params, old_opt_states, new_params, new_opt_states, trace):
    return new_params, new_opt_states, trace

  def final(self, params):
    return params


@dataclasses.dataclass
class TrainState:
  """The state before step `step`: per-block parameters and optimizer states."""
  step: int
  params: list[PyTree]
  opt_states: list[PyTree]


def checkpoint_items(params: list[PyTree], opt_states: list[PyTree]) -> dict[str, PyTree]:
  items = {f"params_{k}": p for k, p in enumerate(params)}
  items.update({f"opt_state_{k}": o for k, o in enumerate(opt_states)})
  return items


def save_state(checkpointer: ckpt_lib.Checkpointer, state: TrainState, *, wait: bool = True) -> None:
  checkpointer.save(state.step, checkpoint_items(state.params, state.opt_states),
                    {"step": state.step}, wait=wait)


def restore_state(checkpointer: ckpt_lib.Checkpointer, step: int, job: Any,
                  blocks: list[int] | None = None) -> tuple[list[PyTree], list[PyTree]]:
  """Params and optimizer state at `step` (optionally of some layer blocks only)."""
  opt0 = job.init_opt_states()
  blocks = list(range(job.blocked.num_blocks)) if blocks is None else blocks
  abstract = {f"params_{k}": job.blocked.trainable[k] for k in blocks}
  abstract.update({f"opt_state_{k}": opt0[k] for k in blocks})
  placement = getattr(job, "placement", None)
  abstract = placement.abstract(abstract) if placement else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), abstract)
  items = checkpointer.restore(step, abstract)
  params = [items[f"params_{k}"] for k in blocks]
  opt_states = [items[f"opt_state_{k}"] for k in blocks]
  place = getattr(job, "place_state", None)  # a sharded job's state goes back on its mesh
  return (place(params), place(opt_states)) if place else (params, opt_states)


def nearest_checkpoint_step(checkpointer: ckpt_lib.Checkpointer, step: int) -> int:
  """The last checkpointed step at or before `step`."""
  return max(s for s in checkpointer.all_steps() if s <= step)


def nearest_checkpoint(checkpointer: ckpt_lib.Checkpointer, job: Any, step: int) -> TrainState:
  """The stored state at the last checkpoint at or before `step`."""
  start = nearest_checkpoint_step(checkpointer, step)
  params, opt_states = restore_state(checkpointer, start, job)
  return TrainState(start, params, opt_states)


# on_step(step, loss, grad_norm, trace): trace is None for the plain (single-jit) step.
OnStep = Callable[[int, jax.Array, jax.Array, "step_lib.StepTrace | None"], None]


def run_steps(job: Any, state: TrainState, stop: int, *, hooks: TrainHooks | None = None,
              observer: StepObserver | None = None,
              checkpointer: ckpt_lib.Checkpointer | None = None, on_step: OnStep | None = None,
              plain: bool = False, fns: step_lib.BlockFns | None = None) -> TrainState:
  """Runs steps state.step .. stop-1 of `job` and returns the state before step `stop`.

  Args:
    job: the `train.job.Job` (batches, keys, blocks, optimizer, grid settings).
    state: where to start.
    stop: the step to stop before (<= job.num_steps).
    hooks: deviations (attacks); None: the honest run.
    observer: the recorder, or None.
    checkpointer: saves the state every B_S * I_C steps and after the last step; None: no saves.
    on_step: called after each step with its (device) loss, grad norm and trace.
    plain: the unaudited single-jit step (no trace, no observer).
    fns: the jitted block functions (default: the process's).

  Returns:
    The state before step `stop`.
  """
  if plain and observer is not None:
    raise ValueError("the plain step has no trace to record")
  fns = fns or step_lib.default_fns()
  specs, frozen = job.blocked.specs, job.blocked.frozen
  b_s = job.steps_per_block
  ckpt_every = b_s * int(job.config.audit.checkpoint_interval)
  params, opt_states = state.params, state.opt_states
  t = state.step
  while t < stop:
    indices, batch = job.batch(t)
    step_key = job.step_key(t)
    opt_cfg = job.opt_cfg
    if hooks is not None:
      indices, batch = hooks.batch(t, indices, batch, job)
      opt_cfg = hooks.opt_cfg(t, opt_cfg)
    if observer is not None and t % b_s == 0:
      observer.step_block_start(t, params, opt_states)
    if plain:
      params, opt_states, loss, g_norm = fns.plain_step(specs, opt_cfg, params, opt_states, frozen,
                                                        batch, step_key)
      trace = None
    else:
      new_params, new_opt, trace = step_lib.blocked_step(specs, opt_cfg, params, opt_states, frozen,
                                                         batch, step_key, fns=fns)
      if hooks is not None:
        new_params, new_opt, trace = hooks.after_step(t, params, opt_states, new_params, new_opt,
                                                      trace)
      params, opt_states = new_params, new_opt
      loss, g_norm = trace.loss, trace.grad_norm
      if observer is not None:
        observer.after_step(t, indices, batch, step_key, trace)
    if on_step is not None:
      on_step(t, loss, g_norm, trace)
    t += 1
    if hooks is not None and t == job.num_steps:
      params = hooks.final(params)  # e.g. a layer edited after training
    if checkpointer is not None and (t % ckpt_every == 0 or t == job.num_steps):
      if observer is not None:
        observer.before_checkpoint(t)
      checkpointer.save(t, checkpoint_items(params, opt_states), {"step": t}, wait=False)
  return TrainState(t, params, opt_states)
