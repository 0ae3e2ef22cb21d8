"""Dishonest training providers: deviations from the agreed run, on the `loop.TrainHooks` protocol.

Each attack is a small dataclass overriding the hooks it needs of `loop.Honest` (every
hook the identity); `trainer.train(config, workdir, tamper=attack)` runs it through the
one step loop (`loop.run_steps`), in this order per step:
  initial(params) -> params                      once, on the base model
  batch(step, indices, batch, job) -> (indices, batch)   what is trained on and committed
  opt_cfg(step, opt_cfg) -> opt_cfg              the optimizer settings of the step
  after_step(step, old_params, old_opt_states, new_params, new_opt_states, trace)
      -> (params, opt_states, trace)             what is kept and what is recorded
  final(params) -> params                        just before the final checkpoint
The recorder faithfully commits whatever the provider did, so these providers hold
self-consistent traces: they can open every cell, with `train_provider.Provider(workdir,
hooks=attack)`, which replays their own deviations when it regenerates. Record forgery
after the fact is in `forgery.py`.

Perturbations are deterministic (a fixed PRNG seed), so a provider's regeneration by
replay reproduces its own deviations bit for bit. docs/attacks.md lists what the
verifier reports for each attack and which cells catch it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aftune.crypto import hashing
from aftune.data import order
from aftune.train import job as job_lib
from aftune.train import loop
from aftune.train import step as step_lib

PyTree = Any


# ---- helpers -------------------------------------------------------------------------


def path_of(path: Any) -> str:
  """A jax key path as the "unit/module/param" text the verifier reports in `where`."""
  return hashing.path_str(hashing.path_components(path))


def perturb(tree: PyTree, scale: float, seed: int = 0, leaf: str | None = None) -> PyTree:
  """tree + scale * N(0, 1) noise (deterministic in seed), on every leaf or one named leaf."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = [path_of(p) for p, _ in flat]
  if leaf is not None and leaf not in names:
    raise KeyError(f"no parameter {leaf!r}; have {names}")
  out = []
  for i, (name, x) in enumerate(zip(names, (x for _, x in flat))):
    if leaf is None or name == leaf:
      noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), jnp.shape(x),
                                jnp.result_type(x))
      x = x + jnp.asarray(scale, jnp.result_type(x)) * noise
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def _perturb_block(params: list[PyTree], block: int, scale: float, seed: int,
                   leaf: str | None) -> list[PyTree]:
  params = list(params)
  params[block] = perturb(params[block], scale, seed, leaf)
  return params


def batch_of(job: job_lib.Job, indices: np.ndarray) -> dict[str, jax.Array]:
  """The batch made of the given examples (never through `job.batch`, which may be patched)."""
  return {k: jnp.asarray(v) for k, v in order.make_batch(job.encoded, np.asarray(indices)).items()}


# ---- training-time deviations --------------------------------------------------------





@dataclasses.dataclass
class SkippedStep(loop.Honest):
  """Drops the update of `step` (state stays as before) but records the computed step's trace."""
  step: int

  def after_step(self, step, old_params, old_opt_states, new_params, new_opt_states, trace):
    if step == self.step:
      return list(old_params), list(old_opt_states), trace
    return new_params, new_opt_states, trace


@dataclasses.dataclass
class EditedUnitMidRun(loop.Honest):
  """After `step`, silently edits one unit's parameters inside a step block (never committed)."""
  step: int
  unit: str  # a unit name of the model family
  scale: float = 0.05

  def after_step(self, step, old_params, old_opt_states, new_params, new_opt_states, trace):
    if step != self.step:
      return new_params, new_opt_states, trace
    new_params = list(new_params)
    for k, block in enumerate(new_params):
      if self.unit in block:
        new_params[k] = {**block, self.unit: perturb(block[self.unit], self.scale, seed=step)}
    return new_params, new_opt_states, trace


@dataclasses.dataclass
class EditedBatchStats(loop.Honest):
  """After `step`, shifts the BatchNorm running statistics (`mean`, `var` leaves) of one
  unit: state a training forward never reads, only carries on and serves with."""
  step: int
  unit: str
  shift: float = 0.1

  def after_step(self, step, old_params, old_opt_states, new_params, new_opt_states, trace):
    if step != self.step:
      return new_params, new_opt_states, trace
    new_params = list(new_params)
    for k, block in enumerate(new_params):
      if self.unit in block:
        new_params[k] = {**block, self.unit: jax.tree_util.tree_map_with_path(
            lambda p, x: x + self.shift if path_of(p).rsplit("/", 1)[-1] in ("mean", "var") else x,
            block[self.unit])}
    return new_params, new_opt_states, trace


