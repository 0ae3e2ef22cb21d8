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
tensors under the per-kind relative thresholds in TOLERANCES (reported in the verdict).

The verifier only ever holds one layer block's parameters.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aftune import bundle as bundle_lib
from aftune import challenge as challenge_lib
from aftune import data as data_lib
from aftune import grid as grid_lib
from aftune import hashing
from aftune import job as job_lib
from aftune import jobspec
from aftune import merkle
from aftune import model as model_lib
from aftune import optim
from aftune import provenance
from aftune import signing
from aftune import step as step_lib
from aftune import trace

PyTree = Any

# Fields of the job spec the client agrees to before training (the rest is the
# provider's declaration of its programs and platform).
AGREED_FIELDS = ("base_model_hash", "tokenizer_hash", "dataset_root", "num_examples",
                 "hyperparameters", "seed", "prng_impl", "grid")

# Tolerance mode: max over the tensor of |replay - revealed| / (max |revealed| + 1e-12),
# per kind. Calibrated (docs/audit.md, scripts/determinism_facts.py --part c) from honest
# replays on 1 thread of runs recorded on 2 (tiny config, AdamW, with and without LR
# warmup). Worst honest errors: fwd_out 6.0e-5, bwd_in 7.0e-6, loss 1.6e-7, sq_norms
# 4.7e-6, grad_norm 1.1e-7, params 5.1e-4 (AdamW turns tiny gradient differences into
# lr-sized steps), opt_state 4.9e-5. Thresholds sit 10-200x above them; a job with
# another optimizer or scale should calibrate its own (`experiments.verify --tolerances`),
# and the verdict publishes the ones used.
TOLERANCES = {"fwd_out": 1e-3, "bwd_in": 1e-3, "loss": 1e-5, "sq_norms": 1e-3,
              "grad_norm": 1e-5, "params": 5e-3, "opt_state": 1e-3}


class AuditInputError(ValueError):
  """Input the verifier cannot judge (wrong job, cell outside the grid, wrong platform)."""


class Mismatch(Exception):
  """A check failed: the provider's opening is rejected."""

  def __init__(self, check: str, detail: str, step: int | None = None, where: Any = None):
    super().__init__(detail)
    self.check, self.detail, self.step, self.where = check, detail, step, where


@dataclasses.dataclass
class CellReport:
  layer_block: int
  step_block: int
  passed: bool
  reason: str  # "" when passed
  check: str  # the failed check's name
  step: int | None  # first step where the replay leaves the record
  where: Any  # e.g. the units/parameters that differ
  num_checks: int
  max_rel_err: dict[str, float]  # tolerance mode
  auth_s: float
  replay_s: float

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class Checks:
  """Counts checks and raises Mismatch on the first failure."""

  def __init__(self, mode: str, tolerances: dict[str, float]):
    self.mode, self.tol, self.n = mode, tolerances, 0
    self.max_rel: dict[str, float] = {}

  def require(self, ok: bool, check: str, detail: str, step: int | None = None, where=None):
    self.n += 1
    if not ok:
      raise Mismatch(check, detail, step, where)

  def compare(self, kind: str, replayed: Any, revealed: np.ndarray, committed: bytes, step: int,
              what: str) -> None:
    """Replay vs record: bitwise (exact) or within the kind's threshold (tolerance)."""
    if self.mode == "exact":
      self.require(hashing.hash_array(np.asarray(replayed)) == committed, kind,
                   f"step {step}: replayed {what} differs from the committed one", step)
      return
    err = rel_err(replayed, revealed)
    self.max_rel[kind] = max(self.max_rel.get(kind, 0.0), err)
    self.require(err <= self.tol[kind], kind, f"step {step}: replayed {what} differs from the "
                 f"revealed one by {err:.3g} (threshold {self.tol[kind]:.1g})", step)


def rel_err(a: Any, b: Any) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12)) if b.size else 0.0


