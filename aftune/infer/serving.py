"""Auditable inference: serve a batch of prompts with recording, commit, sign.

A served batch is recorded like a training run, on a grid of token positions x layer
blocks. Leaves, in Merkle order:

  0                       inf_spec     hash of the inference spec (model hash, the batch
                                       composition and padding, sampling settings, seed,
                                       programs, environment)
  for t in 0..steps-1:    tokens       the tokens emitted at step t [B] (pad once finished)
                          sample_key   the sampling key of step t
                          inf_out[k]   the tensor leaving block k at step t (the logits
                                       [B, V] for the last block), k = 0..K-1

Block k's input at step t is inf_out[k-1] of step t, and for block 0 the prompt ids
(t = 0) or the tokens of step t-1. Output tensors are stored for every I_A-th block.

Record directory: spec.json, leaves.bin, tensors.safetensors.zst, commitment.json.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any
from typing import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from aftune import jsonio
from aftune import provenance
from aftune.crypto import hashing
from aftune.crypto import merkle
from aftune.crypto import signing
from aftune.data import encoding
from aftune.data import records as records_lib
from aftune.infer import generate as gen_lib
from aftune.model import blocks as grid_lib
from aftune.record import commitment as commitment_lib
from aftune.record import jobspec
from aftune.record import layout as trace
from aftune.record import recorder as recorder_lib
from aftune.record import schemas
from aftune.record import tensorfile
from aftune.train import checkpoint as ckpt_lib
from aftune.train import job as job_lib
from aftune.train import loop

PyTree = Any
SPEC_FORMAT = "aftune-inference/v1"


@dataclasses.dataclass
class ServedModel:
  """A model to serve: blocked parameters, their canonical hash and where they come from."""
  blocked: grid_lib.BlockedParams  # trainable holds the served (e.g. fine-tuned) values
  model_cfg: Any
  model_hash: str  # hex, jobspec.model_hash: independent of B_L
  source: dict[str, Any]  # {"job_id": ..., "final_model_hash": ...} or {"declared": ...}
  tokenizer: Any = None
  template: Any = None
  class_names: tuple[str, ...] = ()  # image models: label i is class_names[i]


def load_from_training(workdir: str | Path, *, units_per_block: int | None = None) -> ServedModel:
  """The final model of an audited training job, checked against its signed commitment."""
  workdir = Path(workdir)
  commitment = commitment_lib.load(workdir / "commitment.json",
                                   formats=(commitment_lib.TRAINING_FORMAT,))
  config = ml_collections.ConfigDict(jsonio.load_json(workdir / "config.json", trace.TraceError,
                                                      "config"))
  if units_per_block is not None:
    config.audit.units_per_block = units_per_block
  job = job_lib.build_job(config)
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", create=False)
  params, _ = loop.restore_state(ckpt, job.num_steps, job)
  ckpt.close()
  blocked = dataclasses.replace(job.blocked, trainable=params)
  h = hashing.hexdigest(jobspec.model_hash(blocked))
  if h != commitment["final_model_hash"]:
    raise ValueError(f"{workdir}: the final checkpoint hashes to {h[:16]}…, the commitment's "
                     f"final model is {commitment['final_model_hash'][:16]}…")
  return ServedModel(blocked, job.model_cfg, h, {"job_id": commitment["job_id"],
                                                 "final_model_hash": commitment["final_model_hash"]},
                     job.tokenizer, job.template, job.class_names)


def block_program_fingerprint(spec: grid_lib.BlockSpec, params: PyTree, frozen: PyTree,
                              x_in: Any, mask: np.ndarray, max_total_len: int, *,
                              fns: gen_lib.GenFns | None = None) -> dict[str, str]:
  """Hashes of one block's lowered prefill and decode programs (`fns`) for these shapes."""
  fns = fns or gen_lib.default_fns()
  params, frozen, x_in = jobspec.abstract((params, frozen, x_in))
  ctx = jobspec.abstract(gen_lib.prefill_ctx(mask))
  out = {f"block_prefill/{spec.index}": fns.prefill.lower(
      spec, params, frozen, x_in, ctx, max_total_len).as_text()}
  if max_total_len > mask.shape[1]:
    _, cache = jax.eval_shape(fns.prefill, spec, params, frozen, x_in, ctx, max_total_len)
    b = mask.shape[0]
    x1 = (jax.ShapeDtypeStruct((b, 1), np.int32) if spec.index == 0 else
          jax.ShapeDtypeStruct((b, 1) + tuple(x_in.shape[2:]), x_in.dtype))
    out[f"block_decode/{spec.index}"] = fns.decode.lower(
        spec, params, frozen, x1, cache,
        jobspec.abstract(gen_lib.decode_ctx(mask, 1, max_total_len))).as_text()
  return {k: hashing.hexdigest(hashing.hash_bytes(b"aftune/v1/program", v.encode()))
          for k, v in out.items()}


