"""Phase 4: authenticate an opened cell, replay it with the training's own jitted block
functions, and decide.

Order of checks (the first failure is the verdict's reason):
  1. authentication: the client's commitment and its signature; the bundle is for that
     commitment (and the challenge's root); the job spec hashes to the job id and matches
     what the client agreed; every revealed leaf's inclusion proof; every tensor against
     its leaf; the frozen (and, in step block 0, the starting) parameters against the base
     model hash; in exact mode the environment and the program fingerprint.
  2. data: the batch order recomputed from (seed, N, step); every example against the
     dataset root; the batch against its leaf; the step key recomputed from the seed.
  3. replay, step by step: output boundary (the loss for the last block), the cotangent
     passed down, the norm partials, the global norm, and the end state.
Exact mode demands bitwise equality (hashes). Tolerance mode compares with the revealed
tensors under the per-kind relative thresholds in core.TOLERANCES (reported in the verdict).

The verifier only ever holds one layer block's parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aftune import errors
from aftune.audit import bundle as bundle_lib
from aftune.audit import challenge_doc
from aftune.audit import core
from aftune.audit import names
from aftune.crypto import hashing
from aftune.crypto import merkle
from aftune.data import order
from aftune.model import blocks as grid_lib
from aftune.model import family
from aftune.record import jobspec
from aftune.record import layout as trace
from aftune.train import job as job_lib
from aftune.train import mesh as mesh_lib
from aftune.train import multihost
from aftune.train import optim
from aftune.train import step as step_lib

PyTree = Any

# Fields of the job spec the client agrees to before training (the rest is the
# provider's declaration of its programs and platform).
AGREED_FIELDS = ("base_model_hash", "tokenizer_hash", "dataset_root", "num_examples",
                 "hyperparameters", "seed", "prng_impl", "grid")


def verify_bundle(bundle: bundle_lib.Bundle, *, commitment: dict[str, Any],
                  agreed: dict[str, Any] | None = None,
                  challenge: challenge_doc.Challenge | None = None, mode: str = "exact",
                  tolerances: dict[str, float] | None = None,
                  check_environment: bool = True,
                  fns: step_lib.BlockFns | None = None) -> core.CellReport:
  """Verifies one opened training cell.

  Args:
    bundle: the provider's opening of the cell.
    commitment: the signed commitment the client received (its own copy).
    agreed: the job-spec fields the client agreed to (AGREED_FIELDS), or None to skip.
    challenge: the challenge the cell answers, or None.
    mode: "exact" (bitwise) or "tolerance".
    tolerances: per-kind thresholds for tolerance mode (default core.TOLERANCES).
    check_environment: in exact mode, refuse a platform other than the recorded one.
    fns: the jitted block functions (default: the process's, the training's own).

  Returns:
    The cell's report (passed or the first failure and where it happened).

  Raises:
    core.AuditInputError: the bundle is for another job, the cell is outside the grid, or
      exact mode on another platform.
  """
  fns = fns or step_lib.default_fns()
  # The grid and job come from the client's commitment, never from the bundle.
  grid = trace.Grid.from_dict(commitment["grid"])
  m = bundle.manifest
  k, s = bundle.cell
  steps = list(grid.step_block_range(s)) if 0 <= s < grid.num_step_blocks else []
  placement = _placement(m["job_spec"], mode)

  def authenticate(chk: core.Checks):
    _authenticate(bundle, commitment, agreed, challenge, grid, chk)
    spec = m["job_spec"]
    hp = spec["hyperparameters"]
    cfg = family.config_from_dict(hp["model"])
    opt_cfg = optim.OptimConfig(**hp["optimizer"])
    block_spec, t_abs, f_abs = grid_lib.abstract_block(cfg, grid.units_per_block, k)
    chk.require(block_spec.num_blocks == grid.num_layer_blocks, "job_spec",
                "the model config and the grid disagree on the number of layer blocks")
    opt_abs = jax.eval_shape(lambda p: optim.init_opt_state(opt_cfg, p), t_abs)
    T = bundle.tensors
    params = core.unflatten(t_abs, T, names.state("start", "params"), chk)
    opt_state = core.unflatten(opt_abs, T, names.state("start", "opt_state"), chk)
    frozen = core.unflatten(f_abs, T, names.FROZEN, chk)
    committed_leaves = {(e["kind"], e["step"], e["block"]): bytes.fromhex(e["payload"])
                        for e in m["leaves"]}
    committed = lambda kind, t, j=-1: _leaf(committed_leaves, kind, t, j, chk)
    for kind, tree in (("params", params), ("opt_state", opt_state)):
      chk.require(hashing.hash_pytree(tree) == committed(kind, steps[0], k), "opening",
                  f"start {kind} do not match the committed hash", steps[0])
    base = _check_against_base_model(m, spec, k, frozen, params if s == 0 else None, chk)
    core.check_final_model(m["final_model_digests"], base, commitment, committed_leaves,
                           hp["model"], grid, chk)
    _check_data(bundle, spec, grid, steps, committed, chk)
    if chk.mode == "exact":
      _check_programs(block_spec, opt_cfg, params, frozen, opt_state, bundle, spec, k, steps[0],
                      grid, chk, fns)
    if placement is not None:  # the committed mesh: the same shardings as the training step
      params, opt_state, frozen = (placement.state(x) for x in (params, opt_state, frozen))
    return block_spec, opt_cfg, params, opt_state, frozen, committed, int(spec["seed"])

  def replay(chk: core.Checks, context) -> None:
    _replay(*context[:5], bundle, grid, k, steps, context[5], chk, context[6], fns, placement)

  return core.verify_cell(bundle, commitment=commitment, grid=grid, id_field="job_id", what="job",
                          spec=m["job_spec"], mode=mode, tolerances=tolerances,
                          check_environment=check_environment, challenge=challenge,
                          authenticate=authenticate, replay=replay)


def _placement(spec: dict[str, Any], mode: str) -> mesh_lib.Placement | None:
  """Exact mode replays a sharded job on its committed mesh (reductions over sharded axes
  decide the bits); tolerance mode replays on one device."""
  mesh = spec.get("hyperparameters", {}).get("mesh") if isinstance(spec, dict) else None
  if mesh is None or mode != "exact":
    return None
  try:
    mesh_spec = mesh_lib.MeshSpec.from_dict(mesh)
  except (KeyError, TypeError, ValueError) as e:
    raise core.AuditInputError(f"the job spec's mesh is malformed ({e})") from None
  procs = spec.get("environment", {}).get("process_count", 1)
  if procs != jax.process_count():
    # Measured (docs/sharding.md): the cross-process reductions (gloo on CPU, NCCL on GPU)
    # add in another order than one process's own collectives, from the first step on.
    raise core.AuditInputError(
        f"exact mode replays this job as it ran: over {procs} process(es) on its committed mesh "
        f"{dict(zip(mesh_spec.axes, mesh_spec.shape))}; this verifier is {jax.process_count()}: "
        f"run it as {procs} processes (--num_processes) or use --mode=tolerance")
  if jax.device_count() < mesh_spec.size:
    raise core.AuditInputError(
        f"exact mode replays this job on its committed mesh {dict(zip(mesh_spec.axes, mesh_spec.shape))} "
        f"({mesh_spec.size} devices); this verifier has {jax.device_count()}: run it with that "
        "many devices or use --mode=tolerance")
  model = spec.get("hyperparameters", {}).get("model")
  try:
    fam = family.get(model.get("arch") if isinstance(model, dict) else None)
    return mesh_lib.Placement(mesh_spec, tensor_rules=getattr(fam, "TENSOR_PARALLEL", ()))
  except errors.InputError as e:
    raise core.AuditInputError(f"the job spec's mesh: {e}") from None


def _leaf(leaves, kind, t, j, chk) -> bytes:
  payload = leaves.get((kind, t, j))
  chk.require(payload is not None, "opening", f"the bundle lacks the committed leaf "
              f"({kind}, step {t}, block {j})", t if t >= 0 else None)
  return payload


def _leaf_differences(replayed: PyTree, tensors: dict[str, np.ndarray], prefix: str) -> list[str]:
  """Parameter paths whose replayed value differs from the revealed one."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(replayed)[0]:
    rev = tensors.get(names.tree_name(prefix, path))
    if rev is None or hashing.hash_array(np.asarray(leaf)) != hashing.hash_array(rev):
      out.append(hashing.path_str(hashing.path_components(path)))
  return out


