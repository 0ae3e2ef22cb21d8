"""The client's side of an audit: agree, challenge, verify the openings, write the verdict.

The roles exchange files only:
  provider -> client:   commitment.json                (signed, after training)
  client  -> provider:  challenge.json                 (cells, drawn after the root)
  provider -> verifier: one bundle per challenged cell
  verifier:             verdict.json + verdict.md
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from pathlib import Path
from typing import Any
from typing import Sequence

from aftune import errors
from aftune import jsonio
from aftune import provenance
from aftune.audit import bundle as bundle_lib
from aftune.audit import challenge as challenge_lib
from aftune.audit import challenge_doc
from aftune.audit import core
from aftune.audit import infer_verifier
from aftune.audit import train_verifier
from aftune.crypto import hashing
from aftune.record import commitment as commitment_lib
from aftune.record import jobspec
from aftune.record import schemas
from aftune.train import job as job_lib

VERDICT_FORMAT = "aftune-verdict/v1"


def agreed_fields(job: job_lib.Job) -> dict[str, Any]:
  """What the client agrees to before training: computed from its config, data and base model."""
  spec = jobspec.build_job_spec(job)
  return {f: spec[f] for f in train_verifier.AGREED_FIELDS}


def draw(commitment: dict[str, Any], strategy: str, *, m: int | None = None, k: int | None = None,
         p: float | None = None, nonce: bytes | None = None) -> challenge_doc.Challenge:
  """A challenge over the committed grid, derived from the root and a client nonce."""
  g = commitment["grid"]
  return challenge_lib.draw_challenge(
      job_id=hashing.from_hex(commitment["job_id"]), root=hashing.from_hex(commitment["merkle_root"]),
      num_layer_blocks=int(g["num_layer_blocks"]), num_step_blocks=int(g["num_step_blocks"]),
      strategy=strategy, m=m, k=k, p=p, nonce=nonce)


def verify_openings(bundle_paths: Sequence[str | Path], *, commitment: dict[str, Any],
                    challenge: challenge_doc.Challenge | None, agreed: dict[str, Any] | None,
                    mode: str = "exact", tolerances: dict[str, float] | None = None,
                    expected_model_hash: str | None = None,
                    request: dict[str, Any] | None = None,
                    training_commitment: dict[str, Any] | None = None,
                    response: dict[str, Any] | None = None, workers: int = 1) -> dict[str, Any]:
  """Verifies every bundle (training or inference cells) and assembles the verdict.

  Args:
    bundle_paths: the provider's bundles.
    commitment: the client's copy of the signed commitment (training or inference).
    challenge: the challenge they answer (challenged cells without a bundle fail).
    agreed: the agreed job-spec fields, or None (training).
    mode: "exact" or "tolerance".
    tolerances: overrides of core.TOLERANCES.
    expected_model_hash: inference: the model the client was promised, or None (its
      architecture comes from `agreed`, when given).
    request: inference: the prompts and settings the client sent, or None.
    training_commitment: inference: the signed commitment of the training whose final
      model was promised (its end state is checked against the served weights), or None.
    response: inference: the response the client received (schemas.RESPONSE), or None.
    workers: verifier processes the cells are spread over (the verdict does not depend on
      it, timings aside).

  Returns:
    The verdict document; `unchecked` names everything the client did not supply (a
    verdict with an empty list is bound: to the agreed job, the promised model, the
    request and the response, and to the client's challenge).

  Raises:
    errors.InputError: a bundle that is malformed (BundleError), for a cell opened twice,
      or that the verifier cannot judge (AuditInputError).
  """
  t0 = time.perf_counter()
  inference = commitment_lib.is_inference(commitment)
  if training_commitment is not None:
    expected_model_hash = expected_model_hash or training_commitment["final_model_hash"]
    if expected_model_hash != training_commitment["final_model_hash"]:
      raise core.AuditInputError("the promised model hash is not the training commitment's final "
                                 "model")
  args = dict(commitment=commitment, challenge=challenge, agreed=agreed, mode=mode,
              tolerances=tolerances, expected_model_hash=expected_model_hash, request=request,
              training_commitment=training_commitment, response=response)
  paths = sorted((str(p) for p in bundle_paths))
  if workers > 1 and len(paths) > 1:
    # Parallel audits: the cells spread round-robin over fresh verifier processes, each a
    # whole one-process verifier (a cell's replay is the same wherever it runs).
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(paths)), mp_context=ctx) as pool:
      parts = list(pool.map(_verify_shard, [(paths[i::workers], args) for i in range(workers)]))
  else:
    parts = [_verify_shard((paths, args))]
  reports = [(path, core.CellReport(**r)) for part in parts for path, r in part]
  seen = set()
  for path, r in sorted(reports, key=lambda pr: pr[0]):
    cell = (r.layer_block, r.step_block)
    if cell in seen:
      raise core.AuditInputError(f"{path}: a second bundle for cell {cell}")
    seen.add(cell)
  reports = [r for _, r in reports]
  missing = []
  if challenge is not None:
    missing = sorted(tuple(c) for c in challenge.cells if tuple(c) not in seen)
  cells = [r.to_json() for r in sorted(reports, key=lambda r: (r.layer_block, r.step_block))]
  for k, s in missing:
    cells.append({"layer_block": k, "step_block": s, "passed": False, "check": "opening",
                  "reason": "the provider did not open this challenged cell", "step": None,
                  "where": None, "num_checks": 0, "max_rel_err": {}, "auth_s": 0.0, "replay_s": 0.0})
  verdict = {
      "format": VERDICT_FORMAT,
      "job_id": commitment["job_id"],
      "merkle_root": commitment["merkle_root"],
      "provider_key": commitment["signature"]["public_key"],
      "kind": "inference" if inference else "training",
      "expected_model_hash": expected_model_hash,
      "unchecked": unchecked(inference=inference, challenge=challenge, agreed=agreed,
                             expected_model_hash=expected_model_hash, request=request,
                             response=response, training_commitment=training_commitment),
      "mode": mode,
      "tolerances": {**core.TOLERANCES, **(tolerances or {})} if mode == "tolerance" else None,
      "passed": bool(cells) and all(c["passed"] for c in cells),
      "num_cells": len(cells),
      "num_failed": sum(not c["passed"] for c in cells),
      "cells": cells,
      "challenge": challenge.to_json() if challenge is not None else None,
      "guarantee": challenge.guarantee() if challenge is not None else None,
      "verify_s": time.perf_counter() - t0,
      "verifier_environment": provenance.environment_manifest(),
  }
  return verdict


def _verify_shard(work: tuple[list[str], dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
  """Verifies some bundles; (path, cell report) each. Runs in a worker process too."""
  paths, a = work
  inference = commitment_lib.is_inference(a["commitment"])
  out = []
  for path in paths:
    b = bundle_lib.read_bundle(path, schema=lambda m: _tensor_schema(m, a["commitment"]))
    if b.is_inference != inference:
      kind = lambda inf: "an inference" if inf else "a training"
      raise core.AuditInputError(f"{path}: {kind(b.is_inference)} bundle, but the commitment is "
                                 f"{kind(inference)} commitment")
    if b.is_inference:
      agreed = a["agreed"]
      r = infer_verifier.verify_inference_bundle(
          b, commitment=a["commitment"], expected_model_hash=a["expected_model_hash"],
          expected_model_config=agreed["hyperparameters"]["model"] if agreed else None,
          expected_request=a["request"], training_commitment=a["training_commitment"],
          response=a["response"], challenge=a["challenge"], mode=a["mode"],
          tolerances=a["tolerances"])
    else:
      r = train_verifier.verify_bundle(b, commitment=a["commitment"], agreed=a["agreed"],
                                       challenge=a["challenge"], mode=a["mode"],
                                       tolerances=a["tolerances"])
    out.append((str(path), r.to_json()))
  return out


def _tensor_schema(manifest: dict[str, Any], commitment: dict[str, Any]):
  if manifest["format"] == bundle_lib.INFERENCE_FORMAT:
    return infer_verifier.tensor_schema(manifest, commitment)
  return train_verifier.tensor_schema(manifest, commitment)


def unchecked(*, inference: bool, challenge: Any, agreed: Any, expected_model_hash: Any = None,
              request: Any = None, response: Any = None, training_commitment: Any = None) -> list[str]:
  """What a verdict made from these inputs does not bind, one sentence each (empty: bound)."""
  out = []
  if challenge is None:
    out.append("the challenge (no --challenge): the provider chose which cells to open; the "
               "verdict says nothing about cells it did not open")
  if not inference and agreed is None:
    out.append("the agreed job (no --agreed): the cells were replayed against the provider's own "
               "job spec, which may declare other steps, learning rate, base model or dataset "
               "than the client agreed to")
  if inference:
    if expected_model_hash is None and training_commitment is None:
      out.append("the promised model (no --training_commitment or --model_hash): any model the "
                 "provider committed to passes")
    elif training_commitment is None:
      out.append("the training's end state (no --training_commitment): the served weights hash to "
                 "the promised model hash, but are not checked against a training trace")
    if agreed is None:
      out.append("the promised architecture (no --agreed): dtype, norm epsilon and RoPE settings "
                 "are the provider's declaration")
    if request is None:
      out.append("the request (no --request): the committed prompts and settings are not "
                 "compared with what the client sent")
    if response is None:
      out.append("the response (no --response): the tokens the client received are not compared "
                 "with the committed ones")
  return out


def render_markdown(verdict: dict[str, Any]) -> str:
  """The human-readable report of a verdict."""
  loose = verdict.get("unchecked") or []
  result = "PASS" if verdict["passed"] else "FAIL"
  lines = [
      f"# Audit verdict: {result}" + (" (UNBOUND: see below)" if loose else ""),
      "",
      f"- {'served batch' if verdict.get('kind') == 'inference' else 'job'} id: `{verdict['job_id']}`",
      f"- Merkle root: `{verdict['merkle_root']}`",
      f"- provider key: `{verdict['provider_key']}`",
      f"- mode: {verdict['mode']}"
      + ("" if verdict["mode"] == "exact" else f" (thresholds: {verdict['tolerances']})"),
      f"- cells checked: {verdict['num_cells']}, failed: {verdict['num_failed']}",
      f"- verification time: {verdict['verify_s']:.2f} s",
  ]
  if loose:
    lines += ["", "## Not checked: this verdict is unbound", "",
              "The client did not supply what would bind the verdict to these:", ""]
    lines += [f"- {u}" for u in loose]
  if verdict.get("guarantee"):
    lines += ["", "## Guarantee of this sample", "", verdict["guarantee"]["text"]]
  lines += ["", "## Cells", "", "| layer block | step block | result | checks | auth s | replay s | reason |",
            "|---|---|---|---|---|---|---|"]
  for c in verdict["cells"]:
    where = f" (first at step {c['step']})" if c.get("step") is not None else ""
    reason = (c["reason"] + where).replace("|", "/") if not c["passed"] else ""
    lines.append(f"| {c['layer_block']} | {c['step_block']} | {'pass' if c['passed'] else 'FAIL: ' + c['check']} "
                 f"| {c['num_checks']} | {c['auth_s']:.2f} | {c['replay_s']:.2f} | {reason} |")
  return "\n".join(lines) + "\n"


def write_verdict(verdict: dict[str, Any], json_path: str | Path, md_path: str | Path | None) -> None:
  jsonio.write_json(json_path, verdict)
  if md_path is not None:
    Path(md_path).write_text(render_markdown(verdict))


def load_json(path: str | Path) -> Any:
  """A JSON input of the verifier; a missing or malformed file is an AuditInputError."""
  return jsonio.load_json(path, core.AuditInputError)


def load_agreed(path: str | Path) -> dict[str, Any]:
  """The job-spec fields the client agreed to (`experiments.agree` writes them)."""
  assert set(schemas.AGREED["required"]) == set(train_verifier.AGREED_FIELDS)
  return schemas.check(load_json(path), schemas.AGREED, path, core.AuditInputError)


def load_request(path: str | Path) -> dict[str, Any]:
  """The client's request: {"prompts": [[ids]...], "settings": {...}} (schemas.REQUEST), or
  for a classified batch {"images_hash": hex} (schemas.IMAGES_REQUEST)."""
  doc = load_json(path)
  if isinstance(doc, dict) and "images_hash" in doc:
    return schemas.check(doc, schemas.IMAGES_REQUEST, path, core.AuditInputError)
  return schemas.check(doc, schemas.REQUEST, path, core.AuditInputError)


def load_response(path: str | Path) -> dict[str, Any]:
  """The response the client received (schemas.RESPONSE; `serving.serve` writes it)."""
  return schemas.check(load_json(path), schemas.RESPONSE, path, core.AuditInputError)


def load_commitment(path: str | Path, public_key: str | None = None) -> dict[str, Any]:
  """A signed training or inference commitment (signature checked, key pinned if given)."""
  try:
    return commitment_lib.load(path, public_key=public_key)
  except errors.InputError as e:
    raise core.AuditInputError(str(e)) from None
