"""Checks a recorded workdir end to end: signature, leaf layout, root, stored tensors.

The provider runs this before opening cells (and anyone holding the workdir can): every
stored byte must hash to its committed leaf, so damage is found and named, never served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aftune import jsonio
from aftune.crypto import hashing
from aftune.crypto import merkle
from aftune.record import commitment as commitment_lib
from aftune.record import layout as trace
from aftune.record import recorder


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
  commitment = commitment_lib.load(workdir / "commitment.json",
                                   formats=(commitment_lib.TRAINING_FORMAT,))
  grid, leaves = load_leaves(workdir, commitment)
  spec_path = workdir / "trace" / "job_spec.json"
  spec = jsonio.load_json(spec_path, trace.TraceError, "job spec")
  if hashing.hexdigest(hashing.hash_json(spec)) != commitment["job_id"]:
    raise trace.TraceError(f"{spec_path}: does not hash to the committed job id")
  hashes = [l.hash() for l in leaves]
  n_roots = 0
  for root_path in sorted((workdir / "trace" / "roots").glob("*.json")):
    doc = commitment_lib.load(root_path, formats=(commitment_lib.ROOT_FORMAT,),
                              public_key=commitment["signature"]["public_key"])
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
      fwd = recorder.read_step(workdir, t, "fwd")
      bwd = recorder.read_step(workdir, t, "bwd")
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
