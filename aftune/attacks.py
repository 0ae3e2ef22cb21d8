"""Dishonest providers: deviations from the agreed run, for tests and detection experiments.

Three kinds of cheating, each runnable against the real recorder, opening and verifier:

1. Training-time deviations: a tamper object passed as `train.train(config, workdir,
   tamper=...)`. The loop calls, in order,
     initial(params) -> params                      once, on the base model
     batch(step, indices, batch, job) -> (indices, batch)   what is trained on and committed
     opt_cfg(step, opt_cfg) -> opt_cfg              the optimizer settings of the step
     after_step(step, old_params, old_opt_states, new_params, new_opt_states, trace)
         -> (params, opt_states, trace)             what is kept and what is recorded
     final(params) -> params                        just before the final checkpoint
   `Honest` makes every hook the identity; each attack below is a small dataclass that
   overrides the hooks it needs. The recorder faithfully commits whatever the provider
   did, so these providers hold self-consistent traces: they can open every cell.
2. Opening-time cheating: `DishonestProvider` opens cells of a tampered run the way
   that provider would (revealing the batches it really used and replaying its own
   deviations when it regenerates), optionally without refusing tensors that do not
   match the commitment (`strict=False`: it sends what it has).
3. Record forgery after the fact: `forge_leaf` rewrites one committed hash and re-signs
   the commitment; `swap_proofs`, `edit_tensor` and `drop_leaf` edit an opened bundle.

Perturbations are deterministic (a fixed PRNG seed), so a provider's regeneration by
replay reproduces its own deviations bit for bit. docs/attacks.md lists what the
verifier reports for each attack and which cells catch it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aftune import bundle as bundle_lib
from aftune import data as data_lib
from aftune import hashing
from aftune import job as job_lib
from aftune import merkle
from aftune import opening
from aftune import optim
from aftune import signing
from aftune import step as step_lib
from aftune import trace as trace_lib
from aftune import train

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
  return {k: jnp.asarray(v) for k, v in data_lib.make_batch(job.encoded, np.asarray(indices)).items()}


# ---- training-time deviations --------------------------------------------------------


class Honest:
  """The honest provider: every hook is the identity (the base class of every attack)."""

  def initial(self, params: list[PyTree]) -> list[PyTree]:
    return params

  def batch(self, step: int, indices: np.ndarray, batch: dict[str, jax.Array],
            job: job_lib.Job) -> tuple[np.ndarray, dict[str, jax.Array]]:
    return indices, batch

  def opt_cfg(self, step: int, opt_cfg: optim.OptimConfig) -> optim.OptimConfig:
    return opt_cfg

  def after_step(self, step: int, old_params: list[PyTree], old_opt_states: list[PyTree],
                 new_params: list[PyTree], new_opt_states: list[PyTree],
                 trace: step_lib.StepTrace) -> tuple[list[PyTree], list[PyTree], step_lib.StepTrace]:
    return new_params, new_opt_states, trace

  def final(self, params: list[PyTree]) -> list[PyTree]:
    return params


@dataclasses.dataclass
class SkippedStep(Honest):
  """Drops the update of `step` (state stays as before) but records the computed step's trace."""
  step: int

  def after_step(self, step, old_params, old_opt_states, new_params, new_opt_states, trace):
    if step == self.step:
      return list(old_params), list(old_opt_states), trace
    return new_params, new_opt_states, trace


@dataclasses.dataclass
class EditedUnitMidRun(Honest):
  """After `step`, silently edits one unit's parameters inside a step block (never committed)."""
  step: int
  unit: str  # e.g. "layer_0"
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
class DuplicatedStep(Honest):
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
class LearningRate(Honest):
  """Trains `step` with the learning rate multiplied by `factor` (every other setting agreed)."""
  step: int
  factor: float = 10.0

  def opt_cfg(self, step, opt_cfg):
    if step == self.step:
      return dataclasses.replace(opt_cfg, learning_rate=opt_cfg.learning_rate * self.factor)
    return opt_cfg


@dataclasses.dataclass
class SubstitutedBatch(Honest):
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
class PoisonedBatch(Honest):
  """Trains `step` on the agreed examples with row `row`'s target tokens replaced by
  `token` (a poisoned example); commits the agreed indices."""
  step: int
  row: int = 0
  token: int = 1

  def batch(self, step, indices, batch, job):
    if step != self.step:
      return indices, batch
    batch = dict(batch)
    batch["targets"] = batch["targets"].at[self.row].set(self.token)
    return indices, batch


