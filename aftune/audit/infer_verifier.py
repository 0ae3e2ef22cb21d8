"""The verifier of an inference audit: (generation step t, layer block k) cells.

The verifier of cell (k, t) holds block k's parameters only. It rebuilds the block's KV
cache by running the same compiled `block_prefill` on the block's revealed step-0 input
and `block_decode` on its revealed inputs of steps 1..t, checking every output on the
way against the record; for the last block it also recomputes each emitted token from
the logits, the committed sampling key (which must follow from the seed) and the
sampling settings, with rows that had already stopped emitting padding.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aftune.audit import bundle as bundle_lib
from aftune.audit import challenge_doc
from aftune.audit import core
from aftune.audit import names
from aftune.crypto import hashing
from aftune.infer import generate as gen_lib
from aftune.infer import sampling
from aftune.infer import serving
from aftune.model import blocks as grid_lib
from aftune.model import family
from aftune.record import layout as trace


def verify_inference_bundle(bundle: bundle_lib.Bundle, *, commitment: dict[str, Any],
                            expected_model_hash: str | None = None,
                            expected_model_config: dict[str, Any] | None = None,
                            expected_request: dict[str, Any] | None = None,
                            training_commitment: dict[str, Any] | None = None,
                            response: dict[str, Any] | None = None,
                            challenge: challenge_doc.Challenge | None = None, mode: str = "exact",
                            tolerances: dict[str, float] | None = None,
                            check_environment: bool = True,
                            fns: gen_lib.GenFns | None = None) -> core.CellReport:
  """Verifies one opened inference cell.

  Args:
    bundle: the provider's opening of cell (layer block k, token step t).
    commitment: the client's copy of the signed inference commitment.
    expected_model_hash: the model the client was promised (the final model hash of
      the audited training job, or a declared hash); None to skip.
    expected_model_config: the promised architecture (the agreed job spec's
      hyperparameters.model): the weights alone do not fix the computation (dtype, eps,
      RoPE); None to skip.
    expected_request: what the client sent: {"prompts": [[ids]...], "settings": {...}}
      (settings: any subset of ServeSettings fields); None to skip.
    training_commitment: the signed commitment of the training the served model is promised
      to come from: the opening must then prove that the served weights are that trace's
      end state (its final parameter leaves, `core.check_final_model`); None to skip.
    response: what the client received (schemas.RESPONSE: the generated ids per prompt):
      every token must be the committed one; None to skip.
    challenge: the challenge the cell answers, or None.
    mode: "exact" (bitwise) or "tolerance".
    tolerances: overrides of core.TOLERANCES (fwd_out for activations, loss for logits).
    check_environment: in exact mode, refuse a platform other than the recorded one.
    fns: the jitted generation functions (default: the process's, the server's own).

  Returns:
    The cell's report.
  """
  m = bundle.manifest
  if _is_classification(m["spec"]):  # a classified image batch: the one-step record
    from aftune.audit import classify_verifier  # pylint: disable=g-import-not-at-top
    return classify_verifier.verify_classification_bundle(
        bundle, commitment=commitment, expected_model_hash=expected_model_hash,
        expected_model_config=expected_model_config, expected_request=expected_request,
        training_commitment=training_commitment, response=response, challenge=challenge,
        mode=mode, tolerances=tolerances, check_environment=check_environment)
  fns = fns or gen_lib.default_fns()
  grid = trace.InferenceGrid.from_dict(commitment["grid"])

  def authenticate(chk: core.Checks) -> None:
    leaves = _authenticate(bundle, commitment, expected_model_hash, challenge, grid, chk)
    _check_promises(m["spec"], expected_model_config, expected_request, chk)
    if training_commitment is not None:
      check_training_binding(m, training_commitment, chk)
    if response is not None:
      _check_response(m["spec"], response, leaves, grid, commitment, chk)
    if chk.mode == "exact":
      _check_programs(bundle, grid, chk, fns)

  def replay(chk: core.Checks, context) -> None:
    del context
    _replay(bundle, grid, chk, chk.mode, fns)

  return core.verify_cell(bundle, commitment=commitment, grid=grid, id_field="inference_id",
                          what="served batch",
                          spec=m["spec"], mode=mode, tolerances=tolerances,
                          check_environment=check_environment, challenge=challenge,
                          authenticate=authenticate, replay=replay)


def _authenticate(bundle, commitment, expected_model_hash, challenge, grid, chk) -> None:
  m, (k, t) = bundle.manifest, bundle.cell
  spec = m["spec"]
  spec_id = check_served_spec(bundle, commitment, expected_model_hash, challenge, "inference", chk)
  chk.require(trace.InferenceGrid.from_dict(spec["grid"]) == grid, "spec",
              "the inference spec's grid is not the committed grid")
  chk.require(grid.num_steps <= int(spec["settings"]["max_new_tokens"]), "spec",
              f"{grid.num_steps} generation steps committed, max_new_tokens is "
              f"{spec['settings']['max_new_tokens']}")
  leaves = core.check_inclusion(m["leaves"], grid, commitment, chk)
  # Every step's tokens: the response the client holds is checked against all of them.
  missing = [s for s in range(grid.num_steps) if ("tokens", s, -1) not in leaves]
  chk.require(not missing, "opening", f"the bundle does not reveal the committed tokens of steps "
              f"{missing}")
  chk.require(leaves.get(("inf_spec", -1, -1)) == spec_id, "spec",
              "the inf_spec leaf does not carry the inference id")
  # What the cell needs, each under its own leaf (never trust the bundle's own list).
  T = bundle.tensors
  for s in range(t + 1):
    for j in ([k - 1] if k > 0 else []) + [k]:
      want = leaves.get(("inf_out", s, j))
      arr = T.get(names.infer_out(s, j))
      chk.require(want is not None and arr is not None and hashing.hash_array(arr) == want, "opening",
                  f"step {s}: the output of block {j} is missing or does not match its committed hash", s)
    want = leaves.get(("tokens", s, -1))
    arr = T.get(names.infer_tokens(s))
    chk.require(want is not None and arr is not None and hashing.hash_array(arr) == want, "opening",
                f"step {s}: the emitted tokens are missing or do not match their committed hash", s)
    s_cfg = spec["settings"]
    key = sampling.sampling_key(int(s_cfg["seed"]), int(s_cfg["batch_id"]), s)
    chk.require(leaves.get(("sample_key", s, -1)) == hashing.hash_key(key), "sample_key",
                f"step {s}: the committed sampling key does not follow from the seed", s)
  check_served_weights(m, T, k, chk)
  return leaves


def check_served_spec(bundle, commitment, expected_model_hash, challenge, what: str, chk) -> bytes:
  """A served batch's opening is for the committed spec and model (and the promised one,
  when given); returns the spec's id. `what` names the spec in messages."""
  spec = bundle.manifest["spec"]
  core.check_commitment(bundle, commitment, challenge, chk)
  spec_id = hashing.hash_json(spec)
  chk.require(spec_id.hex() == commitment["inference_id"], "spec",
              f"the {what} spec does not hash to the committed inference id")
  chk.require(spec["model_hash"] == commitment["model_hash"], "model",
              "the spec's model is not the committed one")
  if expected_model_hash is not None:
    chk.require(spec["model_hash"] == expected_model_hash, "model",
                f"served model {spec['model_hash'][:16]}… is not the promised model "
                f"{expected_model_hash[:16]}… (another model at serving time)")
  return spec_id