def unflatten(abstract: PyTree, tensors: dict[str, np.ndarray], prefix: str, chk: Checks) -> PyTree:
  leaves = []
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  for path, leaf in flat:
    name = f"{prefix}/{hashing.path_str(hashing.path_components(path))}"
    arr = tensors.get(name)
    chk.require(arr is not None, "opening", f"the bundle lacks tensor {name}")
    chk.require(arr.shape == tuple(leaf.shape) and arr.dtype == leaf.dtype, "opening",
                f"tensor {name} is {arr.dtype}{list(arr.shape)}, expected {leaf.dtype}{list(leaf.shape)}")
    leaves.append(jnp.asarray(arr))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _leaf_differences(replayed: PyTree, tensors: dict[str, np.ndarray], prefix: str) -> list[str]:
  """Parameter paths whose replayed value differs from the revealed one."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(replayed)[0]:
    p = hashing.path_str(hashing.path_components(path))
    rev = tensors.get(f"{prefix}/{p}")
    if rev is None or hashing.hash_array(np.asarray(leaf)) != hashing.hash_array(rev):
      out.append(p)
  return out


def environment_differences(spec_env: dict[str, Any]) -> list[str]:
  here = provenance.environment_manifest()
  return sorted(k for k in set(spec_env) | set(here) if spec_env.get(k) != here.get(k))


def verify_bundle(bundle: bundle_lib.Bundle, *, commitment: dict[str, Any],
                  agreed: dict[str, Any] | None = None,
                  challenge: challenge_lib.Challenge | None = None, mode: str = "exact",
                  tolerances: dict[str, float] | None = None,
                  check_environment: bool = True) -> CellReport:
  """Verifies one opened cell.

  Args:
    bundle: the provider's opening of the cell.
    commitment: the signed commitment the client received (its own copy).
    agreed: the job-spec fields the client agreed to (AGREED_FIELDS), or None to skip.
    challenge: the challenge the cell answers, or None.
    mode: "exact" (bitwise) or "tolerance".
    tolerances: per-kind thresholds for tolerance mode (default TOLERANCES).
    check_environment: in exact mode, refuse a platform other than the recorded one.

  Returns:
    The cell's report (passed or the first failure and where it happened).

  Raises:
    AuditInputError: the bundle is for another job, the cell is outside the grid, or
      exact mode on another platform.
  """
  if mode not in ("exact", "tolerance"):
    raise AuditInputError(f"mode must be exact or tolerance, got {mode!r}")
  chk = Checks(mode, {**TOLERANCES, **(tolerances or {})})
  k, s = bundle.cell
  t_auth = time.perf_counter()
  m = bundle.manifest
  # The grid and job come from the client's commitment, never from the bundle.
  grid = trace.Grid.from_dict(commitment["grid"])
  if not (0 <= k < grid.num_layer_blocks and 0 <= s < grid.num_step_blocks):
    raise AuditInputError(f"cell ({k}, {s}) is outside the {grid.num_layer_blocks}x"
                          f"{grid.num_step_blocks} grid of job {commitment['job_id'][:16]}")
  if m["commitment"].get("job_id") != commitment.get("job_id"):
    raise AuditInputError(f"the bundle is for job {str(m['commitment'].get('job_id'))[:16]}, "
                          f"not {commitment['job_id'][:16]}")
  if challenge is not None and (challenge.job_id != commitment["job_id"]):
    raise AuditInputError("the challenge is for another job")
  if mode == "exact" and check_environment:
    diff = environment_differences(m["job_spec"].get("environment", {}))
    if diff:
      raise AuditInputError(
          f"exact mode needs the recorded platform; this one differs in {diff} "
          "(run the verifier there, pin the CPU threads, or use --mode=tolerance)")
  steps = list(grid.step_block_range(s))
  try:
    _authenticate(bundle, commitment, agreed, challenge, grid, chk)
    spec = m["job_spec"]
    hp = spec["hyperparameters"]
    cfg = model_lib.ModelConfig.from_dict(hp["model"])
    opt_cfg = optim.OptimConfig(**hp["optimizer"])
    block_spec, t_abs, f_abs = grid_lib.abstract_block(cfg, grid.units_per_block, k)
    chk.require(block_spec.num_blocks == grid.num_layer_blocks, "job_spec",
                "the model config and the grid disagree on the number of layer blocks")
    opt_abs = jax.eval_shape(lambda p: optim.init_opt_state(opt_cfg, p), t_abs)
    T = bundle.tensors
    params = unflatten(t_abs, T, "state/start/params", chk)
    opt_state = unflatten(opt_abs, T, "state/start/opt_state", chk)
    frozen = unflatten(f_abs, T, "frozen", chk)
    leaves = {(e["kind"], e["step"], e["block"]): bytes.fromhex(e["payload"]) for e in m["leaves"]}
    committed = lambda kind, t, j=-1: _leaf(leaves, kind, t, j, chk)
    for kind, tree in (("params", params), ("opt_state", opt_state)):
      chk.require(hashing.hash_pytree(tree) == committed(kind, steps[0], k), "opening",
                  f"start {kind} do not match the committed hash", steps[0])
    _check_against_base_model(m, spec, k, frozen, params if s == 0 else None, chk)
    _check_data(bundle, spec, grid, steps, committed, chk)
    if mode == "exact":
      _check_programs(block_spec, opt_cfg, params, frozen, opt_state, bundle, spec, k, steps[0],
                      grid, chk)
    auth_s = time.perf_counter() - t_auth

    t_replay = time.perf_counter()
    _replay(block_spec, opt_cfg, params, opt_state, frozen, bundle, grid, k, steps, committed, chk,
            int(spec["seed"]))
    return CellReport(k, s, True, "", "", None, None, chk.n, chk.max_rel, auth_s,
                      time.perf_counter() - t_replay)
  except Mismatch as e:
    return CellReport(k, s, False, e.detail, e.check, e.step, e.where, chk.n, chk.max_rel,
                      time.perf_counter() - t_auth, 0.0)


def _leaf(leaves, kind, t, j, chk) -> bytes:
  payload = leaves.get((kind, t, j))
  chk.require(payload is not None, "opening", f"the bundle lacks the committed leaf "
              f"({kind}, step {t}, block {j})", t if t >= 0 else None)
  return payload


def check_commitment(bundle, commitment, challenge, chk: Checks) -> None:
  """The client's commitment is validly signed, is the bundle's, and is the challenge's root."""
  k, s = bundle.cell
  try:
    signing.verify_document(commitment)
  except signing.SignatureError as e:
    chk.require(False, "signature", f"the client's commitment: {e}")
  chk.require(bundle.manifest["commitment"] == commitment, "commitment",
              "the bundle carries another commitment than the client's (re-signed or rewritten)")
  if challenge is not None:
    chk.require(challenge.root == commitment["merkle_root"], "challenge",
                "the commitment's root is not the one the challenge was drawn from "
                "(commitment rewritten after the challenge)")
    chk.require((k, s) in {tuple(c) for c in challenge.cells}, "challenge",
                f"cell ({k}, {s}) was not challenged")


