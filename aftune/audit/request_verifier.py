"""The verifier of a per-request audit: one client checks cells of its own request.

The client holds its receipt (`infer/receipts.py`): the batch's signed commitment, its row,
its request and the output it received. A cell (layer block k, step t) of its row is
checked from the provider's opening (`request_provider.py`) with nothing of the other rows:

1. Authentication: the opening carries the receipt's commitment (and answers the
   challenge); the batch spec hashes to the committed spec id and fits the committed
   layout; every leaf is the row's own and proves its inclusion at its index; the
   request and output leaves are the receipt's; the token leaves of every step are the
   receipt's output (padding after it finished); every key follows from the request's
   seed; the revealed tensors match their leaves; block k's weights match the served
   model's digests (and the promised model, the promised training's end state and the
   promised architecture, when the client gives them); in exact mode the compiled
   programs are the committed ones.
2. Optional first pass (`first_pass`, tolerance): block k run once, teacher-forced, over
   the row's revealed inputs of steps 0..t (the prompt and the generated tokens as one
   prefill), against the revealed outputs: one call instead of t+1.
3. Replay: block k's KV cache is rebuilt with the server's own jitted `block_prefill` /
   `block_decode`, row r copied into every row of a batch of the committed size (XLA's
   per-row results depend on the batch shape, not on the other rows' values:
   `request_record`); the row's outputs must be bitwise the committed ones (exact) or
   within `core.TOLERANCES`; for the last block every token must follow from the logits,
   the key and the sampling settings, padding after a stop token or the request's limit,
   and the row must have finished by the batch's last step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aftune.audit import bundle as bundle_lib
from aftune.audit import core
from aftune.audit import infer_verifier
from aftune.audit import names
from aftune.crypto import hashing
from aftune.crypto import merkle
from aftune.infer import generate as gen_lib
from aftune.infer import request_record as rr
from aftune.infer import sampling
from aftune.infer import serving
from aftune.model import blocks as grid_lib
from aftune.model import family
from aftune.record import layout as trace
from aftune.record import schemas

# First pass thresholds (relative error, as core.rel_err), calibrated from honest
# openings: the teacher-forced prefill vs the recorded decode differs by at most
# ~2e-7 (activations) and ~3e-7 (logits) on the tiny model (docs/serving.md).
FIRST_PASS_TOLERANCES = {"fwd_out": 1e-4, "loss": 1e-4}


@dataclasses.dataclass(frozen=True)
class RequestChallenge:
  """The cells a client challenges of its own request (`experiments.challenge --receipt`)."""
  request_id: str
  root: str
  cells: tuple[tuple[int, int], ...]

  FORMAT = "aftune-request-challenge/v1"

  def to_json(self) -> dict[str, Any]:
    return {"format": self.FORMAT, "request_id": self.request_id, "merkle_root": self.root,
            "cells": [list(c) for c in self.cells]}

  @classmethod
  def from_json(cls, obj: Any, where: str = "challenge") -> "RequestChallenge":
    schemas.check(obj, CHALLENGE_SCHEMA, where, core.AuditInputError)
    return cls(obj["request_id"], obj["merkle_root"], tuple(tuple(c) for c in obj["cells"]))


CHALLENGE_SCHEMA = {
    "type": "object", "required": ["format", "request_id", "merkle_root", "cells"],
    "properties": {"format": {"const": RequestChallenge.FORMAT},
                   "request_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                   "merkle_root": schemas.HEX32,
                   "cells": {"type": "array", "minItems": 1, "maxItems": 1 << 16, "items": {
                       "type": "array", "items": schemas.COUNT, "minItems": 2, "maxItems": 2}}},
    "additionalProperties": False,
}


def draw_cells(receipt: dict, m: int, *, seed: int | None = None) -> RequestChallenge:
  """m distinct (block, step) cells of the receipt's row, uniformly at random (the client's
  own randomness: the provider learns them only when asked to open them). Steps run up to
  the row's last token."""
  lay = receipt["commitment"]["layout"]
  steps = max(1, min(len(receipt["output"]["tokens"]), lay["num_steps"]))
  cells = [(k, t) for k in range(lay["num_layer_blocks"]) for t in range(steps)]
  rng = np.random.default_rng(seed)
  pick = rng.choice(len(cells), size=min(m, len(cells)), replace=False)
  return RequestChallenge(receipt["request_id"], receipt["commitment"]["merkle_root"],
                          tuple(sorted(cells[i] for i in pick)))