def check_served_weights(m, T, k: int, chk) -> None:
  """Block k's revealed weights are the served model's (via its authenticated digests)."""
  digests = core.check_model_digests(m["model_digests"], m["spec"]["model_hash"], "served", chk)
  for prefix in (names.PARAMS, names.FROZEN):
    for comps, arr in names.under(prefix, T):
      chk.require(digests.get(comps) == hashing.hash_array(arr), "model",
                  f"parameter {'/'.join(comps)} of block {k} is not the served model's",
                  where=["/".join(comps)])


def _is_classification(spec: Any) -> bool:
  from aftune.infer import classify  # pylint: disable=g-import-not-at-top
  return isinstance(spec, dict) and spec.get("format") == classify.SPEC_FORMAT


def check_training_binding(m, training_commitment, chk) -> None:
  """The served weights are the end state of the promised training's trace."""
  binding = m.get("training")
  chk.require(binding is not None, "model", "the opening does not bind the served model to the "
              "promised training's end state (no training binding)")
  chk.require(binding["commitment"] == training_commitment, "model",
              "the opening binds the served model to another training commitment")
  chk.require(m["spec"]["model_hash"] == training_commitment["final_model_hash"], "model",
              "the served model is not the promised training's final model")
  grid = trace.Grid.from_dict(training_commitment["grid"])
  leaves = core.check_inclusion(binding["leaves"], grid, training_commitment, chk)
  base = core.check_model_digests(binding["base_model_digests"],
                                  training_commitment["base_model_hash"], "base", chk)
  core.check_final_model(m["model_digests"], base, training_commitment, leaves, m["spec"]["model"],
                         grid, chk)


