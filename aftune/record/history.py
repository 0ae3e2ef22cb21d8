"""History that cannot be rewritten: the final trace extends every periodic signed root.

During training the recorder signs the root of the leaves before every checkpoint
(`trace/roots/<t>.json`); a client may receive them as they are made. Afterwards the
provider proves (RFC 9162 consistency proofs) that the final tree only appended to each
of them, and the client checks the proofs against the roots it received.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aftune import jsonio
from aftune.crypto import hashing
from aftune.crypto import merkle
from aftune.crypto import signing
from aftune.record import commitment as commitment_lib
from aftune.record import integrity
from aftune.record import layout as trace
from aftune.record import schemas

HISTORY_FORMAT = "aftune-history/v1"


def prove_history(workdir: str | Path) -> dict[str, Any]:
  """The provider's proof that the final trace only appended to every periodic signed root.

  Returns:
    {"format", "job_id", "merkle_root", "num_leaves", "roots": [{"root_doc": the signed
    periodic root, "proof": [hex] (RFC 9162 consistency proof to the final root)}]}.
  """
  workdir = Path(workdir)
  commitment = commitment_lib.load(workdir / "commitment.json",
                                   formats=(commitment_lib.TRAINING_FORMAT,))
  _, leaves = integrity.load_leaves(workdir, commitment)
  hashes = [l.hash() for l in leaves]
  roots = []
  for root_path in sorted((workdir / "trace" / "roots").glob("*.json")):
    doc = jsonio.load_json(root_path, trace.TraceError, "signed root")
    proof = merkle.consistency_proof(hashes, doc["size"], len(hashes))
    roots.append({"root_doc": doc, "proof": [h.hex() for h in proof]})
  return {"format": HISTORY_FORMAT, "job_id": commitment["job_id"],
          "merkle_root": commitment["merkle_root"], "num_leaves": len(hashes), "roots": roots}


def verify_history(history: dict[str, Any], commitment: dict[str, Any],
                   received_roots: list[dict[str, Any]] | None = None) -> list[str]:
  """The client's check that history was not rewritten; returns the problems (empty: ok).

  Every periodic root must be signed by the commitment's key, be for the same job, cover
  exactly the leaves the grid places before its step (a root "at step S" over the leaves
  of an earlier step would leave the steps between open to rewriting), and be a prefix of
  the final tree (consistency proof). `received_roots` are the signed roots the client got
  during training: each must appear in the history, unchanged. Without them (None) this
  only shows that the final trace extends the roots the provider chose to show.

  Raises:
    errors.InputError: a history or received root that is not of its format's shape.
  """
  schemas.check(history, schemas.HISTORY, "history")
  for i, doc in enumerate(received_roots or []):
    schemas.check(doc, schemas.ROOT, f"received root #{i}")
  grid = trace.Grid.from_dict(commitment["grid"])
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
    if problem := _size_problem(doc, grid):
      problems.append(problem)
      continue
    proof = [bytes.fromhex(h) for h in entry["proof"]]
    if not merkle.verify_consistency(doc["size"], commitment["num_leaves"],
                                     hashing.from_hex(doc["root"]), final, proof):
      problems.append(f"root at step {doc['step']} ({doc['size']} leaves): the final trace does "
                      "not extend it (history rewritten)")
    seen.add(hashing.canonical_json_bytes(doc))
  for doc in received_roots or []:
    if problem := _size_problem(doc, grid):
      problems.append(f"received {problem}")
    elif hashing.canonical_json_bytes(doc) not in seen:
      problems.append(f"the signed root received at step {doc.get('step')} is missing from the "
                      "history or was changed")
  return problems


def _size_problem(doc: dict[str, Any], grid: trace.Grid) -> str | None:
  """Why a periodic root's step and leaf count disagree with the grid, or None."""
  step, size = doc["step"], doc["size"]
  if not 0 <= step <= grid.num_steps:
    return f"root at step {step}: outside the job's {grid.num_steps} steps"
  if size != grid.offset(step):
    return (f"root at step {step}: covers {size} leaves, the grid puts {grid.offset(step)} before "
            f"step {step} (a root that claims a later step than it covers)")
  return None
