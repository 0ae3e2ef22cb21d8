"""Served requests: the per-request record of one batch (what `experiments.serve` commits).

A server batches requests from many clients. Each request must be auditable by its own
client alone, without seeing the other rows, so the batch is committed row by row: every
leaf a client checks belongs to its row, and its proof is an inclusion proof in the batch's
one signed root. Leaves (`merkle.leaf_hash(kind, step, block, payload)`), in order:

  index 0                      serve_spec         the batch spec id (hash of spec.json)
  row r = 0..B-1, L = 2 + T*(2+K) leaves from index 1 + r*L:
                               r{r}/request       hash_json of the salted request
                               r{r}/output        hash_json of the salted output
    for t in 0..T-1:           r{r}/token   t     int32 [1]: the token row r emitted at step
                                                  t (pad_id once it had finished)
                               r{r}/sample_key t  `sampling.request_key(seed_r, t)`
      for k in 0..K-1:         r{r}/inf_out t, k  row r of block k's output at step t,
                                                  keeping the batch axis ([1, ...])

The salt (32 random bytes per request) keeps a short prompt's hash from being guessed by
the batch's other clients. The batch spec holds only what every row shares: the model, the
grid, the shapes (rows B, prompt width P, cache length S), the sampling group (temperature,
top-k, top-p), the stop and pad tokens, the program fingerprint and the environment.

Row r's replay is bitwise only at the committed batch shape: on XLA:CPU a row computed at
batch size 1 differs from the same row in a batch of 8 in 96 of 144 (row, block, step)
cells (rel. err. ~1e-7), while the same row in any batch of the committed shape (other
rows permuted, or replaced by copies of it) is bitwise equal. So the verifier replays row
r copied into all B rows (`replay_rows`), and needs nothing of the other rows: not their
prompts, outputs or hashes (docs/serving.md).

Batch directory (written under a temporary name, then renamed: a batch is whole or absent):
  spec.json, leaves.bin (the payloads, 32 bytes each, in leaf order), tensors.safetensors.zst
  (stored block outputs [B, ...] every I_A-th block, tokens [B] per step), commitment.json
  (signed), requests.json (private: every row's request and salt), receipts/<id>.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any
from typing import Sequence

import jax
import numpy as np

from aftune import errors
from aftune import jsonio
from aftune.crypto import hashing
from aftune.crypto import merkle
from aftune.crypto import signing
from aftune.infer import generate as gen_lib
from aftune.record import layout as trace
from aftune.record import recorder as recorder_lib
from aftune.record import tensorfile

SPEC_FORMAT = "aftune-serving-batch/v1"
COMMITMENT_FORMAT = "aftune-serving-commitment/v1"
MAX_PROMPT_TOKENS = 1 << 16
MAX_NEW_TOKENS = 1 << 12


class RecordError(errors.InputError):
  """A batch record or a receipt is missing, damaged or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Request:
  """One client's request as the server runs it (what its salted digest commits).

  Attributes:
    request_id: the server's id for it (32 hex digits, random).
    prompt: token ids (the chat template applied for chat requests).
    max_tokens: the row finishes after this many tokens (finish reason "length").
    temperature, top_k, top_p: sampling (`sampling.sample`); temperature 0 is greedy.
    seed: the request's sampling seed: step t draws with `sampling.request_key(seed, t)`.
    salt: 32 random bytes (hex) hiding the request's content in its leaf.
    ignore_eos: generate past the end-of-sequence token (the batch then has no stop
      tokens: `vLLM`'s extension of the same name).
  """
  request_id: str
  prompt: tuple[int, ...]
  max_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  salt: str = ""
  ignore_eos: bool = False

  def to_json(self) -> dict[str, Any]:
    return {"request_id": self.request_id, "prompt": list(self.prompt),
            "max_tokens": self.max_tokens, "temperature": self.temperature,
            "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed, "salt": self.salt,
            "ignore_eos": self.ignore_eos}

  @classmethod
  def from_json(cls, obj: dict[str, Any]) -> "Request":
    return cls(str(obj["request_id"]), tuple(int(x) for x in obj["prompt"]),
               int(obj["max_tokens"]), float(obj["temperature"]), int(obj["top_k"]),
               float(obj["top_p"]), int(obj["seed"]), str(obj["salt"]), bool(obj["ignore_eos"]))

  @property
  def sampling(self) -> tuple[float, int, float]:
    return (self.temperature, self.top_k, self.top_p)

  @property
  def group(self) -> tuple[float, int, float, bool]:
    """What requests batched together share: sampling settings and stopping at EOS."""
    return (*self.sampling, self.ignore_eos)