SPEC_SCHEMA = schemas.SERVING_SPEC


def verify_request_bundle(bundle: bundle_lib.Bundle, *, receipt: dict[str, Any],
                          expected_model_hash: str | None = None,
                          expected_model_config: dict[str, Any] | None = None,
                          training_commitment: dict[str, Any] | None = None,
                          challenge: RequestChallenge | None = None, mode: str = "exact",
                          tolerances: dict[str, float] | None = None,
                          first_pass: bool = False, check_environment: bool = True,
                          fns: gen_lib.GenFns | None = None) -> core.CellReport:
  """Verifies one opened cell of the client's own request.

  Args:
    bundle: the provider's opening (`RequestProvider.open_cell`).
    receipt: the client's receipt, already checked (`receipts.check_receipt`).
    expected_model_hash, expected_model_config, training_commitment: what the client was
      promised (see `infer_verifier.verify_inference_bundle`); None: not checked.
    challenge: the challenge the cell answers, or None.
    mode: "exact" (bitwise) or "tolerance".
    tolerances: overrides of core.TOLERANCES.
    first_pass: run the teacher-forced tolerance pass before the replay (its error and
      time go into the report's max_rel_err as "first_pass/<kind>" and "first_pass_s").
    check_environment: in exact mode, refuse a platform other than the recorded one.
    fns: the jitted generation functions (default: the process's, the server's own).

  Returns:
    The cell's report.
  """
  fns = fns or gen_lib.default_fns()
  m = bundle.manifest
  commitment = receipt["commitment"]
  grid = trace.InferenceGrid(commitment["layout"]["num_steps"],
                             commitment["layout"]["num_layer_blocks"], 1, 1)
  spec = m["spec"]
  if m["request_id"] != receipt["request_id"] or m["row"] != receipt["row"]:
    raise core.AuditInputError(f"the opening is for request {m['request_id'][:12]} (row "
                               f"{m['row']}), the receipt for {receipt['request_id'][:12]} "
                               f"(row {receipt['row']})")
  if challenge is not None and challenge.request_id != receipt["request_id"]:
    raise core.AuditInputError("the challenge is for another request")

  def authenticate(chk: core.Checks) -> dict:
    return _authenticate(bundle, receipt, expected_model_hash, expected_model_config,
                         training_commitment, challenge, chk, fns)

  def replay(chk: core.Checks, ctx: dict) -> None:
    if first_pass:
      t0 = time.perf_counter()
      _first_pass(bundle, ctx, chk)
      chk.max_rel["first_pass_s"] = time.perf_counter() - t0
    _replay(bundle, receipt, ctx, chk, fns)

  return core.verify_cell(bundle, commitment=commitment, grid=grid, id_field="batch_spec_id",
                          what="served batch", spec=spec if isinstance(spec, dict) else {},
                          mode=mode, tolerances=tolerances, check_environment=check_environment,
                          challenge=challenge, authenticate=authenticate, replay=replay)