def _authenticate(bundle, commitment, agreed, challenge, grid, chk: core.Checks) -> None:
  m = bundle.manifest
  k, s = bundle.cell
  core.check_commitment(bundle, commitment, challenge, chk)
  spec = m["job_spec"]
  job_id = hashing.hash_json(spec)
  chk.require(job_id.hex() == commitment["job_id"], "job_spec",
              "the job spec does not hash to the committed job id")
  if agreed is not None:
    diff = [f for f in AGREED_FIELDS if spec.get(f) != agreed.get(f)]
    chk.require(not diff, "job_spec", f"the job spec differs from what the client agreed in {diff}")
  chk.require(trace.Grid.from_dict(spec["grid"]) == grid, "job_spec",
              "the job spec's grid is not the committed grid")
  chk.require(spec["hyperparameters"]["num_steps"] == grid.num_steps, "job_spec",
              f"the job spec declares {spec['hyperparameters']['num_steps']} steps, its grid "
              f"commits {grid.num_steps}")
  leaves = core.check_inclusion(m["leaves"], grid, commitment, chk)
  chk.require(leaves.get(("job_spec", -1, -1)) == job_id, "job_spec",
              "the job_spec leaf does not carry the job id")
  for e in m["tensors"]:
    arr = bundle.tensors.get(e["name"])
    chk.require(arr is not None, "opening", f"the bundle lacks tensor {e['name']}")
    want = _leaf(leaves, e["kind"], e["step"], e["block"], chk)
    chk.require(hashing.hash_array(arr) == want, "opening",
                f"tensor {e['name']} does not match its committed hash", e["step"])
  for e in m["trees"]:
    items = [(c, hashing.hash_array(arr)) for c, arr in names.under(e["prefix"], bundle.tensors)]
    want = _leaf(leaves, e["kind"], e["step"], e["block"], chk)
    chk.require(hashing.hash_leaf_digests(items) == want, "opening",
                f"{e['prefix']} does not match its committed hash", e["step"])
  # The verifier, not the provider's manifest, decides what the cell reveals: every tensor
  # the replay reads must be listed above under its own leaf (so it was checked against it).
  steps = list(grid.step_block_range(s))
  listed = {e["name"]: (e["kind"], e["step"], e["block"]) for e in m["tensors"]}
  for t in steps:
    for kind, j in cell_step_leaves(grid, k):
      name = names.step_tensor(t, kind, j)
      chk.require(listed.get(name) == (kind, t, j), "opening",
                  f"the bundle does not reveal {name} as the committed leaf ({kind}, step {t}, "
                  f"block {j})", t)
  trees = {e["prefix"]: (e["kind"], e["step"], e["block"]) for e in m["trees"]}
  for label, t in (("start", steps[0]), ("end", steps[-1] + 1)):
    for kind in trace.STATE_KINDS:
      chk.require(trees.get(names.state(label, kind)) == (kind, t, k), "opening",
                  f"the bundle does not reveal {names.state(label, kind)} as the committed leaf "
                  f"({kind}, step {t}, block {k})", t)