def new_request(prompt: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                ignore_eos: bool = False) -> Request:
  """A request with a fresh id and salt (and a random seed when none is given)."""
  if not prompt or len(prompt) > MAX_PROMPT_TOKENS:
    raise ValueError(f"a prompt needs 1..{MAX_PROMPT_TOKENS} tokens, got {len(prompt)}")
  if not 1 <= max_tokens <= MAX_NEW_TOKENS:
    raise ValueError(f"max_tokens must be in 1..{MAX_NEW_TOKENS}, got {max_tokens}")
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, "
                     f"top_p={top_p}")
  seed = secrets.randbelow(1 << 31) if seed is None else int(seed)
  if not 0 <= seed < (1 << 32):
    raise ValueError(f"seed must be in 0..2**32-1, got {seed}")
  return Request(secrets.token_hex(16), tuple(int(x) for x in prompt), int(max_tokens),
                 float(temperature), int(top_k), float(top_p), seed, secrets.token_hex(32),
                 bool(ignore_eos))


def filler_request(pad_id: int, like: Request) -> Request:
  """A row that only pads the batch to its shape bucket (one pad token, one step)."""
  return Request("0" * 32, (int(pad_id),), 1, *like.sampling, 0, "0" * 64, like.ignore_eos)


def request_digest(req: dict[str, Any]) -> bytes:
  """The payload of a row's request leaf: the salted request (`Request.to_json`)."""
  return hashing.hash_json({"kind": "aftune-request/v1", **req})


def output_digest(salt: str, tokens: Sequence[int], finish_reason: str) -> bytes:
  """The payload of a row's output leaf: what the client received, salted."""
  return hashing.hash_json({"kind": "aftune-output/v1", "salt": salt,
                            "tokens": [int(x) for x in tokens], "finish_reason": finish_reason})


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """Where each leaf of a batch sits: B rows of L = 2 + T*(2+K) leaves after the spec."""
  rows: int
  num_steps: int
  num_layer_blocks: int

  @property
  def per_row(self) -> int:
    return 2 + self.num_steps * (2 + self.num_layer_blocks)

  @property
  def num_leaves(self) -> int:
    return 1 + self.rows * self.per_row

  def index(self, kind: str, row: int = -1, step: int = -1, block: int = -1) -> int:
    """The leaf index of (kind, row, step, block); kinds as in the module docstring."""
    if kind == "serve_spec":
      return 0
    if not 0 <= row < self.rows:
      raise IndexError(f"row {row} outside 0..{self.rows - 1}")
    base = 1 + row * self.per_row
    if kind == "request":
      return base
    if kind == "output":
      return base + 1
    if not 0 <= step < self.num_steps:
      raise IndexError(f"step {step} outside 0..{self.num_steps - 1}")
    at = base + 2 + step * (2 + self.num_layer_blocks)
    if kind == "token":
      return at
    if kind == "sample_key":
      return at + 1
    if kind == "inf_out" and 0 <= block < self.num_layer_blocks:
      return at + 2 + block
    raise IndexError(f"no leaf ({kind}, row {row}, step {step}, block {block})")

  def leaf_hash(self, kind: str, payload: bytes, row: int = -1, step: int = -1,
                block: int = -1) -> bytes:
    """The Merkle leaf hash of that leaf (the row is part of the kind: `r{row}/{kind}`)."""
    name = kind if kind == "serve_spec" else f"r{row}/{kind}"
    return merkle.leaf_hash(name, step, block, payload)

  def all_leaves(self) -> list[tuple[str, int, int, int]]:
    """(kind, row, step, block) of every leaf, in Merkle order."""
    out = [("serve_spec", -1, -1, -1)]
    for r in range(self.rows):
      out += [("request", r, -1, -1), ("output", r, -1, -1)]
      for t in range(self.num_steps):
        out += [("token", r, t, -1), ("sample_key", r, t, -1)]
        out += [("inf_out", r, t, k) for k in range(self.num_layer_blocks)]
    return out

  def to_dict(self) -> dict[str, int]:
    return {"rows": self.rows, "num_steps": self.num_steps,
            "num_layer_blocks": self.num_layer_blocks}