def _authenticate(bundle, receipt, expected_model_hash, model_config, training_commitment,
                  challenge, chk, fns) -> dict:
  m, (k, t) = bundle.manifest, bundle.cell
  commitment, row = receipt["commitment"], receipt["row"]
  req, out = receipt["request"], receipt["output"]
  core.check_commitment(bundle, commitment, challenge, chk)
  spec = m["spec"]
  chk.require(hashing.hash_json(spec).hex() == commitment["batch_spec_id"], "spec",
              "the batch spec does not hash to the committed spec id")
  try:
    schemas.check(spec, SPEC_SCHEMA, "batch spec", core.AuditInputError)
  except core.AuditInputError as e:
    chk.require(False, "spec", f"the committed batch spec is malformed ({e})")
  lay = rr.RowLayout(**commitment["layout"])
  chk.require(spec["layout"] == commitment["layout"] and spec["model_hash"] == commitment["model_hash"]
              and spec["grid"]["num_steps"] == lay.num_steps
              and spec["grid"]["num_layer_blocks"] == lay.num_layer_blocks, "spec",
              "the batch spec's layout, grid or model is not the committed one")
  chk.require(lay.num_steps <= spec["max_new_tokens"], "spec",
              f"{lay.num_steps} steps committed, the batch's limit is {spec['max_new_tokens']}")
  if expected_model_hash is not None:
    chk.require(spec["model_hash"] == expected_model_hash, "model",
                f"served model {spec['model_hash'][:16]}… is not the promised model "
                f"{expected_model_hash[:16]}…")
  infer_verifier.check_model_config(spec, model_config, chk)
  # The request as the client sent it must be the one its batch was run with.
  for key in ("temperature", "top_k", "top_p"):
    chk.require(spec["sampling"][key] == req[key], "spec",
                f"the batch was sampled with {key}={spec['sampling'][key]!r}, the request "
                f"asked for {req[key]!r}")
  chk.require(req["ignore_eos"] == (not spec["stop_tokens"]), "spec",
              f"the batch's stop tokens {spec['stop_tokens']} do not fit the request's "
              f"ignore_eos={req['ignore_eos']}")
  chk.require(req["max_tokens"] <= spec["max_new_tokens"] and len(req["prompt"]) <= spec["prompt_width"],
              "spec", "the request does not fit the committed batch shape")
  # Leaves: the row's own, each at its index under the signed root.
  root = hashing.from_hex(commitment["merkle_root"])
  leaves: dict[tuple[str, int, int], bytes] = {}
  for e in m["leaves"]:
    kind, r, s, j = e["kind"], e["row"], e["step"], e["block"]
    chk.require(kind == "serve_spec" or r == row, "inclusion",
                f"the opening reveals a leaf of row {r}, not the client's row {row}")
    try:
      index = lay.index(kind, r, s, j)
    except IndexError as err:
      chk.require(False, "inclusion", f"leaf ({kind}, step {s}, block {j}): {err}")
    payload = hashing.from_hex(e["payload"])
    proof = [hashing.from_hex(h) for h in e["proof"]]
    chk.require(merkle.verify_inclusion(lay.leaf_hash(kind, payload, r, s, j), index,
                                        lay.num_leaves, proof, root), "inclusion",
                f"leaf ({kind}, step {s}, block {j}) of row {r} is not under the signed root",
                s if s >= 0 else None)
    leaves[(kind, s, j)] = payload
  chk.require(leaves.get(("serve_spec", -1, -1)) == hashing.from_hex(commitment["batch_spec_id"]),
              "spec", "the serve_spec leaf does not carry the batch spec id")
  chk.require(leaves.get(("request", -1, -1)) == rr.request_digest(req), "request",
              "the committed request of this row is not the client's request")
  chk.require(leaves.get(("output", -1, -1)) == rr.output_digest(req["salt"], out["tokens"],
                                                               out["finish_reason"]),
              "response", "the committed output of this row is not what the client received")
  # The output the client received, token by token (padding once the row had finished).
  tokens, pad = out["tokens"], spec["pad_id"]
  for s in range(lay.num_steps):
    want = np.asarray([tokens[s] if s < len(tokens) else pad], np.int32)
    chk.require(leaves.get(("token", s, -1)) == hashing.hash_array(want), "response",
                f"step {s}: the committed token is not the one the client received "
                "(or the opening lacks it)", s)
  stop = set(spec["stop_tokens"])
  reason_ok = ((out["finish_reason"] == "stop" and bool(tokens) and tokens[-1] in stop) or
               (out["finish_reason"] == "length" and len(tokens) == req["max_tokens"]))
  chk.require(reason_ok and not stop.intersection(tokens[:-1]), "response",
              f"finish reason {out['finish_reason']!r} does not fit the {len(tokens)} tokens, "
              f"the stop tokens and max_tokens {req['max_tokens']}")
  T = bundle.tensors
  for s in range(t + 1):
    for j in ([k - 1] if k > 0 else []) + [k]:
      want, arr = leaves.get(("inf_out", s, j)), T.get(names.infer_out(s, j))
      chk.require(want is not None and arr is not None and hashing.hash_array(arr) == want,
                  "opening", f"step {s}: the output of block {j} is missing or does not match "
                  "its committed hash", s)
    arr = T.get(names.infer_tokens(s))
    chk.require(arr is not None and hashing.hash_array(arr) == leaves.get(("token", s, -1)),
                "opening", f"step {s}: the revealed token does not match its committed hash", s)
    chk.require(leaves.get(("sample_key", s, -1)) == hashing.hash_key(
        sampling.request_key(int(req["seed"]), s)), "sample_key",
                f"step {s}: the committed sampling key does not follow from the request's seed", s)
  infer_verifier.check_served_weights(m, T, k, chk)
  if training_commitment is not None:
    infer_verifier.check_training_binding(m, training_commitment, chk)
  cfg = family.config_from_dict(spec["model"])
  block_spec, t_abs, f_abs = grid_lib.abstract_block(cfg, spec["grid"]["units_per_block"], k)
  chk.require(block_spec.num_blocks == lay.num_layer_blocks, "spec",
              "the model config and the layout disagree on the number of layer blocks")
  ctx = {"block_spec": block_spec, "params": core.unflatten(t_abs, T, names.PARAMS, chk),
         "frozen": core.unflatten(f_abs, T, names.FROZEN, chk),
         "mask": rr.row_mask(len(req["prompt"]), spec["prompt_width"]),
         "ids": _row_ids(req["prompt"], spec["prompt_width"], pad)}
  if chk.mode == "exact":
    _check_programs(bundle, ctx, lay.rows, chk, fns)
  return ctx