def response_steps(tokens: list[list[int]], num_steps: int, pad_id: int) -> list[np.ndarray] | None:
  """The per-step token arrays [B] a response implies (rows that stopped emit padding),
  or None when a row is longer than the generation."""
  if any(len(row) > num_steps for row in tokens):
    return None
  return [np.asarray([row[s] if s < len(row) else pad_id for row in tokens], np.int32)
          for s in range(num_steps)]


def _check_response(spec, response, leaves, grid, commitment, chk) -> None:
  """Every token the client received is the committed one (all steps, not only the cell's)."""
  chk.require(response["inference_id"] == commitment["inference_id"], "response",
              "the response is for another served batch")
  tokens = response["tokens"]
  chk.require(len(tokens) == len(spec["prompts"]), "response",
              f"the response has {len(tokens)} rows, the committed batch {len(spec['prompts'])}")
  steps = response_steps(tokens, grid.num_steps, int(spec["settings"]["pad_id"]))
  chk.require(steps is not None, "response", f"a response row is longer than the "
              f"{grid.num_steps} committed generation steps")
  for s, arr in enumerate(steps):
    chk.require(hashing.hash_array(arr) == leaves[("tokens", s, -1)], "response",
                f"step {s}: the tokens the client received are not the committed ones "
                "(the response differs from what was generated and audited)", s)


def tensor_schema(manifest: dict[str, Any], commitment: dict[str, Any]) -> dict | None:
  """The exact tensors (name -> dtype, shape) of this inference cell's bundle, derived from
  the committed spec; None for another batch's manifest or a cell outside the grid."""
  spec = manifest["spec"]
  if _is_classification(spec):
    from aftune.audit import classify_verifier  # pylint: disable=g-import-not-at-top
    return classify_verifier.tensor_schema(manifest, commitment)
  if hashing.hash_json(spec).hex() != commitment.get("inference_id"):
    return None
  grid = trace.InferenceGrid.from_dict(commitment["grid"])
  k, t = int(manifest["cell"]["layer_block"]), int(manifest["cell"]["step_block"])
  if not (0 <= k < grid.num_layer_blocks and 0 <= t < grid.num_steps):
    return None
  try:
    shapes = _batch_shapes(commitment["inference_id"], json.dumps(spec, sort_keys=True))
  except (TypeError, ValueError, KeyError) as e:
    raise core.AuditInputError(f"the spec of served batch {commitment['inference_id'][:16]} does "
                               f"not describe a model this verifier can build ({e})") from None
  if len(shapes["blocks"]) != grid.num_layer_blocks:
    return None
  params, frozen = shapes["blocks"][k]
  out = {f"{names.PARAMS}/{p}": v for p, v in params.items()}
  out.update({f"{names.FROZEN}/{p}": v for p, v in frozen.items()})
  for s in range(t + 1):
    for j in ([k - 1] if k > 0 else []) + [k]:
      out[names.infer_out(s, j)] = shapes["prefill" if s == 0 else "decode"][j]
    out[names.infer_tokens(s)] = shapes["tokens"]
  return out