class RowRecorder:
  """The generation observer: keeps every step's token, key and block outputs on the host;
  `digest()` then hashes them row by row (on the engine's writer thread, overlapping the
  next batch); the stored outputs (every I_A-th block) are kept whole ([B, ...])."""

  def __init__(self, activation_interval: int):
    self.activation_interval = activation_interval
    self.raw: list[tuple[list[np.ndarray], np.ndarray, Any]] = []
    self.tensors: dict[str, np.ndarray] = {}
    self._steps: list[dict[str, Any]] | None = None

  def __call__(self, t, block_inputs, block_outputs, logits, tokens, keys):
    del block_inputs, logits
    outs, tokens = jax.device_get((list(block_outputs), tokens))
    outs = [np.asarray(o) for o in outs]
    tokens = np.asarray(tokens, np.int32)
    self.raw.append((outs, tokens, keys))
    self.tensors[f"tokens/{t}"] = tokens
    for k, o in enumerate(outs):
      if k % self.activation_interval == 0:
        self.tensors[f"out/{t}/{k}"] = o

  @property
  def steps(self) -> list[dict[str, Any]]:
    """Per step: the row digests of the token, the key and every block's output."""
    if self._steps is None:
      self._steps = []
      for outs, tokens, keys in self.raw:
        per_block = [hashing.hash_rows(o) for o in outs]  # [K][B]
        self._steps.append({
            "token": hashing.hash_rows(tokens), "sample_key": hashing.hash_key_rows(keys),
            "inf_out": [[per_block[k][r] for k in range(len(outs))]
                        for r in range(tokens.shape[0])]})
    return self._steps


def row_payloads(layout: RowLayout, spec_id: bytes, requests: Sequence[Request],
                 outputs: Sequence[tuple[list[int], str]], rec: RowRecorder) -> list[bytes]:
  """Every leaf's payload in Merkle order."""
  out = [spec_id]
  for r, req in enumerate(requests):
    out += [request_digest(req.to_json()), output_digest(req.salt, *outputs[r])]
    for step in rec.steps:
      out += [step["token"][r], step["sample_key"][r], *step["inf_out"][r]]
  if len(out) != layout.num_leaves:
    raise AssertionError(f"{len(out)} payloads for a layout of {layout.num_leaves} leaves")
  return out


def leaf_hashes(layout: RowLayout, payloads: Sequence[bytes]) -> list[bytes]:
  return [layout.leaf_hash(kind, p, row, step, block)
          for (kind, row, step, block), p in zip(layout.all_leaves(), payloads)]