@dataclasses.dataclass
class DuplicatedStep(loop.Honest):
  """Applies the update of `step` twice (same batch, same key); records the first step's trace."""
  step: int
  _job: Any = dataclasses.field(default=None, init=False, repr=False)
  _batch: Any = dataclasses.field(default=None, init=False, repr=False)

  def batch(self, step, indices, batch, job):
    if step == self.step:
      self._job, self._batch = job, batch
    return indices, batch

  def after_step(self, step, old_params, old_opt_states, new_params, new_opt_states, trace):
    if step != self.step:
      return new_params, new_opt_states, trace
    job = self._job
    params, opt_states, _ = step_lib.blocked_step(job.blocked.specs, job.opt_cfg, new_params,
                                                  new_opt_states, job.blocked.frozen, self._batch,
                                                  job.step_key(step))
    return params, opt_states, trace


@dataclasses.dataclass
class LearningRate(loop.Honest):
  """Trains `step` with the learning rate multiplied by `factor` (every other setting agreed)."""
  step: int
  factor: float = 10.0

  def opt_cfg(self, step, opt_cfg):
    if step == self.step:
      return dataclasses.replace(opt_cfg, learning_rate=opt_cfg.learning_rate * self.factor)
    return opt_cfg


@dataclasses.dataclass
class SubstitutedBatch(loop.Honest):
  """Trains `step` on other examples (agreed indices + offset mod N); commits the agreed
  indices, or the ones really used when `commit_real_indices`."""
  step: int
  offset: int = 1
  commit_real_indices: bool = False

  def batch(self, step, indices, batch, job):
    if step != self.step:
      return indices, batch
    other = (np.asarray(indices) + self.offset) % job.num_examples
    return (other if self.commit_real_indices else indices), batch_of(job, other)


@dataclasses.dataclass
class PoisonedBatch(loop.Honest):
  """Trains `step` on the agreed examples with row `row`'s `field` (the target tokens; an
  image's "label") replaced by `token` (a poisoned example); commits the agreed indices."""
  step: int
  row: int = 0
  token: int = 1
  field: str = "targets"

  def batch(self, step, indices, batch, job):
    if step != self.step:
      return indices, batch
    batch = dict(batch)
    batch[self.field] = batch[self.field].at[self.row].set(self.token)
    return indices, batch


@dataclasses.dataclass
class ReorderedBatches(loop.Honest):
  """Steps `step` and `step + 1` swap their batches; commits the indices really used, or
  the agreed ones when not `commit_real_indices`."""
  step: int
  commit_real_indices: bool = True

  def batch(self, step, indices, batch, job):
    if step not in (self.step, self.step + 1):
      return indices, batch
    other = job.example_indices(self.step + 1 if step == self.step else self.step)
    return (other if self.commit_real_indices else indices), batch_of(job, other)


@dataclasses.dataclass
class PerturbedBaseModel(loop.Honest):
  """Starts from another base model: noise on layer block `block`'s trainable parameters
  (all of them, or only the parameter named `leaf`, a path as the verifier reports it)."""
  block: int
  scale: float = 1e-2
  leaf: str | None = None
  seed: int = 0

  def initial(self, params):
    return _perturb_block(params, self.block, self.scale, self.seed, self.leaf)


@dataclasses.dataclass
class EditedFinalModel(loop.Honest):
  """Edits layer block `block` of the final model after training (noise on one parameter
  `leaf`, or on all), before the final checkpoint and commitment."""
  block: int
  leaf: str | None = None
  scale: float = 1e-2
  seed: int = 0

  def final(self, params):
    return _perturb_block(params, self.block, self.scale, self.seed, self.leaf)


@dataclasses.dataclass
class SwappedFinalLayers(loop.Honest):
  """Swaps the parameters of two units of the same shape (e.g. two decoder layers) in the
  final model, after training."""
  unit_a: str
  unit_b: str

  def final(self, params):
    params = [dict(p) for p in params]
    where = {}
    for k, p in enumerate(params):
      for unit in (self.unit_a, self.unit_b):
        if unit in p:
          where[unit] = k
    missing = {self.unit_a, self.unit_b} - set(where)
    if missing:
      raise KeyError(f"no unit {sorted(missing)} in the trainable parameters")
    ka, kb = where[self.unit_a], where[self.unit_b]
    params[ka][self.unit_a], params[kb][self.unit_b] = params[kb][self.unit_b], params[ka][self.unit_a]
    return params


