"""The signed documents a provider hands out, and the one loader that checks them.

  commitment.json (training)   job id, Merkle root over the trace, leaf count, grid,
                               base and final model hashes; signed
  commitment.json (inference)  inference id, root, grid, served model hash; signed
  commitment.json (serving)    one batch of served requests: batch spec id, root, row
                               layout, served model hash; signed (infer/request_record.py)
  trace/roots/<t>.json         a periodic signed root of the leaves before step t

Whoever reads one (the provider reopening its workdir, the client, the verifier) goes
through `load`: strict JSON, a valid Ed25519 signature (pinned to a key if given), a
known format; anything else is a `layout.TraceError` naming the file.
"""

from __future__ import annotations

import os
from typing import Any
from typing import Sequence

from aftune import jsonio
from aftune.crypto import signing
from aftune.record import layout
from aftune.record import schemas

TRAINING_FORMAT = "aftune-commitment/v1"
INFERENCE_FORMAT = "aftune-inference-commitment/v1"
ROOT_FORMAT = "aftune-root/v1"
SERVING_FORMAT = "aftune-serving-commitment/v1"  # a batch of served requests (experiments.serve)
FORMATS = (TRAINING_FORMAT, INFERENCE_FORMAT)


def load(path: str | os.PathLike[str], *, formats: Sequence[str] = FORMATS,
         public_key: str | None = None) -> dict[str, Any]:
  """A signed document, its signature checked (and pinned to `public_key` if given).

  Args:
    path: the JSON file.
    formats: the formats accepted here.
    public_key: hex Ed25519 key the signature must be made with, or None.

  Returns:
    The document.

  Raises:
    layout.TraceError: missing, not strict JSON, badly signed, or another format.
  """
  doc = jsonio.load_json(path, layout.TraceError, "signed document")
  fmt = doc.get("format") if isinstance(doc, dict) else None
  if fmt not in formats:
    raise layout.TraceError(f"{os.fspath(path)}: format {fmt!r}, expected one of {list(formats)}")
  schemas.check(doc, _SCHEMAS[fmt], path, layout.TraceError)
  try:
    signing.verify_document(doc, public_key)
  except signing.SignatureError as e:
    raise layout.TraceError(f"{os.fspath(path)}: {e}") from None
  return doc


_SCHEMAS = {TRAINING_FORMAT: schemas.TRAINING_COMMITMENT,
            INFERENCE_FORMAT: schemas.INFERENCE_COMMITMENT, ROOT_FORMAT: schemas.ROOT,
            SERVING_FORMAT: schemas.SERVING_COMMITMENT}


def is_inference(doc: dict[str, Any]) -> bool:
  return doc.get("format") == INFERENCE_FORMAT