def check_inclusion(entries, grid, commitment, chk: Checks) -> dict[tuple[str, int, int], bytes]:
  """Every revealed leaf proves its inclusion at the position its (kind, step, block) has
  in the committed layout; returns (kind, step, block) -> payload."""
  root, n = hashing.from_hex(commitment["merkle_root"]), commitment["num_leaves"]
  chk.require(n == grid.num_leaves, "commitment", "leaf count does not match the grid")
  leaves = {}
  for e in entries:
    try:
      index = grid.index(e["kind"], e["step"], e["block"])
    except ValueError as err:
      chk.require(False, "inclusion", f"revealed leaf {e['kind']}/{e['step']}/{e['block']}: {err}")
    payload = bytes.fromhex(e["payload"])
    leaf = merkle.leaf_hash(e["kind"], e["step"], e["block"], payload)
    proof = [bytes.fromhex(h) for h in e["proof"]]
    chk.require(merkle.verify_inclusion(leaf, index, n, proof, root), "inclusion",
                f"the inclusion proof of leaf ({e['kind']}, step {e['step']}, block {e['block']}) "
                "does not lead to the committed root", e["step"] if e["step"] >= 0 else None)
    leaves[(e["kind"], e["step"], e["block"])] = payload
  return leaves


def _authenticate(bundle, commitment, agreed, challenge, grid, chk: Checks) -> None:
  m = bundle.manifest
  k, s = bundle.cell
  check_commitment(bundle, commitment, challenge, chk)
  spec = m["job_spec"]
  job_id = hashing.hash_json(spec)
  chk.require(job_id.hex() == commitment["job_id"], "job_spec",
              "the job spec does not hash to the committed job id")
  if agreed is not None:
    diff = [f for f in AGREED_FIELDS if spec.get(f) != agreed.get(f)]
    chk.require(not diff, "job_spec", f"the job spec differs from what the client agreed in {diff}")
  chk.require(trace.Grid.from_dict(spec["grid"]) == grid, "job_spec",
              "the job spec's grid is not the committed grid")
  leaves = check_inclusion(m["leaves"], grid, commitment, chk)
  chk.require(leaves.get(("job_spec", -1, -1)) == job_id, "job_spec",
              "the job_spec leaf does not carry the job id")
  for e in m["tensors"]:
    arr = bundle.tensors.get(e["name"])
    chk.require(arr is not None, "opening", f"the bundle lacks tensor {e['name']}")
    want = _leaf(leaves, e["kind"], e["step"], e["block"], chk)
    chk.require(hashing.hash_array(arr) == want, "opening",
                f"tensor {e['name']} does not match its committed hash", e["step"])
  for e in m["trees"]:
    prefix = e["prefix"] + "/"
    items = [(tuple(name[len(prefix):].split("/")), hashing.hash_array(arr))
             for name, arr in bundle.tensors.items() if name.startswith(prefix)]
    want = _leaf(leaves, e["kind"], e["step"], e["block"], chk)
    chk.require(hashing.hash_leaf_digests(items) == want, "opening",
                f"{e['prefix']} does not match its committed hash", e["step"])
  # The verifier, not the provider's manifest, decides what the cell reveals: every tensor
  # the replay reads must be listed above under its own leaf (so it was checked against it).
  steps = list(grid.step_block_range(s))
  need = [k] + ([k - 1] if k > 0 else [])
  listed = {e["name"]: (e["kind"], e["step"], e["block"]) for e in m["tensors"]}
  for t in steps:
    keys = [("indices", t, -1), ("loss", t, -1), ("grad_norm", t, -1)]
    keys += [("sq_norms", t, j) for j in range(grid.num_layer_blocks)]
    keys += [(kind, t, j) for j in need for kind in ("fwd_out", "bwd_in")]
    for kind, _, j in keys:
      name = f"step/{t}/{kind}" + (f"/{j}" if j >= 0 else "")
      chk.require(listed.get(name) == (kind, t, j), "opening",
                  f"the bundle does not reveal {name} as the committed leaf ({kind}, step {t}, "
                  f"block {j})", t)
  trees = {e["prefix"]: (e["kind"], e["step"], e["block"]) for e in m["trees"]}
  for label, t in (("start", steps[0]), ("end", steps[-1] + 1)):
    for kind in trace.STATE_KINDS:
      chk.require(trees.get(f"state/{label}/{kind}") == (kind, t, k), "opening",
                  f"the bundle does not reveal state/{label}/{kind} as the committed leaf "
                  f"({kind}, step {t}, block {k})", t)


