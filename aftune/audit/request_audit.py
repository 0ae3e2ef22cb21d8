"""A client's audit of its own served request: receipt + challenge + openings -> verdict.

Shared by `experiments.verify --receipt` (bundles in a directory) and
`experiments.serve_client audit` (bundles fetched from the server's /v1/audit/open).
The verdict names what it checked and, under `unchecked`, everything the client did not
supply (the provider key to pin, the promised training, the promised architecture).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from typing import Sequence

from aftune import jsonio
from aftune.audit import bundle as bundle_lib
from aftune.audit import core
from aftune.audit import request_verifier as rv
from aftune.infer import receipts as receipts_lib

VERDICT_FORMAT = "aftune-request-verdict/v1"


def load_challenge(path: str | Path) -> rv.RequestChallenge:
  return rv.RequestChallenge.from_json(jsonio.load_json(path, core.AuditInputError, "challenge"),
                                       str(path))


def unchecked(*, public_key: str | None, training_commitment: dict | None,
              model_config: dict | None, challenge: Any) -> list[str]:
  out = []
  if public_key is None:
    out.append("provider key: the receipt's signature was checked against the key it names, "
               "not a key the client pinned (--public_key or --training_commitment)")
  if training_commitment is None:
    out.append("promised model: the served weights were not tied to an audited training's "
               "end state (--training_commitment)")
  if model_config is None:
    out.append("promised architecture: the served model config was not compared with an "
               "agreed one (--agreed)")
  if challenge is None:
    out.append("challenge: the cells were not checked against a challenge the client drew")
  return out


def verify_request(bundle_paths: Sequence[str | Path], *, receipt_path: str | Path,
                   challenge: rv.RequestChallenge | None = None, public_key: str | None = None,
                   training_commitment: dict | None = None, model_config: dict | None = None,
                   mode: str = "exact", tolerances: dict | None = None,
                   first_pass: bool = False) -> dict[str, Any]:
  """Checks the receipt and verifies every opened cell of its request; returns the verdict.

  Raises:
    errors.InputError (exit 2): a bad receipt, challenge or bundle file.
  """
  if public_key is None and training_commitment is not None:
    public_key = training_commitment["signature"]["public_key"]  # the provider who trained it
  receipt, proved = receipts_lib.load_receipt(receipt_path, public_key=public_key)
  if challenge is not None and (challenge.request_id != receipt["request_id"] or
                                challenge.root != receipt["commitment"]["merkle_root"]):
    raise core.AuditInputError(f"the challenge is for another request or root than "
                               f"{receipt_path}")
  cells, seen = [], set()
  for path in bundle_paths:
    bundle = bundle_lib.read_bundle(path, schema=lambda m: rv.tensor_schema(m, receipt))
    if bundle.manifest["format"] != bundle_lib.REQUEST_FORMAT:
      raise core.AuditInputError(f"{path}: not the opening of a served request")
    t0 = time.perf_counter()
    rep = rv.verify_request_bundle(bundle, receipt=receipt, expected_model_hash=(
        training_commitment["final_model_hash"] if training_commitment else None),
        expected_model_config=model_config, training_commitment=training_commitment,
        challenge=challenge, mode=mode, tolerances=tolerances, first_pass=first_pass)
    seen.add(bundle.cell)
    cells.append({**rep.to_json(), "bundle": Path(path).name, "bundle_bytes": Path(path).stat().st_size,
                  "seconds": time.perf_counter() - t0})
  missing = sorted(set(challenge.cells) - seen) if challenge is not None else []
  return {"format": VERDICT_FORMAT, "passed": all(c["passed"] for c in cells) and not missing and bool(cells),
          "request_id": receipt["request_id"], "batch_id": proved["batch_id"],
          "merkle_root": proved["merkle_root"], "row": proved["row"], "mode": mode,
          "first_pass": first_pass, "provider_key": proved["provider_key"],
          "receipt_bytes": receipts_lib.receipt_size(receipt),
          "checked": ["receipt: signature, request and output leaves under the signed root",
                      "per cell: row leaves, tokens of every step = the received output, keys "
                      "from the seed, weights = the served model's digests, replay at the "
                      "committed batch shape" + (" (bitwise)" if mode == "exact" else
                                                 " (tolerance)")],
          "unchecked": unchecked(public_key=public_key, training_commitment=training_commitment,
                                 model_config=model_config, challenge=challenge),
          "missing_cells": [list(c) for c in missing], "cells": cells}


def render_markdown(verdict: dict[str, Any]) -> str:
  lines = [f"# Audit of request {verdict['request_id']}: "
           f"{'PASS' if verdict['passed'] else 'FAIL'}", "",
           f"batch {verdict['batch_id']}, row {verdict['row']}, root "
           f"{verdict['merkle_root'][:16]}…, mode {verdict['mode']}"
           f"{', first pass' if verdict['first_pass'] else ''}", "",
           "| cell (block, step) | passed | check | detail | seconds |", "|---|---|---|---|---|"]
  for c in verdict["cells"]:
    lines.append(f"| ({c['layer_block']}, {c['step_block']}) | {c['passed']} | {c['check']} | "
                 f"{c['reason'][:80]} | {c['seconds']:.2f} |")
  if verdict["missing_cells"]:
    lines += ["", f"challenged cells with no opening: {verdict['missing_cells']}"]
  if verdict["unchecked"]:
    lines += ["", "Not checked:"] + [f"- {u}" for u in verdict["unchecked"]]
  return "\n".join(lines) + "\n"


def write_verdict(verdict: dict, out: str | Path) -> Path:
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(verdict, indent=1) + "\n")
  md = out.with_suffix(".md")
  md.write_text(render_markdown(verdict))
  return md