def cell_step_leaves(grid: trace.Grid, k: int) -> list[tuple[str, int]]:
  """(kind, block) of every single-tensor leaf a cell of layer block k reveals per step."""
  need = [k] + ([k - 1] if k > 0 else [])
  keys = [("indices", -1), ("loss", -1), ("grad_norm", -1)]
  keys += [("sq_norms", j) for j in range(grid.num_layer_blocks)]
  keys += [(kind, j) for j in need for kind in ("fwd_out", "bwd_in")]
  return keys


def tensor_schema(manifest: dict[str, Any], commitment: dict[str, Any]) -> bundle_lib.TensorSchema | None:
  """The exact tensors (name -> dtype, shape) the bundle of this cell must hold, derived from
  the committed job spec; None when the manifest is for another job or a cell outside the
  committed grid (the verifier then fails or refuses it on the manifest alone)."""
  spec = manifest["job_spec"]
  if hashing.hash_json(spec).hex() != commitment.get("job_id"):
    return None
  grid = trace.Grid.from_dict(commitment["grid"])
  k, s = int(manifest["cell"]["layer_block"]), int(manifest["cell"]["step_block"])
  if not (0 <= k < grid.num_layer_blocks and 0 <= s < grid.num_step_blocks):
    return None
  try:
    shapes = _job_shapes(commitment["job_id"], json.dumps(spec, sort_keys=True))
  except (TypeError, ValueError, KeyError) as e:
    raise core.AuditInputError(f"the job spec of job {commitment['job_id'][:16]} does not "
                               f"describe a model this verifier can build ({e})") from None
  if len(shapes["blocks"]) != grid.num_layer_blocks:
    return None  # the verifier fails the cell: model config and grid disagree
  params, opt_state, frozen = shapes["blocks"][k]
  out: dict[str, tuple[str, tuple[int, ...]]] = {}
  for label in ("start", "end"):
    out.update({f"{names.state(label, 'params')}/{p}": v for p, v in params.items()})
    out.update({f"{names.state(label, 'opt_state')}/{p}": v for p, v in opt_state.items()})
  out.update({f"{names.FROZEN}/{p}": v for p, v in frozen.items()})
  for t in grid.step_block_range(s):
    for kind, j in cell_step_leaves(grid, k):
      out[names.step_tensor(t, kind, j)] = shapes["step"][(kind, j)]
    for key, v in shapes["batch"].items():
      out[names.batch_field(t, key)] = v
  return out