def _row_ids(prompt, width: int, pad: int) -> np.ndarray:
  ids = np.full((1, width), pad, np.int32)
  ids[0, width - len(prompt):] = np.asarray(prompt, np.int32)
  return ids


def _check_programs(bundle, ctx, rows, chk, fns) -> None:
  """The compiled prefill/decode of block k at the committed batch shape are the committed ones."""
  m, (k, _) = bundle.manifest, bundle.cell
  spec = m["spec"]
  x0 = ctx["ids"] if k == 0 else bundle.tensors[names.infer_out(0, k - 1)]
  got = serving.block_program_fingerprint(
      ctx["block_spec"], ctx["params"], ctx["frozen"], jnp.asarray(rr.replay_rows(x0, rows)),
      rr.replay_rows(ctx["mask"], rows), int(spec["max_total_len"]), fns=fns)
  infer_verifier.check_fingerprint(got, spec["program_fingerprint"], chk)


def _replay(bundle, receipt, ctx, chk, fns) -> None:
  m, (k, t) = bundle.manifest, bundle.cell
  spec, T = m["spec"], bundle.tensors
  req = receipt["request"]
  lay = rr.RowLayout(**receipt["commitment"]["layout"])
  rows, size = lay.rows, int(spec["max_total_len"])
  mask = rr.replay_rows(ctx["mask"], rows)
  last = k == lay.num_layer_blocks - 1
  stop = np.asarray(sorted(set(spec["stop_tokens"])), np.int32)
  temperature, top_k, top_p = (spec["sampling"][x] for x in ("temperature", "top_k", "top_p"))
  done, length, cache = False, 0, None
  for s in range(t + 1):
    if k > 0:
      x_row = T[names.infer_out(s, k - 1)]
    else:  # block 0 sees the prompt, then the token of the step before
      x_row = ctx["ids"] if s == 0 else T[names.infer_tokens(s - 1)][:, None]
    x_in = jnp.asarray(rr.replay_rows(x_row, rows))
    if s == 0:
      y, cache = fns.prefill(ctx["block_spec"], ctx["params"], ctx["frozen"], x_in,
                             gen_lib.prefill_ctx(mask), size)
    else:
      y, cache = fns.decode(ctx["block_spec"], ctx["params"], ctx["frozen"], x_in, cache,
                            gen_lib.decode_ctx(mask, s, size))
    out = T[names.infer_out(s, k)]
    chk.compare("loss" if last else "fwd_out", np.asarray(y)[:1], out, hashing.hash_array(out), s,
                "logits" if last else f"output of block {k}")
    if not last:
      continue
    logits = y if chk.mode == "exact" else jnp.asarray(rr.replay_rows(out, rows))
    keys = jnp.stack([sampling.request_key(int(req["seed"]), s)] * rows)
    raw = int(np.asarray(fns.sample_rows(logits, keys, temperature, top_k, top_p))[0])
    want = int(spec["pad_id"]) if done else raw
    got = int(T[names.infer_tokens(s)][0])
    chk.require(got == want, "token", f"step {s}: emitted token {got} does not follow from the "
                f"logits and the sampling rule (expected {want})", s)
    if not done:
      length += 1
      done = bool(np.isin(got, stop)) or length >= int(req["max_tokens"])
    if s == lay.num_steps - 1:
      chk.require(done, "token", f"the batch stopped after step {s} with this request unfinished "
                  f"({length} of max_tokens {req['max_tokens']}, no stop token)", s)


# ---------------------------------------------------------------------------------
# The cheap first pass: the row's inputs of steps 0..t as one teacher-forced prefill.