_FINGERPRINTS: dict[Any, dict[str, str]] = {}


def program_fingerprint(blocked: grid_lib.BlockedParams, ids: np.ndarray, mask: np.ndarray,
                        max_total_len: int, *, fns: gen_lib.GenFns | None = None) -> dict[str, str]:
  """Program hashes of every block for these shapes (cached: lowering is per shape, not batch)."""
  shapes = lambda tree: tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(tree))
  key = (blocked.specs, shapes(blocked.trainable), shapes(blocked.frozen), ids.shape, max_total_len)
  if key not in _FINGERPRINTS:
    fns = fns or gen_lib.default_fns()
    out, x = {}, jax.numpy.asarray(ids)
    for spec, p, f in zip(blocked.specs, blocked.trainable, blocked.frozen):
      out.update(block_program_fingerprint(spec, p, f, x, mask, max_total_len, fns=fns))
      x, _ = jax.eval_shape(fns.prefill, spec, p, f, x, gen_lib.prefill_ctx(mask), max_total_len)
    _FINGERPRINTS[key] = out
  return dict(_FINGERPRINTS[key])


class InferenceRecorder:
  """The generation observer: hashes every step's boundaries, keeps the stored ones."""

  def __init__(self, num_blocks: int, activation_interval: int):
    self.num_blocks, self.activation_interval = num_blocks, activation_interval
    self.steps: list[dict[str, Any]] = []
    self.tensors: dict[str, np.ndarray] = {}

  def __call__(self, t, block_inputs, block_outputs, logits, tokens, key):
    del block_inputs, logits  # inputs are the previous block's outputs (or tokens)
    outs, tokens = jax.device_get((list(block_outputs), tokens))
    self.steps.append({"tokens": hashing.hash_array(np.asarray(tokens, np.int32)),
                       "sample_key": hashing.hash_key(key),
                       "inf_out": [hashing.hash_array(o) for o in outs]})
    self.tensors[f"tokens/{t}"] = np.asarray(tokens, np.int32)
    for k, o in enumerate(outs):
      if k % self.activation_interval == 0:
        self.tensors[f"out/{t}/{k}"] = np.asarray(o)


@dataclasses.dataclass
class ServeSettings:
  max_new_tokens: int = 32
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  batch_id: int = 0
  stop_tokens: tuple[int, ...] = ()
  pad_id: int = 0
  activation_interval: int = 1  # I_A: store every I_A-th block's outputs


def settings_from_sheet(sheet: Any, tokenizer: Any) -> ServeSettings:
  """ServeSettings from a `configs/serve.py` run sheet; stop and pad tokens from the tokenizer."""
  return ServeSettings(
      max_new_tokens=int(sheet.max_new_tokens), temperature=float(sheet.temperature),
      top_k=int(sheet.top_k), top_p=float(sheet.top_p), seed=int(sheet.seed),
      batch_id=int(sheet.batch_id), stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id,
      activation_interval=int(sheet.activation_interval))