@functools.lru_cache(maxsize=4)
def _job_shapes(job_id: str, spec_json: str) -> dict[str, Any]:
  """Shapes of every tensor a cell of this job can reveal, traced from shapes alone."""
  del job_id  # the cache key: the spec hashes to it
  spec = json.loads(spec_json)
  hp = spec["hyperparameters"]
  grid = trace.Grid.from_dict(spec["grid"])
  cfg = family.config_from_dict(hp["model"])
  opt_cfg = optim.OptimConfig(**hp["optimizer"])
  batch = {key: jax.ShapeDtypeStruct(shape, dt) for key, (dt, shape) in
           family.of(cfg).batch_shapes(cfg, int(hp["batch_size"]), hp).items()}
  key = job_lib.step_key(int(spec["seed"]), 0)
  n_blocks = grid_lib.num_layer_blocks(len(family.of(cfg).unit_names(cfg)), grid.units_per_block)
  x = batch[family.of(cfg).INPUT_KEY]
  blocks, step, partials = [], {}, []
  for j in range(n_blocks):
    block_spec, t_abs, f_abs = grid_lib.abstract_block(cfg, grid.units_per_block, j)
    opt_abs = jax.eval_shape(lambda p: optim.init_opt_state(opt_cfg, p), t_abs)
    blocks.append((core.tree_shapes(t_abs), core.tree_shapes(opt_abs), core.tree_shapes(f_abs)))
    y, _ = jax.eval_shape(functools.partial(step_lib.block_forward, block_spec), t_abs, f_abs, x,
                          batch, key)
    partial = jax.eval_shape(functools.partial(step_lib.block_sq_norms, block_spec), t_abs)
    # A cotangent has its output's shape.
    step[("fwd_out", j)] = step[("bwd_in", j)] = core.shape_sig(y)
    step[("sq_norms", j)] = core.shape_sig(partial)
    partials.append(partial)
    x = y
  step[("loss", -1)] = core.shape_sig(x)
  step[("grad_norm", -1)] = core.shape_sig(jax.eval_shape(step_lib.combine_norms, partials))
  indices = order.example_indices_for_step(int(spec["seed"]), int(spec["num_examples"]),
                                           int(hp["batch_size"]), 0)
  step[("indices", -1)] = core.shape_sig(indices)
  return {"blocks": blocks, "step": step,
          "batch": {key: core.shape_sig(v) for key, v in batch.items()}}


def _check_against_base_model(m, spec, k, frozen, start_params, chk: core.Checks) -> dict:
  """Frozen (and step-0) parameters are the agreed base model's, via its leaf digests;
  returns the base model's (authenticated) digests."""
  digests = core.check_model_digests(m["model_digests"], spec["base_model_hash"], "base", chk)
  for tree, what in ((frozen, "frozen"), (start_params, "starting")):
    if tree is None:
      continue
    for comps, digest in hashing.pytree_leaf_hashes(tree):
      chk.require(digests.get(comps) == digest, "base_model",
                  f"{what} parameter {hashing.path_str(comps)} of block {k} is not the base "
                  "model's", where=[hashing.path_str(comps)])
  return digests