@dataclasses.dataclass
class ReorderedBatches(Honest):
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
class PerturbedBaseModel(Honest):
  """Starts from another base model: noise on layer block `block`'s trainable parameters
  (all of them, or only the parameter named `leaf`, e.g. "layer_1/mlp/up_proj/kernel")."""
  block: int
  scale: float = 1e-2
  leaf: str | None = None
  seed: int = 0

  def initial(self, params):
    return _perturb_block(params, self.block, self.scale, self.seed, self.leaf)


@dataclasses.dataclass
class EditedFinalModel(Honest):
  """Edits layer block `block` of the final model after training (noise on one parameter
  `leaf`, or on all), before the final checkpoint and commitment."""
  block: int
  leaf: str | None = None
  scale: float = 1e-2
  seed: int = 0

  def final(self, params):
    return _perturb_block(params, self.block, self.scale, self.seed, self.leaf)


@dataclasses.dataclass
class SwappedFinalLayers(Honest):
  """Swaps the parameters of two units of the same shape (e.g. "layer_0", "layer_1") in
  the final model, after training."""
  unit_a: str = "layer_0"
  unit_b: str = "layer_1"

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
class ForgedForward(Honest):
  """Records a perturbed copy of the forward boundary fwd_out[block] at `step` (the
  recorder commits the forgery; training itself is honest)."""
  step: int
  block: int
  scale: float = 1e-2
  seed: int = 0

  def after_step(self, step, old_params, old_opt_states, new_params, new_opt_states, trace):
    if step == self.step:
      fwd = list(trace.fwd_out)
      fwd[self.block] = perturb(fwd[self.block], self.scale, self.seed)
      loss = fwd[-1] if self.block == len(fwd) - 1 else trace.loss
      trace = dataclasses.replace(trace, fwd_out=fwd, loss=loss)
    return new_params, new_opt_states, trace


@dataclasses.dataclass
class ForgedBackward(Honest):
  """Records a perturbed copy of the backward boundary bwd_in[block] (the cotangent
  entering the block from above) at `step`; training itself is honest."""
  step: int
  block: int
  scale: float = 1e-2
  seed: int = 0

  def after_step(self, step, old_params, old_opt_states, new_params, new_opt_states, trace):
    if step == self.step:
      bwd = list(trace.bwd_in)
      bwd[self.block] = perturb(bwd[self.block], self.scale, self.seed)
      trace = dataclasses.replace(trace, bwd_in=bwd)
    return new_params, new_opt_states, trace


@dataclasses.dataclass
class Composite(Honest):
  """Several attacks at once, applied in order at every hook."""
  attacks: tuple[Honest, ...] = ()

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



# ---- opening-time cheating -----------------------------------------------------------


class DishonestProvider(opening.Provider):
  """Opens cells of a run trained with `tamper` as that provider would.

  It reveals the batches it really trained on (what its commitments hold) and, when a
  cell must be regenerated (I_C, I_A > 1), replays its own deviations. With `strict`
  it refuses, like the honest provider, to send a tensor that does not match its
  commitment; with `strict=False` it sends what it has (e.g. after `forge_leaf`).
  """

  def __init__(self, workdir: str | Path, tamper: Honest | None = None, *, strict: bool = True):
    super().__init__(workdir)
    self.tamper = tamper or Honest()
    self.strict = strict
    honest_job = dataclasses.replace(self.job)  # its `batch` is the class's, unpatched
    self.job.batch = lambda t: self.tamper.batch(t, *honest_job.batch(t), honest_job)

  def _check(self, kind, step, block, digest, what):
    if self.strict:
      super()._check(kind, step, block, digest, what)

  def _replay_block(self, k: int, t0: int, t_end: int) -> None:
    return None  # an honest one-block replay would undo its deviations: replay them all

  def _replay(self, k: int, t0: int, t_end: int) -> tuple[dict, dict]:
    start = max(s for s in self.checkpointer.all_steps() if s <= t0)
    params, opt_states = train.restore_state(self.checkpointer, start, self.job)
    states, traces = {}, {}
    job = self.job
    specs, frozen = job.blocked.specs, job.blocked.frozen
    for t in range(start, t_end + 1):
      if t == job.num_steps and t > start:
        params = self.tamper.final(params)
      if t in (t0, t_end):
        states[t] = (params[k], opt_states[k])
      if t == t_end:
        break
      _, batch = job.batch(t)
      opt_cfg = self.tamper.opt_cfg(t, job.opt_cfg)
      new_params, new_opt, tr = step_lib.blocked_step(specs, opt_cfg, params, opt_states, frozen,
                                                      batch, job.step_key(t))
      params, opt_states, tr = self.tamper.after_step(t, params, opt_states, new_params, new_opt, tr)
      if t >= t0:
        traces[t] = {"fwd_out": jax.device_get(tr.fwd_out), "bwd_in": jax.device_get(tr.bwd_in)}
    return states, traces


