"""Checks a recorded workdir end to end: signature, leaf layout, root, stored tensors.

The provider runs this before opening cells (and anyone holding the workdir can): every
stored byte must hash to its committed leaf, so damage is found and named, never served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from aftune import hashing
from aftune import merkle
from aftune import recorder
from aftune import signing
from aftune import tensorfile
from aftune import trace


def load_commitment(path: str | Path, expected_public_key: str | None = None) -> dict[str, Any]:
  """Loads commitment.json and checks its signature (raises naming the file)."""
  path = Path(path)
  try:
    doc = signing.load_json_document(path)
  except FileNotFoundError:
    raise trace.TraceError(f"{path}: commitment missing") from None
  except ValueError as e:
    raise trace.TraceError(f"{path}: {e}") from None
  try:
    signing.verify_document(doc, expected_public_key)
  except signing.SignatureError as e:
    raise trace.TraceError(f"{path}: {e}") from None
  if doc.get("format") != recorder.COMMITMENT_FORMAT:
    raise trace.TraceError(f"{path}: format {doc.get('format')!r}, expected {recorder.COMMITMENT_FORMAT}")
  return doc


def load_leaves(workdir: str | Path, commitment: dict[str, Any]) -> tuple[trace.Grid, list[trace.Leaf]]:
  """The trace's leaves, checked against the committed root."""
  workdir = Path(workdir)
  grid = trace.Grid.from_dict(commitment["grid"])
  path = workdir / "trace" / "leaves.bin"
  leaves = trace.read_leaves(path, grid)
  root = merkle.merkle_root([l.hash() for l in leaves])
  if hashing.hexdigest(root) != commitment["merkle_root"]:
    raise trace.TraceError(f"{path}: leaves do not hash to the committed root "
                           f"{commitment['merkle_root'][:16]}… (corrupted or rewritten)")
  if leaves[0].payload.hex() != commitment["job_id"]:
    raise trace.TraceError(f"{path}: the job_spec leaf does not carry the committed job id")
  return grid, leaves


def check_workdir(workdir: str | Path, *, tensors: bool = True) -> dict[str, Any]:
  """Verifies signature, leaves, root, signed periodic roots and (optionally) step files.

  Args:
    workdir: a recorded run's workdir.
    tensors: also re-hash every stored step file against its leaves.

  Returns:
    A summary (counts); raises TraceError or TensorFileError on the first problem.
  """
  workdir = Path(workdir)
  commitment = load_commitment(workdir / "commitment.json")
  grid, leaves = load_leaves(workdir, commitment)
  spec_path = workdir / "trace" / "job_spec.json"
  spec = json.loads(spec_path.read_text())
  if hashing.hexdigest(hashing.hash_json(spec)) != commitment["job_id"]:
    raise trace.TraceError(f"{spec_path}: does not hash to the committed job id")
  hashes = [l.hash() for l in leaves]
  n_roots = 0
  for root_path in sorted((workdir / "trace" / "roots").glob("*.json")):
    doc = signing.load_json_document(root_path)
    try:
      signing.verify_document(doc, commitment["signature"]["public_key"])
    except signing.SignatureError as e:
      raise trace.TraceError(f"{root_path}: {e}") from None
    proof = merkle.consistency_proof(hashes, doc["size"], len(hashes))
    if not merkle.verify_consistency(doc["size"], len(hashes), hashing.from_hex(doc["root"]),
                                     hashing.from_hex(commitment["merkle_root"]), proof):
      raise trace.TraceError(f"{root_path}: the final root does not extend this signed root "
                             "(history was rewritten)")
    n_roots += 1
  n_files = 0
  if tensors:
    payload = {(l.kind, l.step, l.block): l.payload for l in leaves}
    for t in range(grid.num_steps):
      fwd = tensorfile.read(recorder.step_file(workdir, t, "fwd"))
      bwd = tensorfile.read(recorder.step_file(workdir, t, "bwd"))
      checks = [("indices", -1, fwd["indices"]), ("loss", -1, fwd["loss"]),
                ("grad_norm", -1, fwd["grad_norm"])]
      checks += [("sq_norms", k, fwd[f"sq_norms/{k}"]) for k in range(grid.num_layer_blocks)]
      checks += [("fwd_out", k, fwd[f"fwd_out/{k}"]) for k in range(grid.num_layer_blocks)
                 if grid.stores_boundary(k)]
      checks += [("bwd_in", k, bwd[f"bwd_in/{k}"]) for k in range(grid.num_layer_blocks)
                 if grid.stores_boundary(k)]
      for kind, k, arr in checks:
        if hashing.hash_array(np.asarray(arr)) != payload[(kind, t, k)]:
          raise trace.TraceError(f"{recorder.step_file(workdir, t, 'fwd' if kind != 'bwd_in' else 'bwd')}: "
                                 f"{kind} of block {k} does not match its committed hash")
      n_files += 2
  return {"job_id": commitment["job_id"], "merkle_root": commitment["merkle_root"],
          "num_leaves": len(leaves), "signed_roots": n_roots, "step_files": n_files}


