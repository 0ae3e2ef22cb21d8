"""The audit core shared by training and inference cells: checks, reports, authentication.

A cell's verification (`verify_cell`) is one skeleton for both kinds of cell:
  1. refuse input it cannot judge (`AuditInputError`): a cell outside the client's grid,
     a bundle for another job, exact mode on another platform;
  2. authenticate and replay (the kind's own function), every check through `Checks`,
     which raises `Mismatch` on the first failure;
  3. a `CellReport`: passed, or the first failed check, where and at which step.
The pieces every kind authenticates the same way are here too: the commitment and its
signature (`check_commitment`), every revealed leaf's inclusion proof (`check_inclusion`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from aftune import errors
from aftune import provenance
from aftune.audit import names
from aftune.crypto import hashing
from aftune.crypto import merkle
from aftune.crypto import signing
from aftune.model import blocks as grid_lib
from aftune.model import family

PyTree = Any

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
MODES = ("exact", "tolerance")


class AuditInputError(errors.InputError):
  """Input the verifier cannot judge (wrong job, cell outside the grid, wrong platform)."""


class Mismatch(Exception):
  """A check failed: the provider's opening is rejected."""

  def __init__(self, check: str, detail: str, step: int | None = None, where: Any = None):
    super().__init__(detail)
    self.check, self.detail, self.step, self.where = check, detail, step, where


@dataclasses.dataclass
class CellReport:
  layer_block: int
  step_block: int  # the step block (training) or the generation step (inference)
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
  """The pytree of shape `abstract` from tensors prefix/<path>, each checked for shape and dtype."""
  leaves = []
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  for path, leaf in flat:
    name = names.tree_name(prefix, path)
    arr = tensors.get(name)
    chk.require(arr is not None, "opening", f"the bundle lacks tensor {name}")
    chk.require(arr.shape == tuple(leaf.shape) and arr.dtype == leaf.dtype, "opening",
                f"tensor {name} is {arr.dtype}{list(arr.shape)}, expected {leaf.dtype}{list(leaf.shape)}")
    leaves.append(jnp.asarray(arr))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def environment_differences(spec_env: dict[str, Any]) -> list[str]:
  """The recorded environment fields a bitwise replay here would not reproduce.

  The CPU's model name is information only: what decides the bits is the code XLA
  generates for the CPU's instruction set (`cpu.isa`) and the intra-op pool size, not the
  part number (docs/determinism.md, "The platform envelope").
  """
  here = provenance.environment_manifest()
  strip = lambda env: {**env, "cpu": (env.get("cpu") or {}).get("isa")
                       if isinstance(env.get("cpu"), dict) else env.get("cpu")}
  spec_env, here = strip(spec_env), strip(here)
  return sorted(k for k in set(spec_env) | set(here) if spec_env.get(k) != here.get(k))


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


def check_model_digests(digests_json, model_hash: str, what: str, chk: Checks) -> dict:
  """The revealed per-parameter digests hash to the committed model hash; returns them."""
  digests = {tuple(c): bytes.fromhex(d) for c, d in digests_json}
  check = "base_model" if what == "base" else "model"
  chk.require(hashing.hash_leaf_digests(list(digests.items())).hex() == model_hash, check,
              f"the revealed model digests do not hash to the {what} model hash")
  return digests