@dataclasses.dataclass
class ForgedForward(loop.Honest):
  """Records a perturbed copy of the forward boundary fwd_out[block] at `step` (the
  recorder commits the forgery; training itself is honest)."""
  step: int
  block: int
  scale: float = 1e-2
  seed: int = 0
  boundary = "fwd_out"  # the StepTrace field forged (a class attribute, not a field)

  def after_step(self, step, old_params, old_opt_states, new_params, new_opt_states, trace):
    if step == self.step:
      tensors = list(getattr(trace, self.boundary))
      tensors[self.block] = perturb(tensors[self.block], self.scale, self.seed)
      changes = {self.boundary: tensors}
      if self.boundary == "fwd_out" and self.block == len(tensors) - 1:
        changes["loss"] = tensors[-1]  # the last block's output is the loss
      trace = dataclasses.replace(trace, **changes)
    return new_params, new_opt_states, trace


@dataclasses.dataclass
class ForgedBackward(ForgedForward):
  """Records a perturbed copy of the backward boundary bwd_in[block] (the cotangent
  entering the block from above) at `step`; training itself is honest."""
  boundary = "bwd_in"


@dataclasses.dataclass
class Composite(loop.Honest):
  """Several attacks at once, applied in order at every hook."""
  attacks: tuple[loop.Honest, ...] = ()

  def initial(self, params):
    for a in self.attacks:
      params = a.initial(params)
    return params

  def batch(self, step, indices, batch, job):
    for a in self.attacks:
      indices, batch = a.batch(step, indices, batch, job)
    return indices, batch

  def opt_cfg(self, step, opt_cfg):
    for a in self.attacks:
      opt_cfg = a.opt_cfg(step, opt_cfg)
    return opt_cfg

  def after_step(self, step, old_params, old_opt_states, new_params, new_opt_states, trace):
    for a in self.attacks:
      new_params, new_opt_states, trace = a.after_step(step, old_params, old_opt_states,
                                                       new_params, new_opt_states, trace)
    return new_params, new_opt_states, trace

  def final(self, params):
    for a in self.attacks:
      params = a.final(params)
    return params


# ---- deviations by strength (the attack suite, aftune/attacks/suite.py) ----------------


def choose_steps(num_steps: int, fraction: float, seed: int = 0) -> tuple[int, ...]:
  """round(fraction * num_steps) distinct steps, drawn with a seeded numpy Generator."""
  n = int(round(fraction * num_steps))
  rng = np.random.default_rng(seed)
  return tuple(sorted(int(s) for s in rng.choice(num_steps, size=n, replace=False)))


@dataclasses.dataclass
class SkippedSteps(loop.Honest):
  """Under-training: drops the updates of `steps` (the paper's 25% and 50% of steps); stopping
  early and claiming completion is the set of the last steps. The recorded trace is the
  computed one, so the commitment is self-consistent."""
  steps: tuple[int, ...]

  def after_step(self, step, old_params, old_opt_states, new_params, new_opt_states, trace):
    if step in self.steps:
      return list(old_params), list(old_opt_states), trace
    return new_params, new_opt_states, trace


@dataclasses.dataclass
class OptimizerDeviation(loop.Honest):
  """Trains `steps` with other optimizer settings (`changes`: OptimConfig fields, e.g.
  learning_rate, schedule, name); None: every step."""
  changes: tuple[tuple[str, Any], ...]
  steps: tuple[int, ...] | None = None

  def opt_cfg(self, step, opt_cfg):
    if self.steps is None or step in self.steps:
      return dataclasses.replace(opt_cfg, **dict(self.changes))
    return opt_cfg


@dataclasses.dataclass
class SubstitutedExamples(loop.Honest):
  """Data substitution: the examples in `examples` are replaced by other examples' content
  (example i trains as example (i + N // 2) % N) wherever they appear; the agreed indices
  are committed. `poison_field`/`poison_value` instead overwrite one field of those rows
  (a poisoned set: e.g. every target token, or an image label)."""
  examples: tuple[int, ...]
  poison_field: str | None = None
  poison_value: int = 0

  def batch(self, step, indices, batch, job):
    rows = [r for r, i in enumerate(np.asarray(indices)) if int(i) in set(self.examples)]
    if not rows:
      return indices, batch
    if self.poison_field is not None:
      batch = dict(batch)
      batch[self.poison_field] = batch[self.poison_field].at[np.asarray(rows)].set(self.poison_value)
      return indices, batch
    other = np.asarray(indices).copy()
    other[rows] = (other[rows] + job.num_examples // 2) % job.num_examples
    return indices, batch_of(job, other)


@dataclasses.dataclass
class SubstitutedUnits(loop.Honest):
  """Base-model or layer substitution: starts with the named units' parameters taken from
  another model (`other`: per-block trainable pytrees of a model of the same architecture,
  e.g. another initialisation), the rest agreed."""
  units: tuple[str, ...]
  other: list[Any] = dataclasses.field(repr=False, default_factory=list)

  def initial(self, params):
    params = [dict(p) for p in params]
    for k, block in enumerate(params):
      for unit in self.units:
        if unit in block:
          params[k][unit] = self.other[k][unit]
    return params