def teacher_forced(spec: grid_lib.BlockSpec, params, frozen, x_in, batch_ctx):
  """Block `spec` over a whole sequence at once (every position's output; logits for all
  positions from the head): the training forward without dropout."""
  fam = family.get(spec.arch)
  ctx = {**fam.context(batch_ctx), "key": None}
  x = x_in
  for name, graphdef in zip(spec.unit_names, spec.graphdefs):
    x = nnx.merge(graphdef, params[name], frozen[name])(x, ctx)
  return x


@functools.cache
def _teacher_forced_jit():
  return jax.jit(teacher_forced, static_argnums=0)


def _first_pass(bundle, ctx, chk) -> None:
  """Tolerance check of block k's outputs at steps 0..t from one teacher-forced call."""
  m, (k, t) = bundle.manifest, bundle.cell
  T = bundle.tensors
  last = k == m["commitment"]["layout"]["num_layer_blocks"] - 1
  if k == 0:
    x0 = ctx["ids"]
    rest = [T[names.infer_tokens(s - 1)][:, None] for s in range(1, t + 1)]
  else:
    x0 = T[names.infer_out(0, k - 1)]
    rest = [T[names.infer_out(s, k - 1)] for s in range(1, t + 1)]
  width = x0.shape[1]
  x = np.concatenate([x0, *rest], axis=1)
  mask = (np.concatenate([ctx["mask"], np.ones((1, t), np.int32)], axis=1) if width > 1
          else np.ones((1, 1 + t), np.int32))
  y = np.asarray(_teacher_forced_jit()(ctx["block_spec"], ctx["params"], ctx["frozen"],
                                       jnp.asarray(x), {"attn_mask": jnp.asarray(mask)}))
  kind = "loss" if last else "fwd_out"
  for s in range(t + 1):
    out = T[names.infer_out(s, k)]
    if s == 0 and out.ndim == y.ndim and out.shape[1] == width and width > 1:
      # Only the prompt's real positions: what a padding position computes is not used.
      real = ctx["mask"][0].astype(bool)
      got, out = y[:, :width][:, real], out[:, real]
    else:
      got = y[:, width - 1 + s].reshape(out.shape)
    err = core.rel_err(got, out)
    key = f"first_pass/{kind}"
    chk.max_rel[key] = max(chk.max_rel.get(key, 0.0), err)
    chk.require(err <= FIRST_PASS_TOLERANCES[kind], "first_pass",
                f"step {s}: the teacher-forced pass differs from the revealed output of block {k} "
                f"by {err:.3g} (threshold {FIRST_PASS_TOLERANCES[kind]:.1g})", s)


def tensor_schema(manifest: dict[str, Any], receipt: dict[str, Any]) -> dict | None:
  """The exact tensors (name -> dtype, shape) of this cell's bundle, from the committed
  spec; None for another batch's manifest or a cell outside the layout."""
  spec, commitment = manifest["spec"], receipt["commitment"]
  if hashing.hash_json(spec).hex() != commitment["batch_spec_id"]:
    return None
  lay = commitment["layout"]
  k, t = int(manifest["cell"]["layer_block"]), int(manifest["cell"]["step_block"])
  if not (0 <= k < lay["num_layer_blocks"] and 0 <= t < lay["num_steps"]):
    return None
  try:
    schemas.check(spec, SPEC_SCHEMA, "batch spec", core.AuditInputError)
    shapes = _row_shapes(commitment["batch_spec_id"], json.dumps(spec, sort_keys=True))
  except (TypeError, ValueError, KeyError) as e:
    raise core.AuditInputError(f"the spec of served batch {commitment['batch_id']} does not "
                               f"describe a model this verifier can build ({e})") from None
  if len(shapes["blocks"]) != lay["num_layer_blocks"]:
    return None
  params, frozen = shapes["blocks"][k]
  out = {f"{names.PARAMS}/{p}": v for p, v in params.items()}
  out.update({f"{names.FROZEN}/{p}": v for p, v in frozen.items()})
  for s in range(t + 1):
    for j in ([k - 1] if k > 0 else []) + [k]:
      out[names.infer_out(s, j)] = shapes["prefill" if s == 0 else "decode"][j]
    out[names.infer_tokens(s)] = ("int32", (1,))
  return out


@functools.lru_cache(maxsize=4)
def _row_shapes(spec_id: str, spec_json: str) -> dict[str, Any]:
  del spec_id  # the cache key: the spec hashes to it
  spec = json.loads(spec_json)
  return infer_verifier.block_io_shapes(
      family.config_from_dict(spec["model"]), int(spec["grid"]["units_per_block"]),
      np.ones((1, int(spec["prompt_width"])), np.int32), int(spec["max_total_len"]))