@functools.lru_cache(maxsize=4)
def _batch_shapes(inference_id: str, spec_json: str) -> dict[str, Any]:
  del inference_id  # the cache key: the spec hashes to it
  spec = json.loads(spec_json)
  grid = trace.InferenceGrid.from_dict(spec["grid"])
  cfg = family.config_from_dict(spec["model"])
  ids, mask = gen_lib.left_pad(spec["prompts"], int(spec["settings"]["pad_id"]))
  out = block_io_shapes(cfg, grid.units_per_block, mask, int(spec["max_total_len"]))
  return {**out, "tokens": ("int32", (int(ids.shape[0]),))}


def block_io_shapes(cfg: Any, units_per_block: int, mask_BxP: np.ndarray,
                    max_total_len: int) -> dict[str, Any]:
  """Per layer block: its (trainable, frozen) parameter shapes and the shapes of its output
  at the prefill and at a decode step, for a left-padded batch of this mask and cache length
  (what an inference bundle must hold, derived from the committed spec alone)."""
  size = int(max_total_len)
  b, p = mask_BxP.shape
  n_blocks = grid_lib.num_layer_blocks(len(family.of(cfg).unit_names(cfg)), units_per_block)
  x_p = jax.ShapeDtypeStruct((b, p), jnp.int32)
  x_d = jax.ShapeDtypeStruct((b, 1), jnp.int32)
  decode_ctx = gen_lib.decode_ctx(mask_BxP, 1, size) if p < size else None
  blocks, prefill, decode = [], [], []
  for j in range(n_blocks):
    block_spec, t_abs, f_abs = grid_lib.abstract_block(cfg, units_per_block, j)
    blocks.append((core.tree_shapes(t_abs), core.tree_shapes(f_abs)))
    x_p, cache = jax.eval_shape(lambda p, f, x, c, b=block_spec: gen_lib.block_prefill(b, p, f, x, c, size),
                                t_abs, f_abs, x_p, gen_lib.prefill_ctx(mask_BxP))
    prefill.append(core.shape_sig(x_p))
    if decode_ctx is not None:
      x_d, _ = jax.eval_shape(lambda p, f, x, c, ctx, b=block_spec: gen_lib.block_decode(b, p, f, x, c, ctx),
                              t_abs, f_abs, x_d, cache, decode_ctx)
      decode.append(core.shape_sig(x_d))
  return {"blocks": blocks, "prefill": prefill, "decode": decode}


def check_model_config(spec, model_config, chk) -> None:
  """The served architecture is the promised one (None: not checked)."""
  if model_config is None:
    return
  # Dropout is a training setting; everything else decides the served computation.
  strip = lambda d: {key: v for key, v in d.items() if key != "dropout_rate"}
  diff = sorted(key for key in set(spec["model"]) | set(model_config)
                if strip(spec["model"]).get(key) != strip(model_config).get(key))
  chk.require(not diff, "model", f"the served architecture differs from the promised one in "
              f"{diff}", where=diff)


def _check_promises(spec, model_config, request, chk) -> None:
  check_model_config(spec, model_config, chk)
  if request is not None:
    if "prompts" in request:
      chk.require([list(map(int, p)) for p in request["prompts"]] == spec["prompts"], "spec",
                  "the committed prompt batch is not the one the client sent")
    for key, want in request.get("settings", {}).items():
      got = spec["settings"].get(key)
      chk.require(got == (list(want) if isinstance(want, tuple) else want), "spec",
                  f"served with {key}={got!r}, the client asked for {want!r}")


def _check_programs(bundle, grid, chk, fns) -> None:
  """The compiled prefill/decode of this block are the committed ones (same software)."""
  m, (k, _) = bundle.manifest, bundle.cell
  spec, T = m["spec"], bundle.tensors
  cfg = family.config_from_dict(spec["model"])
  block_spec, t_abs, f_abs = grid_lib.abstract_block(cfg, grid.units_per_block, k)
  ids, mask = gen_lib.left_pad(spec["prompts"], int(spec["settings"]["pad_id"]))
  x_in = jnp.asarray(ids) if k == 0 else jnp.asarray(T[names.infer_out(0, k - 1)])
  check_fingerprint(serving.block_program_fingerprint(block_spec, t_abs, f_abs, x_in, mask,
                                                      int(spec["max_total_len"]), fns=fns),
                    spec["program_fingerprint"], chk)