def _check_against_base_model(m, spec, k, frozen, start_params, chk: Checks) -> None:
  """Frozen (and step-0) parameters are the agreed base model's, via its leaf digests."""
  digests = {tuple(c): bytes.fromhex(d) for c, d in m["model_digests"]}
  items = [(c, d) for c, d in digests.items()]
  chk.require(hashing.hash_leaf_digests(items).hex() == spec["base_model_hash"], "base_model",
              "the revealed model digests do not hash to the base model hash")
  for tree, what in ((frozen, "frozen"), (start_params, "starting")):
    if tree is None:
      continue
    for comps, digest in hashing.pytree_leaf_hashes(tree):
      chk.require(digests.get(comps) == digest, "base_model",
                  f"{what} parameter {hashing.path_str(comps)} of block {k} is not the base "
                  "model's", where=[hashing.path_str(comps)])


def _check_data(bundle, spec, grid, steps, committed, chk: Checks) -> None:
  seed, n = int(spec["seed"]), int(spec["num_examples"])
  batch_size = int(spec["hyperparameters"]["batch_size"])
  root = hashing.from_hex(spec["dataset_root"])
  for t in steps:
    want_idx = data_lib.example_indices_for_step(seed, n, batch_size, t)
    got_idx = bundle.tensors.get(f"step/{t}/indices")
    chk.require(got_idx is not None and np.array_equal(got_idx, want_idx), "data",
                f"step {t}: the committed batch indices are not the agreed batch order "
                "(seed, dataset size, step)", t)
    batch = {key: bundle.tensors.get(f"step/{t}/batch/{key}") for key in data_lib.BATCH_KEYS}
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


def _check_programs(block_spec, opt_cfg, params, frozen, opt_state, bundle, spec, k, t0, grid,
                    chk: Checks) -> None:
  T = bundle.tensors
  batch = {key: jnp.asarray(T[f"step/{t0}/batch/{key}"]) for key in data_lib.BATCH_KEYS}
  x_in = batch["tokens"] if k == 0 else jnp.asarray(T[f"step/{t0}/fwd_out/{k - 1}"])
  hashes, _, _ = jobspec.block_fingerprint(block_spec, opt_cfg, params, frozen, opt_state, x_in,
                                           batch, job_lib.step_key(int(spec["seed"]), t0))
  want = spec["program_fingerprint"]
  diff = sorted(n for n, h in hashes.items() if want.get(n) != h)
  chk.require(not diff, "program", f"this verifier's compiled programs differ from the committed "
              f"fingerprint in {diff} (other software)")
  partials = [jax.ShapeDtypeStruct(T[f"step/{t0}/sq_norms/{j}"].shape, np.float32)
              for j in range(grid.num_layer_blocks)]
  chk.require(jobspec.combine_fingerprint(partials) == want.get("combine_norms"), "program",
              "combine_norms differs from the committed fingerprint")