# ---- record forgery ------------------------------------------------------------------


def forge_leaf(workdir: str | Path, kind: str, step: int, block: int,
               payload: bytes | None = None) -> dict[str, Any]:
  """Overwrites the committed hash of one leaf in trace/leaves.bin, recomputes the Merkle
  root and re-signs commitment.json with the provider key (a forged hash in a validly
  signed commitment). payload defaults to the old one with its first byte flipped.

  Returns:
    The new signed commitment (also written to commitment.json).
  """
  workdir = Path(workdir)
  path = workdir / "commitment.json"
  old = json.loads(path.read_text())
  grid = trace_lib.Grid.from_dict(old["grid"])
  leaves_path = workdir / "trace" / "leaves.bin"
  leaves = trace_lib.read_leaves(leaves_path, grid)
  index = grid.index(kind, step, block)
  leaf = leaves[index]
  if payload is None:
    payload = bytes([leaf.payload[0] ^ 0xFF]) + leaf.payload[1:]
  leaves[index] = trace_lib.Leaf(kind, step, block, payload)
  leaves_path.write_bytes(b"".join(l.pack() for l in leaves))
  doc = {k: v for k, v in old.items() if k != "signature"}
  doc["merkle_root"] = hashing.hexdigest(merkle.merkle_root([l.hash() for l in leaves]))
  key = signing.load_private_key(workdir / "provider_key.pem")
  new = signing.sign_document(doc, key)
  path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
  return new


def _copy(bundle: bundle_lib.Bundle) -> bundle_lib.Bundle:
  return bundle_lib.Bundle(copy.deepcopy(bundle.manifest),
                           {k: np.array(v, copy=True) for k, v in bundle.tensors.items()})


def _leaf_pos(bundle: bundle_lib.Bundle, key: tuple[str, int, int]) -> int:
  for i, e in enumerate(bundle.manifest["leaves"]):
    if (e["kind"], e["step"], e["block"]) == tuple(key):
      return i
  raise KeyError(f"the bundle reveals no leaf {key}")


def swap_proofs(bundle: bundle_lib.Bundle, a: tuple[str, int, int],
                b: tuple[str, int, int]) -> bundle_lib.Bundle:
  """A copy of the bundle where leaves a and b carry each other's inclusion proof."""
  out = _copy(bundle)
  leaves = out.manifest["leaves"]
  i, j = _leaf_pos(out, a), _leaf_pos(out, b)
  leaves[i]["proof"], leaves[j]["proof"] = leaves[j]["proof"], leaves[i]["proof"]
  return out


def edit_tensor(bundle: bundle_lib.Bundle, name: str, delta: float = 1e-3,
                index: int = 0) -> bundle_lib.Bundle:
  """A copy of the bundle with one element (flat `index`) of tensor `name` shifted by delta."""
  out = _copy(bundle)
  arr = out.tensors[name]
  flat = arr.reshape(-1)
  flat[index] = flat[index] + np.asarray(delta).astype(arr.dtype)
  out.tensors[name] = flat.reshape(arr.shape)
  return out


def drop_leaf(bundle: bundle_lib.Bundle, key: tuple[str, int, int]) -> bundle_lib.Bundle:
  """A copy of the bundle that omits one revealed leaf (a missing hash)."""
  out = _copy(bundle)
  del out.manifest["leaves"][_leaf_pos(out, key)]
  return out