def check_fingerprint(got: dict[str, str], want: dict[str, str], chk) -> None:
  """This verifier's compiled programs (`got`) are the committed ones (`want`)."""
  diff = sorted(n for n, h in got.items() if want.get(n) != h)
  chk.require(not diff, "program", f"this verifier's compiled programs differ from the committed "
              f"fingerprint in {diff} (other software)")


def _replay(bundle, grid, chk, mode, fns) -> None:
  m, (k, t) = bundle.manifest, bundle.cell
  spec, T = m["spec"], bundle.tensors
  s_cfg = spec["settings"]
  cfg = family.config_from_dict(spec["model"])
  block_spec, t_abs, f_abs = grid_lib.abstract_block(cfg, grid.units_per_block, k)
  chk.require(block_spec.num_blocks == grid.num_layer_blocks, "spec",
              "the model config and the grid disagree on the number of layer blocks")
  params = core.unflatten(t_abs, T, names.PARAMS, chk)
  frozen = core.unflatten(f_abs, T, names.FROZEN, chk)
  ids, mask = gen_lib.left_pad(spec["prompts"], int(s_cfg["pad_id"]))
  size = int(spec["max_total_len"])
  last = k == grid.num_layer_blocks - 1
  stop = np.asarray(sorted(set(int(x) for x in s_cfg["stop_tokens"])), np.int32)
  done = np.zeros(ids.shape[0], bool)
  cache = None
  for s in range(t + 1):
    if k > 0:
      x_in = jnp.asarray(T[names.infer_out(s, k - 1)])
    else:  # block 0 sees the committed prompt batch, then the tokens it emitted
      x_in = jnp.asarray(ids) if s == 0 else jnp.asarray(T[names.infer_tokens(s - 1)][:, None])
    if s == 0:
      y, cache = fns.prefill(block_spec, params, frozen, x_in, gen_lib.prefill_ctx(mask), size)
    else:
      y, cache = fns.decode(block_spec, params, frozen, x_in, cache,
                                      gen_lib.decode_ctx(mask, s, size))
    kind = "loss" if last else "fwd_out"  # threshold family: logits vs activations
    what = "logits" if last else f"output of block {k}"
    out = T[names.infer_out(s, k)]
    chk.compare(kind, y, out, hashing.hash_array(out), s, what)
    if last:
      logits = y if mode == "exact" else jnp.asarray(out)
      key = sampling.sampling_key(int(s_cfg["seed"]), int(s_cfg["batch_id"]), s)
      raw = np.asarray(fns.sample(logits, key, float(s_cfg["temperature"]), int(s_cfg["top_k"]),
                                      float(s_cfg["top_p"])))
      want = np.where(done, np.int32(s_cfg["pad_id"]), raw).astype(np.int32)
      got = T[names.infer_tokens(s)]
      rows = [int(i) for i in np.nonzero(want != got)[0]]
      chk.require(not rows, "token", f"step {s}: emitted tokens {got[rows].tolist()} in rows {rows} "
                  f"do not follow from the logits and the sampling rule (expected "
                  f"{want[rows].tolist()})", s, rows)
    done |= np.isin(T[names.infer_tokens(s)], stop)
    if last:  # the generation stops exactly when every row has finished, or at max_new_tokens
      final = s == grid.num_steps - 1
      early = [int(i) for i in np.nonzero(~done)[0]] if final else []
      chk.require(not final or s + 1 == int(s_cfg["max_new_tokens"]) or not early, "token",
                  f"the generation stopped after step {s} with rows {early} unfinished "
                  f"(max_new_tokens {s_cfg['max_new_tokens']})", s, early)
      chk.require(final or not done.all(), "token", f"every row had finished at step {s}, "
                  "yet the generation went on", s)