def serve(model: ServedModel, prompts_tokens: Sequence[Sequence[int]], settings: ServeSettings,
          out_dir: str | Path, *, key_path: str | Path, record: bool = True,
          hooks: gen_lib.ServeHooks | None = None) -> dict[str, Any]:
  """Generates for a batch of prompts and writes its signed record to out_dir.

  Args:
    model: the served model.
    prompts_tokens: token ids per prompt (the batch, in this order: it is committed).
    settings: sampling and recording settings.
    out_dir: the record directory (must not exist yet).
    key_path: the provider's Ed25519 key (created if missing).
    record: False serves without recording (the unaudited baseline).
    hooks: a dishonest server's deviations (aftune/attacks/serving.py); None: honest.

  Returns:
    {"result": GenerationResult, "commitment": the signed commitment or None}.
  """
  out_dir = Path(out_dir)
  if record and out_dir.exists():
    raise FileExistsError(f"{out_dir}: a record exists already; refusing to overwrite it")
  hooks = hooks or gen_lib.Honest()
  model = hooks.served(model)
  b = model.blocked
  rec = InferenceRecorder(b.num_blocks, settings.activation_interval) if record else None
  result = hooks.generate(
      gen_lib.generate, b.specs, b.trainable, b.frozen, prompts_tokens,
      max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
      top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed, batch_id=settings.batch_id,
      stop_tokens=settings.stop_tokens, pad_id=settings.pad_id, observer=rec, hooks=hooks)
  if not record:
    return {"result": result, "commitment": None}
  out_dir.mkdir(parents=True, exist_ok=False)  # never overwrite a record
  grid = trace.InferenceGrid(result.num_steps, b.num_blocks, len(b.specs[0].unit_names),
                       settings.activation_interval)
  spec = {
      "format": SPEC_FORMAT,
      "model_hash": model.model_hash,
      "source": model.source,
      "model": json.loads(json.dumps(model.model_cfg.to_dict())),
      "grid": grid.to_dict(),
      "prompts": [list(map(int, p)) for p in prompts_tokens],
      "settings": json.loads(json.dumps(dataclasses.asdict(settings))),
      "max_total_len": result.max_total_len,
      "program_fingerprint": program_fingerprint(b, result.prompt_ids, result.attn_mask,
                                                 result.max_total_len),
      "environment": provenance.environment_manifest(),
  }
  jsonio.write_json(out_dir / "spec.json", spec)
  inference_id = hashing.hash_json(spec)
  writer = trace.LeafWriter(out_dir / "leaves.bin", grid)
  writer.append(trace.Leaf("inf_spec", -1, -1, inference_id))
  for t, step in enumerate(rec.steps):
    writer.append(trace.Leaf("tokens", t, -1, step["tokens"]))
    writer.append(trace.Leaf("sample_key", t, -1, step["sample_key"]))
    for k, h in enumerate(step["inf_out"]):
      writer.append(trace.Leaf("inf_out", t, k, h))
  writer.close()
  tensorfile.write(out_dir / "tensors.safetensors.zst", rec.tensors)
  doc = {"format": commitment_lib.INFERENCE_FORMAT, "inference_id": inference_id.hex(),
         "job_id": inference_id.hex(),  # the challenge module binds draws to this id
         "merkle_root": writer.tree.root().hex(), "num_leaves": writer.size,
         "grid": grid.to_dict(), "model_hash": model.model_hash, "source": model.source}
  doc = signing.sign_document(doc, recorder_lib.load_or_create_key(Path(key_path)))
  jsonio.write_json(out_dir / "commitment.json", doc)
  # What the client holds afterwards: the request it sent and the response it received
  # (the inference audit checks both against the commitment: --request, --response).
  jsonio.write_json(out_dir / "request.json", {
      "prompts": spec["prompts"],
      "settings": {k: v for k, v in spec["settings"].items() if k != "activation_interval"}})
  jsonio.write_json(out_dir / "response.json", {
      "format": schemas.RESPONSE_FORMAT, "inference_id": doc["inference_id"],
      "merkle_root": doc["merkle_root"], "tokens": [list(map(int, r)) for r in result.tokens]})
  logging.info("served %d prompts, %d steps; committed root %s", len(prompts_tokens),
               result.num_steps, doc["merkle_root"][:16])
  return {"result": result, "commitment": doc}


def load_record(record_dir: str | Path) -> tuple[dict, dict, trace.InferenceGrid, list[trace.Leaf]]:
  """(commitment, spec, grid, leaves) of a served batch, checked against its signed root."""
  record_dir = Path(record_dir)
  doc = commitment_lib.load(record_dir / "commitment.json", formats=(commitment_lib.INFERENCE_FORMAT,))
  grid = trace.InferenceGrid.from_dict(doc["grid"])
  leaves = trace.read_leaves(record_dir / "leaves.bin", grid)
  if merkle.merkle_root([l.hash() for l in leaves]).hex() != doc["merkle_root"]:
    raise trace.TraceError(f"{record_dir / 'leaves.bin'}: does not hash to the committed root")
  spec = jsonio.load_json(record_dir / "spec.json", trace.TraceError, "inference spec")
  if hashing.hash_json(spec).hex() != doc["inference_id"]:
    raise trace.TraceError(f"{record_dir / 'spec.json'}: does not hash to the inference id")
  return doc, spec, grid, leaves


def read_prompts(path: str | Path, tokenizer: Any, template: Any) -> list[list[int]]:
  """Prompt token ids from a text file (one user message a line) or JSONL.

  JSONL lines hold {"prompt": text} or {"messages": [{role, content}, ...]}; each becomes
  the chat template's prompt up to and including the assistant header.
  """
  path = Path(path)
  try:
    lines = [l for l in path.read_text().splitlines() if l.strip()]
  except FileNotFoundError:
    raise records_lib.DataError(f"{path}: prompts file missing") from None
  out = []
  for i, line in enumerate(lines, 1):
    if path.suffix == ".jsonl":
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise records_lib.DataError(f"{path}:{i}: invalid JSON ({e})") from None
      if "messages" in obj:
        msgs = [records_lib.Message(m["role"], m["content"]) for m in obj["messages"]]
      elif isinstance(obj.get("prompt"), str):
        msgs = [records_lib.Message("user", obj["prompt"])]
      else:
        raise records_lib.DataError(f"{path}:{i}: needs a 'prompt' string or 'messages'")
    else:
      msgs = [records_lib.Message("user", line)]
    out.append(encoding.encode_prompt(msgs, tokenizer, template))
  if not out:
    raise records_lib.DataError(f"{path}: no prompts")
  return out