def write_batch(batches_dir: Path, batch_id: int, *, model: Any, requests: Sequence[Request],
                result: gen_lib.GenerationResult, rec: RowRecorder, sampling_group: dict,
                stop_tokens: Sequence[int], pad_id: int, activation_interval: int,
                environment: dict, key: Any, fillers: int = 0,
                program_fingerprint: dict | None = None) -> tuple[Path, dict, list[dict]]:
  """Writes batch `batch_id`'s record and its receipts; returns (dir, commitment, receipts).

  The directory appears whole (written as `.tmp-*`, then renamed); an existing batch is
  never overwritten. `fillers`: the last rows are shape padding (no receipt).
  `program_fingerprint`: the batch's (computed here when None).
  """
  from aftune.infer import receipts as receipts_lib  # pylint: disable=g-import-not-at-top
  from aftune.infer import serving  # pylint: disable=g-import-not-at-top
  final = batches_dir / batch_name(batch_id)
  if final.exists():
    raise FileExistsError(f"{final}: a batch record exists already; refusing to overwrite it")
  b = model.blocked
  layout = RowLayout(len(requests), result.num_steps, b.num_blocks)
  grid = trace.InferenceGrid(result.num_steps, b.num_blocks, len(b.specs[0].unit_names),
                             activation_interval)
  spec = {
      "format": SPEC_FORMAT, "batch_id": batch_id,
      "model_hash": model.model_hash, "source": model.source,
      "model": json.loads(json.dumps(model.model_cfg.to_dict())),
      "grid": grid.to_dict(), "layout": layout.to_dict(),
      "prompt_width": int(result.prompt_ids.shape[1]), "max_total_len": result.max_total_len,
      "max_new_tokens": max(r.max_tokens for r in requests),
      "sampling": sampling_group, "stop_tokens": [int(x) for x in stop_tokens], "pad_id": int(pad_id),
      "program_fingerprint": program_fingerprint or serving.program_fingerprint(
          b, result.prompt_ids, result.attn_mask, result.max_total_len),
      "environment": environment,
  }
  spec_id = hashing.hash_json(spec)
  outputs = [(list(map(int, result.tokens[r])), result.finish_reasons[r]) for r in range(len(requests))]
  payloads = row_payloads(layout, spec_id, requests, outputs, rec)
  tree = merkle.MerkleTree(leaf_hashes(layout, payloads))
  doc = {"format": COMMITMENT_FORMAT, "batch_id": batch_id, "batch_spec_id": spec_id.hex(),
         "merkle_root": tree.root().hex(), "num_leaves": layout.num_leaves,
         "layout": layout.to_dict(), "model_hash": model.model_hash, "source": model.source}
  doc = signing.sign_document(doc, key)
  tmp = batches_dir / f".tmp-{batch_name(batch_id)}"
  if tmp.exists():
    shutil.rmtree(tmp)  # a batch the server did not finish writing (killed): never issued
  (tmp / "receipts").mkdir(parents=True)
  jsonio.write_json(tmp / "spec.json", spec)
  (tmp / "leaves.bin").write_bytes(b"".join(payloads))
  tensorfile.write(tmp / "tensors.safetensors.zst", rec.tensors)
  jsonio.write_json(tmp / "commitment.json", doc)
  jsonio.write_json(tmp / "requests.json", {"requests": [r.to_json() for r in requests],
                                            "fillers": fillers})
  receipts = []
  for r in range(len(requests) - fillers):
    receipt = receipts_lib.make_receipt(doc, layout, tree, r, requests[r], *outputs[r])
    jsonio.write_json(tmp / "receipts" / f"{requests[r].request_id}.json", receipt)
    receipts.append(receipt)
  _fsync_dir(tmp)
  os.rename(tmp, final)
  return final, doc, receipts