def tree_paths(tree: PyTree) -> list[tuple[str, ...]]:
  """The canonical path components of every leaf (the naming of `hashing.hash_pytree`)."""
  return [hashing.path_components(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def shape_sig(a: Any) -> tuple[str, tuple[int, ...]]:
  """(dtype name, shape) of an array or ShapeDtypeStruct: one entry of a bundle's tensor schema."""
  return np.dtype(a.dtype).name, tuple(int(d) for d in a.shape)


def tree_shapes(tree: PyTree) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Canonical path -> shape_sig of every leaf (the names `names.flatten_tree` gives)."""
  return {hashing.path_str(c): shape_sig(a)
          for c, a in zip(tree_paths(tree), jax.tree_util.tree_leaves(tree))}


@functools.lru_cache(maxsize=8)
def _block_paths(model_json: str, units_per_block: int) -> tuple:
  """Per layer block: (trainable paths, frozen paths), from shapes alone."""
  cfg = family.config_from_dict(json.loads(model_json))
  n = grid_lib.num_layer_blocks(len(family.of(cfg).unit_names(cfg)), units_per_block)
  out = []
  for j in range(n):
    _, t_abs, f_abs = grid_lib.abstract_block(cfg, units_per_block, j)
    out.append((tree_paths(t_abs), tree_paths(f_abs)))
  return tuple(out)


def check_final_model(final_digests_json, base_digests: dict, training_commitment: dict,
                      leaves: dict, model_cfg: dict, grid: Any, chk: Checks) -> None:
  """The model a training commitment names as final is the end state its trace commits to.

  The per-parameter digests of the final model must hash to `final_model_hash`; for every
  layer block j, the digests of its trainable parameters must hash to the committed leaf
  (params, T, j) (the state after the last step), and its frozen parameters must be the
  base model's. So a commitment cannot name one model as final while its trace ends in
  another: any audited cell (and any inference audit bound to the training) checks it.

  Args:
    final_digests_json: [[path components], hex digest] of the final model.
    base_digests: path components -> digest of the base model (already authenticated).
    training_commitment: the client's signed training commitment.
    leaves: (kind, step, block) -> payload of leaves whose inclusion was checked against it.
    model_cfg: the job's model config (its parameter tree, from shapes alone).
    grid: the training grid.
    chk: the cell's checks.
  """
  digests = {tuple(c): bytes.fromhex(d) for c, d in final_digests_json}
  chk.require(len(digests) == len(final_digests_json), "final_model",
              "the final model digests list a parameter twice")
  chk.require(hashing.hash_leaf_digests(list(digests.items())).hex()
              == training_commitment["final_model_hash"], "final_model",
              "the final model digests do not hash to the committed final_model_hash")
  try:
    blocks = _block_paths(json.dumps(model_cfg, sort_keys=True), grid.units_per_block)
  except (TypeError, ValueError, KeyError) as e:
    raise AuditInputError(f"the job's model config does not describe a model ({e})") from None
  chk.require(len(blocks) == grid.num_layer_blocks, "job_spec",
              "the model config and the grid disagree on the number of layer blocks")
  listed = set()
  for j, (t_paths, f_paths) in enumerate(blocks):
    missing = [c for c in t_paths + f_paths if c not in digests]
    chk.require(not missing, "final_model", "the final model digests lack parameter "
                f"{hashing.path_str(missing[0]) if missing else ''}")
    end = leaves.get(("params", grid.num_steps, j))
    chk.require(end is not None, "opening", f"the bundle does not reveal the committed final "
                f"parameters of block {j} (params, step {grid.num_steps})")
    ok = hashing.hash_leaf_digests([(c, digests[c]) for c in t_paths]) == end
    chk.require(ok, "final_model", f"block {j} of the model named final (final_model_hash) is not "
                f"the end state of the trace (the parameters committed after step "
                f"{grid.num_steps - 1}): another model is passed off as the trained one",
                grid.num_steps - 1, sorted({c[0] for c in t_paths}))
    changed = [c for c in f_paths if digests[c] != base_digests.get(c)]
    chk.require(not changed, "final_model", "frozen parameter "
                f"{hashing.path_str(changed[0]) if changed else ''} of the final model is not the "
                "base model's", where=[hashing.path_str(c) for c in changed])
    listed.update(t_paths)
    listed.update(f_paths)
  extra = sorted(set(digests) - listed)
  chk.require(not extra, "final_model", "the final model digests list parameters the model "
              f"does not have ({hashing.path_str(extra[0]) if extra else ''})")


def verify_cell(bundle, *, commitment: dict[str, Any], grid: Any, id_field: str, what: str, spec: dict,
                mode: str, tolerances: dict[str, float] | None, check_environment: bool,
                challenge: Any, authenticate: Callable[[Checks], Any],
                replay: Callable[[Checks, Any], None]) -> CellReport:
  """The verification skeleton of one cell of either kind.

  Args:
    bundle: the provider's opening.
    commitment: the client's copy of the signed commitment.
    grid: the committed grid (from the client's commitment, never from the bundle).
    id_field: the commitment field naming the job ("job_id", "inference_id").
    what: what that id names, for messages ("job", "served batch").
    spec: the bundle's job or inference spec (its environment is checked in exact mode).
    mode, tolerances, check_environment: see `train_verifier.verify_bundle`.
    challenge: the challenge the cell answers, or None.
    authenticate: chk -> context: every check that precedes the replay.
    replay: (chk, context) -> None: the replay and its comparisons.

  Returns:
    The cell's report.

  Raises:
    AuditInputError: the cell is outside the grid, the bundle or the challenge is for
      another job, or exact mode on another platform.
  """
  if mode not in MODES:
    raise AuditInputError(f"mode must be exact or tolerance, got {mode!r}")
  chk = Checks(mode, {**TOLERANCES, **(tolerances or {})})
  k, s = bundle.cell
  t_auth = time.perf_counter()
  if not (0 <= k < grid.num_layer_blocks and 0 <= s < grid.num_step_blocks):
    raise AuditInputError(f"cell ({k}, {s}) is outside the {grid.num_layer_blocks}x"
                          f"{grid.num_step_blocks} grid of {what} {commitment[id_field][:16]}")
  if bundle.manifest["commitment"].get(id_field) != commitment.get(id_field):
    raise AuditInputError(f"the bundle is for another {what} "
                          f"({str(bundle.manifest['commitment'].get(id_field))[:16]}, "
                          f"not {commitment[id_field][:16]})")
  if challenge is not None and what == "job" and challenge.job_id != commitment["job_id"]:
    # (A challenge of another served batch fails the cell's "challenge" check instead.)
    raise AuditInputError("the challenge is for another job")
  if mode == "exact" and check_environment:
    diff = environment_differences(spec.get("environment", {}))
    if diff:
      raise AuditInputError(
          f"exact mode needs the recorded platform; this one differs in {diff} "
          "(run the verifier there, pin the CPU threads, or use --mode=tolerance)")
  try:
    context = authenticate(chk)
    auth_s = time.perf_counter() - t_auth
    t_replay = time.perf_counter()
    replay(chk, context)
    return CellReport(k, s, True, "", "", None, None, chk.n, chk.max_rel, auth_s,
                      time.perf_counter() - t_replay)
  except Mismatch as e:
    return CellReport(k, s, False, e.detail, e.check, e.step, e.where, chk.n, chk.max_rel,
                      time.perf_counter() - t_auth, 0.0)