def _batch(T, t: int, arch: str) -> dict[str, np.ndarray | None]:
  return {key: T.get(names.batch_field(t, key)) for key in family.get(arch).BATCH_KEYS}


def _check_data(bundle, spec, grid, steps, committed, chk: core.Checks) -> None:
  seed, n = int(spec["seed"]), int(spec["num_examples"])
  batch_size = int(spec["hyperparameters"]["batch_size"])
  root = hashing.from_hex(spec["dataset_root"])
  for t in steps:
    want_idx = order.example_indices_for_step(seed, n, batch_size, t)
    got_idx = bundle.tensors.get(names.step_tensor(t, "indices"))
    chk.require(got_idx is not None and np.array_equal(got_idx, want_idx), "data",
                f"step {t}: the committed batch indices are not the agreed batch order "
                "(seed, dataset size, step)", t)
    batch = _batch(bundle.tensors, t, spec["hyperparameters"]["model"]["arch"])
    chk.require(all(v is not None for v in batch.values()), "opening", f"step {t}: batch missing", t)
    proofs = bundle.manifest["example_proofs"].get(str(t), [])
    chk.require(len(proofs) == len(want_idx), "opening", f"step {t}: example proofs missing", t)
    for row, (i, proof) in enumerate(zip(want_idx, proofs)):
      example = {key: v[row] for key, v in batch.items()}
      leaf = merkle.leaf_hash("example", int(i), -1, hashing.hash_batch(example))
      chk.require(merkle.verify_inclusion(leaf, int(i), n, [bytes.fromhex(h) for h in proof], root),
                  "data", f"step {t}: row {row} is not example {int(i)} of the agreed dataset", t)
    chk.require(hashing.hash_batch(batch) == committed("batch", t), "data",
                f"step {t}: the examples are not the committed batch", t)
    chk.require(hashing.hash_key(job_lib.step_key(seed, t)) == committed("step_key", t), "data",
                f"step {t}: the committed step key does not follow from the seed", t)


def _block_input(T, block_spec, k: int, t: int, batch) -> jax.Array:
  if k == 0:
    return batch[family.get(block_spec.arch).INPUT_KEY]
  return jnp.asarray(T[names.step_tensor(t, "fwd_out", k - 1)])


def _check_programs(block_spec, opt_cfg, params, frozen, opt_state, bundle, spec, k, t0, grid,
                    chk: core.Checks, fns: step_lib.BlockFns) -> None:
  T = bundle.tensors
  batch = {key: jnp.asarray(v) for key, v in _batch(T, t0, block_spec.arch).items()}
  x_in = _block_input(T, block_spec, k, t0, batch)
  hashes, _, _ = jobspec.block_fingerprint(block_spec, opt_cfg, params, frozen, opt_state, x_in,
                                           batch, job_lib.step_key(int(spec["seed"]), t0), fns=fns)
  want = spec["program_fingerprint"]
  diff = sorted(n for n, h in hashes.items() if want.get(n) != h)
  chk.require(not diff, "program", f"this verifier's compiled programs differ from the committed "
              f"fingerprint in {diff} (other software)")
  partials = [jax.ShapeDtypeStruct(T[names.step_tensor(t0, "sq_norms", j)].shape, np.float32)
              for j in range(grid.num_layer_blocks)]
  chk.require(jobspec.combine_fingerprint(partials, fns=fns) == want.get("combine_norms"),
              "program", "combine_norms differs from the committed fingerprint")