def _fsync_dir(path: Path) -> None:
  for p in [*path.rglob("*"), path]:
    fd = os.open(p, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def batch_name(batch_id: int) -> str:
  return f"{batch_id:08d}"


def is_request_id(text: Any) -> bool:
  """32 lowercase hex digits: safe to put in a file name."""
  return isinstance(text, str) and len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def receipt_index(batches_dir: str | Path) -> dict[str, Path]:
  """request id -> its receipt file, over every finished batch under `batches_dir`."""
  return {p.stem: p for p in Path(batches_dir).glob("[0-9]*/receipts/*.json")
          if is_request_id(p.stem)}


@dataclasses.dataclass
class BatchRecord:
  """A batch as its provider holds it (checked against its signed root when loaded)."""
  dir: Path
  commitment: dict
  spec: dict
  layout: RowLayout
  grid: trace.InferenceGrid
  payloads: list[bytes]
  tree: merkle.MerkleTree
  requests: list[Request]

  def payload(self, kind: str, row: int = -1, step: int = -1, block: int = -1) -> bytes:
    return self.payloads[self.layout.index(kind, row, step, block)]

  def leaf_entry(self, kind: str, row: int = -1, step: int = -1, block: int = -1) -> dict:
    """A revealed leaf: (kind, row, step, block), payload and inclusion proof."""
    i = self.layout.index(kind, row, step, block)
    return {"kind": kind, "row": row, "step": step, "block": block,
            "payload": self.payloads[i].hex(),
            "proof": [h.hex() for h in self.tree.inclusion_proof(i)]}


def load_batch(batch_dir: str | Path, *, public_key: str | None = None) -> BatchRecord:
  """A batch record, every leaf checked against the signed root (RecordError otherwise)."""
  from aftune.record import commitment as commitment_lib  # pylint: disable=g-import-not-at-top
  batch_dir = Path(batch_dir)
  try:
    doc = commitment_lib.load(batch_dir / "commitment.json", formats=(COMMITMENT_FORMAT,),
                              public_key=public_key)
  except trace.TraceError as e:
    raise RecordError(str(e)) from None
  layout = RowLayout(**doc["layout"])
  if layout.num_leaves != doc["num_leaves"]:
    raise RecordError(f"{batch_dir / 'commitment.json'}: {doc['num_leaves']} leaves committed, "
                      f"the layout has {layout.num_leaves}")
  raw = _read_bounded(batch_dir / "leaves.bin", 32 * layout.num_leaves)
  if len(raw) != 32 * layout.num_leaves:
    raise RecordError(f"{batch_dir / 'leaves.bin'}: {len(raw)} bytes, expected "
                      f"{32 * layout.num_leaves} (truncated or padded)")
  payloads = [raw[i:i + 32] for i in range(0, len(raw), 32)]
  tree = merkle.MerkleTree(leaf_hashes(layout, payloads))
  if tree.root().hex() != doc["merkle_root"]:
    raise RecordError(f"{batch_dir / 'leaves.bin'}: does not hash to the committed root")
  spec = jsonio.load_json(batch_dir / "spec.json", RecordError, "batch spec")
  if hashing.hash_json(spec).hex() != doc["batch_spec_id"] or payloads[0].hex() != doc["batch_spec_id"]:
    raise RecordError(f"{batch_dir / 'spec.json'}: does not hash to the committed batch spec id")
  reqs = jsonio.load_json(batch_dir / "requests.json", RecordError, "batch requests")
  try:
    requests = [Request.from_json(r) for r in reqs["requests"]]
  except (KeyError, TypeError, ValueError) as e:
    raise RecordError(f"{batch_dir / 'requests.json'}: malformed ({e})") from None
  if len(requests) != layout.rows or any(
      request_digest(r.to_json()) != payloads[layout.index("request", i)] for i, r in enumerate(requests)):
    raise RecordError(f"{batch_dir / 'requests.json'}: does not match the committed requests")
  return BatchRecord(batch_dir, doc, spec, layout, trace.InferenceGrid.from_dict(spec["grid"]),
                     payloads, tree, requests)


def _read_bounded(path: Path, limit: int) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read(limit + 1)
  except FileNotFoundError:
    raise RecordError(f"{path}: missing") from None


def replay_rows(row_BxX: np.ndarray, rows: int) -> np.ndarray:
  """Row r's tensor [1, ...] copied into every row of a batch of the committed size."""
  return np.repeat(np.asarray(row_BxX), rows, axis=0)


def row_mask(prompt_len: int, width: int) -> np.ndarray:
  """The attention mask [1, P] of a prompt of `prompt_len` tokens left-padded to P."""
  mask = np.zeros((1, width), np.int32)
  mask[0, width - prompt_len:] = 1
  return mask


def new_key(path: Path):
  return recorder_lib.load_or_create_key(path)
