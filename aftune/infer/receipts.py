"""Receipts: what a client keeps of one served request, and the offline check of one.

A receipt (`aftune-receipt/v1`) carries the batch's signed commitment, the request's row,
the request as the server ran it (prompt ids, limits, sampling, seed, salt), the output
it returned (tokens, finish reason), and the inclusion proofs of the row's `request` and
`output` leaves (`request_record.RowLayout`). `check_receipt` needs nothing else: the
signature, that both leaves sit at the row's indices under the signed root, and that the
row is inside the committed layout. It then says what the receipt proves: that this
provider's key signed a batch holding exactly this request and this output. Whether the
output was computed honestly is the per-request audit's job (`audit/request_verifier.py`).

Size: about 2.6 KB of JSON for a batch of 8 rows x 16 steps x 4 blocks (two proofs of 10
hashes: 1.36 KB; the signed commitment: 0.8 KB); `receipt_size` reports it (docs/serving.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aftune import jsonio
from aftune.crypto import hashing
from aftune.crypto import merkle
from aftune.crypto import signing
from aftune.infer import request_record as rr
from aftune.record import schemas

FORMAT = "aftune-receipt/v1"
MAX_RECEIPT_BYTES = 1 << 20

_HEX_LIST = {"type": "array", "items": schemas.HEX32, "maxItems": 64}
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
           "maxItems": rr.MAX_NEW_TOKENS}
SCHEMA = {
    "type": "object",
    "required": ["format", "request_id", "commitment", "row", "request", "output", "proofs"],
    "properties": {
        "format": {"const": FORMAT},
        "request_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "commitment": schemas.SERVING_COMMITMENT,
        "row": schemas.COUNT,
        "request": {
            "type": "object",
            "required": ["request_id", "prompt", "max_tokens", "temperature", "top_k", "top_p",
                         "seed", "salt", "ignore_eos"],
            "properties": {"request_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                           "prompt": {**_TOKENS, "minItems": 1, "maxItems": rr.MAX_PROMPT_TOKENS},
                           "max_tokens": {"type": "integer", "minimum": 1,
                                          "maximum": rr.MAX_NEW_TOKENS},
                           "temperature": {"type": "number", "minimum": 0},
                           "top_k": schemas.COUNT, "top_p": {"type": "number"},
                           "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
                           "salt": schemas.HEX32,
                           "ignore_eos": {"type": "boolean"}},
            "additionalProperties": False},
        "output": {"type": "object", "required": ["tokens", "finish_reason"],
                   "properties": {"tokens": _TOKENS,
                                  "finish_reason": {"enum": ["stop", "length"]}},
                   "additionalProperties": False},
        "proofs": {"type": "object", "required": ["request", "output"],
                   "properties": {"request": _HEX_LIST, "output": _HEX_LIST},
                   "additionalProperties": False},
    },
    "additionalProperties": False,
}


class ReceiptError(rr.RecordError):
  """A receipt that does not prove what it claims (names the file and the problem)."""


def make_receipt(commitment: dict, layout: rr.RowLayout, tree: merkle.MerkleTree, row: int,
                 request: rr.Request, tokens: list[int], finish_reason: str) -> dict[str, Any]:
  """The receipt of row `row` of a committed batch."""
  proof = lambda kind: [h.hex() for h in tree.inclusion_proof(layout.index(kind, row))]
  return {"format": FORMAT, "request_id": request.request_id, "commitment": commitment,
          "row": row, "request": request.to_json(),
          "output": {"tokens": [int(x) for x in tokens], "finish_reason": finish_reason},
          "proofs": {"request": proof("request"), "output": proof("output")}}


def check_receipt(receipt: Any, *, where: str = "receipt",
                  public_key: str | None = None) -> dict[str, Any]:
  """Checks a receipt offline; returns what it proves (raises ReceiptError otherwise).

  Args:
    receipt: the parsed receipt.
    where: its file name (for the error).
    public_key: hex Ed25519 key of the provider the client trusts; None: the key in the
      commitment (the verdict then says the key was not pinned).

  Returns:
    {"request_id", "batch_id", "merkle_root", "row", "tokens", "finish_reason",
     "provider_key", "key_pinned"}.
  """
  schemas.check(receipt, SCHEMA, where, ReceiptError)
  doc = receipt["commitment"]
  try:
    signing.verify_document(doc, public_key)
  except signing.SignatureError as e:
    raise ReceiptError(f"{where}: the batch commitment's signature: {e}") from None
  layout = rr.RowLayout(**doc["layout"])
  row = receipt["row"]
  if layout.num_leaves != doc["num_leaves"] or not 0 <= row < layout.rows:
    raise ReceiptError(f"{where}: row {row} is not inside the committed layout "
                       f"({layout.rows} rows, {doc['num_leaves']} leaves)")
  req, out = receipt["request"], receipt["output"]
  if req["request_id"] != receipt["request_id"]:
    raise ReceiptError(f"{where}: the receipt's request id is not the committed request's")
  if len(out["tokens"]) > min(req["max_tokens"], layout.num_steps):
    raise ReceiptError(f"{where}: {len(out['tokens'])} output tokens, more than the request's "
                       f"limit or the batch's {layout.num_steps} steps")
  root = hashing.from_hex(doc["merkle_root"])
  for kind, payload in (("request", rr.request_digest(req)),
                        ("output", rr.output_digest(req["salt"], out["tokens"], out["finish_reason"]))):
    leaf = layout.leaf_hash(kind, payload, row)
    proof = [hashing.from_hex(h) for h in receipt["proofs"][kind]]
    if not merkle.verify_inclusion(leaf, layout.index(kind, row), layout.num_leaves, proof, root):
      raise ReceiptError(f"{where}: the {kind} of row {row} is not under the signed root "
                         f"(its inclusion proof fails)")
  return {"request_id": receipt["request_id"], "batch_id": doc["batch_id"],
          "merkle_root": doc["merkle_root"], "row": row, "tokens": out["tokens"],
          "finish_reason": out["finish_reason"], "provider_key": doc["signature"]["public_key"],
          "key_pinned": public_key is not None}


def load_receipt(path: str | Path, *, public_key: str | None = None) -> tuple[dict, dict]:
  """(receipt, what it proves) of a receipt file; ReceiptError (naming it) otherwise."""
  path = Path(path)
  try:
    size = path.stat().st_size
  except FileNotFoundError:
    raise ReceiptError(f"{path}: missing") from None
  if size > MAX_RECEIPT_BYTES:
    raise ReceiptError(f"{path}: {size} bytes, more than a receipt can be ({MAX_RECEIPT_BYTES})")
  receipt = jsonio.load_json(path, ReceiptError, "receipt")
  return receipt, check_receipt(receipt, where=str(path), public_key=public_key)


def receipt_size(receipt: dict) -> int:
  """Bytes of the receipt as the server sends it (compact JSON)."""
  return len(json.dumps(receipt, separators=(",", ":")).encode())