def _replay(block_spec, opt_cfg, params, opt_state, frozen, bundle, grid, k, steps, committed,
            chk: core.Checks, seed: int, fns: step_lib.BlockFns,
            placement: mesh_lib.Placement | None = None) -> None:
  T = bundle.tensors
  last = k == grid.num_layer_blocks - 1
  for t in steps:
    batch = {key: jnp.asarray(v) for key, v in _batch(T, t, block_spec.arch).items()}
    if placement is not None:
      batch = placement.batch(batch)
    x_in = _block_input(T, block_spec, k, t, batch)
    ct_above = None if last else jnp.asarray(T[names.step_tensor(t, "bwd_in", k)])
    if placement is not None and k > 0:
      x_in = placement.boundary(x_in)
    if placement is not None and ct_above is not None:
      ct_above = placement.boundary(ct_above)
    replayed = {}

    def grad_norm(partial, t=t):
      # (numpy, not device arrays, for the others: with several processes jit takes numpy as
      # the same value on every process)
      partials = [partial if j == k else np.asarray(T[names.step_tensor(t, "sq_norms", j)])
                  for j in range(grid.num_layer_blocks)]
      replayed["grad_norm"] = fns.combine(partials)
      if chk.mode == "exact":
        return replayed["grad_norm"]
      # Tolerance mode: the global scalar is an input of this block's update: use the
      # recorded one (the replayed one is compared with it below).
      return jnp.asarray(T[names.step_tensor(t, "grad_norm")])

    r = step_lib.block_step(block_spec, opt_cfg, params, opt_state, frozen, x_in, batch,
                            job_lib.step_key(seed, t), ct_above, grad_norm, fns=fns)
    if jax.process_count() > 1:  # the replayed values whole on every process, then as on one
      r = dataclasses.replace(r, **{f.name: jax.tree.map(multihost.host_value, getattr(r, f.name))
                                    for f in dataclasses.fields(r)})
      replayed["grad_norm"] = multihost.host_value(replayed["grad_norm"])
    if chk.mode == "exact" and grid.num_units:
      # Units in order: the first whose output leaves the record locates the failure.
      for u, name, out in zip(block_spec.unit_indices, block_spec.unit_names, r.inner):
        chk.require(hashing.hash_array(np.asarray(out)) == committed("unit_out", t, u), "fwd_out",
                    f"step {t}: the output of unit {name} (in block {k}) differs from the "
                    "committed one", t, [name])
    what = "loss" if last else f"output activation of block {k}"
    chk.compare("loss" if last else "fwd_out", r.out, T[names.step_tensor(t, "fwd_out", k)],
                committed("fwd_out", t, k), t, what)
    if last:
      chk.compare("loss", r.out, T[names.step_tensor(t, "loss")], committed("loss", t), t, "loss")
      chk.require(hashing.hash_array(np.asarray(r.ct_in)) == committed("bwd_in", t, k), "bwd_in",
                  f"step {t}: the committed loss cotangent is not 1", t)
    else:
      chk.require(hashing.hash_array(np.asarray(T[names.step_tensor(t, "bwd_in", k)])) ==
                  committed("bwd_in", t, k), "opening", f"step {t}: cotangent from above", t)
    if k > 0:
      chk.compare("bwd_in", r.ct_down, T[names.step_tensor(t, "bwd_in", k - 1)],
                  committed("bwd_in", t, k - 1), t, f"cotangent passed down by block {k}")
    chk.compare("sq_norms", r.sq_norms, T[names.step_tensor(t, "sq_norms", k)],
                committed("sq_norms", t, k), t, "gradient norm partials")
    chk.compare("grad_norm", replayed["grad_norm"], T[names.step_tensor(t, "grad_norm")],
                committed("grad_norm", t), t, "global gradient norm")
    params, opt_state = r.params, r.opt_state
    if placement is not None and jax.process_count() > 1:
      params, opt_state = placement.state(params), placement.state(opt_state)
  t_end = steps[-1] + 1
  if jax.process_count() > 1:
    params, opt_state = jax.tree.map(multihost.host_value, (params, opt_state))
  for kind, tree in (("params", params), ("opt_state", opt_state)):
    prefix = names.state("end", kind)
    if chk.mode == "exact":
      ok = hashing.hash_pytree(tree) == committed(kind, t_end, k)
      where = None if ok else _leaf_differences(tree, T, prefix)
      chk.require(ok, kind, f"after step {t_end - 1}: replayed {kind} of block {k} differ from the "
                  f"committed ones" + (f" in {where}" if where else ""), t_end - 1, where)
    else:
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        p = hashing.path_str(hashing.path_components(path))
        err = core.rel_err(leaf, T[names.tree_name(prefix, path)])
        chk.max_rel[kind] = max(chk.max_rel.get(kind, 0.0), err)
        chk.require(err <= chk.tol[kind], kind, f"after step {t_end - 1}: {kind} {p} differs by "
                    f"{err:.3g} (threshold {chk.tol[kind]:.1g})", t_end - 1, [p])