def _replay(block_spec, opt_cfg, params, opt_state, frozen, bundle, grid, k, steps, committed,
            chk: Checks, seed: int) -> None:
  T = bundle.tensors
  last = k == grid.num_layer_blocks - 1
  for t in steps:
    batch = {key: jnp.asarray(T[f"step/{t}/batch/{key}"]) for key in data_lib.BATCH_KEYS}
    x_in = batch["tokens"] if k == 0 else jnp.asarray(T[f"step/{t}/fwd_out/{k - 1}"])
    y, vjp, inner = step_lib.block_fwd(block_spec, params, frozen, x_in, batch,
                                       job_lib.step_key(seed, t))
    if chk.mode == "exact" and grid.num_units:
      # Units in order: the first whose output leaves the record locates the failure.
      for u, name, out in zip(block_spec.unit_indices, block_spec.unit_names, inner):
        chk.require(hashing.hash_array(np.asarray(out)) == committed("unit_out", t, u), "fwd_out",
                    f"step {t}: the output of unit {name} (in block {k}) differs from the "
                    "committed one", t, [name])
    what = "loss" if last else f"output activation of block {k}"
    chk.compare("loss" if last else "fwd_out", y, T[f"step/{t}/fwd_out/{k}"],
                committed("fwd_out", t, k), t, what)
    if last:
      chk.compare("loss", y, T[f"step/{t}/loss"], committed("loss", t), t, "loss")
    ct = step_lib.loss_seed(y) if last else jnp.asarray(T[f"step/{t}/bwd_in/{k}"])
    chk.require(last or hashing.hash_array(np.asarray(T[f"step/{t}/bwd_in/{k}"])) ==
                committed("bwd_in", t, k), "opening", f"step {t}: cotangent from above", t)
    if last:
      chk.require(hashing.hash_array(np.asarray(ct)) == committed("bwd_in", t, k), "bwd_in",
                  f"step {t}: the committed loss cotangent is not 1", t)
    grads, ct_down = step_lib.block_bwd(vjp, ct)
    if k > 0:
      chk.compare("bwd_in", ct_down, T[f"step/{t}/bwd_in/{k - 1}"], committed("bwd_in", t, k - 1), t,
                  f"cotangent passed down by block {k}")
    partial = step_lib.block_sq_norms(grads)
    chk.compare("sq_norms", partial, T[f"step/{t}/sq_norms/{k}"], committed("sq_norms", t, k), t,
                "gradient norm partials")
    partials = [partial if j == k else jnp.asarray(T[f"step/{t}/sq_norms/{j}"])
                for j in range(grid.num_layer_blocks)]
    g_norm = step_lib.combine_norms(partials)
    chk.compare("grad_norm", g_norm, T[f"step/{t}/grad_norm"], committed("grad_norm", t), t,
                "global gradient norm")
    if chk.mode == "exact":
      g_norm_used = g_norm
    else:  # the global scalar is an input of this block's update: use the recorded one
      g_norm_used = jnp.asarray(T[f"step/{t}/grad_norm"])
    params, opt_state = step_lib.block_update(opt_cfg, params, opt_state, grads, g_norm_used)
  t_end = steps[-1] + 1
  for kind, tree in (("params", params), ("opt_state", opt_state)):
    prefix = f"state/end/{kind}"
    if chk.mode == "exact":
      ok = hashing.hash_pytree(tree) == committed(kind, t_end, k)
      where = None if ok else _leaf_differences(tree, T, prefix)
      chk.require(ok, kind, f"after step {t_end - 1}: replayed {kind} of block {k} differ from the "
                  f"committed ones" + (f" in {where}" if where else ""), t_end - 1, where)
    else:
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        p = hashing.path_str(hashing.path_components(path))
        err = rel_err(leaf, T[f"{prefix}/{p}"])
        chk.max_rel[kind] = max(chk.max_rel.get(kind, 0.0), err)
        chk.require(err <= chk.tol[kind], kind, f"after step {t_end - 1}: {kind} {p} differs by "
                    f"{err:.3g} (threshold {chk.tol[kind]:.1g})", t_end - 1, [p])