HISTORY_FORMAT = "aftune-history/v1"


def prove_history(workdir: str | Path) -> dict[str, Any]:
  """The provider's proof that the final trace only appended to every periodic signed root.

  Returns:
    {"format", "job_id", "merkle_root", "num_leaves", "roots": [{"root_doc": the signed
    periodic root, "proof": [hex] (RFC 9162 consistency proof to the final root)}]}.
  """
  workdir = Path(workdir)
  commitment = load_commitment(workdir / "commitment.json")
  _, leaves = load_leaves(workdir, commitment)
  hashes = [l.hash() for l in leaves]
  roots = []
  for root_path in sorted((workdir / "trace" / "roots").glob("*.json")):
    doc = signing.load_json_document(root_path)
    proof = merkle.consistency_proof(hashes, doc["size"], len(hashes))
    roots.append({"root_doc": doc, "proof": [h.hex() for h in proof]})
  return {"format": HISTORY_FORMAT, "job_id": commitment["job_id"],
          "merkle_root": commitment["merkle_root"], "num_leaves": len(hashes), "roots": roots}


def verify_history(history: dict[str, Any], commitment: dict[str, Any],
                   received_roots: list[dict[str, Any]] | None = None) -> list[str]:
  """The client's check that history was not rewritten; returns the problems (empty: ok).

  Every periodic root must be signed by the commitment's key, be for the same job, and
  be a prefix of the final tree (consistency proof). `received_roots` are the signed
  roots the client got during training: each must appear in the history, unchanged.
  """
  problems = []
  key = commitment["signature"]["public_key"]
  if (history.get("format") != HISTORY_FORMAT or history.get("job_id") != commitment["job_id"]
      or history.get("merkle_root") != commitment["merkle_root"]
      or history.get("num_leaves") != commitment["num_leaves"]):
    return ["the history is for another job or final root than the commitment"]
  final = hashing.from_hex(commitment["merkle_root"])
  seen = set()
  for entry in history.get("roots", []):
    doc = entry["root_doc"]
    try:
      signing.verify_document(doc, key)
    except signing.SignatureError as e:
      problems.append(f"root at step {doc.get('step')}: {e}")
      continue
    if doc.get("job_id") != commitment["job_id"]:
      problems.append(f"root at step {doc.get('step')}: signed for another job")
      continue
    proof = [bytes.fromhex(h) for h in entry["proof"]]
    if not merkle.verify_consistency(doc["size"], commitment["num_leaves"],
                                     hashing.from_hex(doc["root"]), final, proof):
      problems.append(f"root at step {doc['step']} ({doc['size']} leaves): the final trace does "
                      "not extend it (history rewritten)")
    seen.add(hashing.canonical_json_bytes(doc))
  for doc in received_roots or []:
    if hashing.canonical_json_bytes(doc) not in seen:
      problems.append(f"the signed root received at step {doc.get('step')} is missing from the "
                      "history or was changed")
  return problems
