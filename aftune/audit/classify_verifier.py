"""The verifier of an audited classification (`infer/classify.py`): cells (block k, step 0).

The verifier of cell k holds block k's served weights only (checked against the served
model's digests, and, given the training commitment, against that trace's end state). It
runs the same compiled `block_classify` on the block's revealed input (the images, whose
hash the spec binds, for block 0; the committed output of block k-1 otherwise) and
compares the output with the committed one; for the last block it re-derives every
predicted class from the logits (argmax) and compares it with the committed predictions,
and with the response the client received.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import numpy as np

from aftune.audit import bundle as bundle_lib
from aftune.audit import challenge_doc
from aftune.audit import core
from aftune.audit import infer_verifier
from aftune.audit import names
from aftune.crypto import hashing
from aftune.infer import classify
from aftune.model import blocks as grid_lib
from aftune.model import family
from aftune.record import layout as trace


def is_classification(spec: Any) -> bool:
  return isinstance(spec, dict) and spec.get("format") == classify.SPEC_FORMAT


def verify_classification_bundle(bundle: bundle_lib.Bundle, *, commitment: dict[str, Any],
                                 expected_model_hash: str | None = None,
                                 expected_model_config: dict[str, Any] | None = None,
                                 expected_request: dict[str, Any] | None = None,
                                 training_commitment: dict[str, Any] | None = None,
                                 response: dict[str, Any] | None = None,
                                 challenge: challenge_doc.Challenge | None = None,
                                 mode: str = "exact", tolerances: dict[str, float] | None = None,
                                 check_environment: bool = True,
                                 fns: classify.ClassifyFns | None = None) -> core.CellReport:
  """Verifies one opened classification cell; the arguments are
  `infer_verifier.verify_inference_bundle`'s (expected_request: {"images_hash": hex})."""
  fns = fns or classify.default_fns()
  grid = trace.InferenceGrid.from_dict(commitment["grid"])
  m = bundle.manifest

  def authenticate(chk: core.Checks) -> None:
    leaves = _authenticate(bundle, commitment, expected_model_hash, challenge, grid, chk)
    infer_verifier.check_model_config(m["spec"], expected_model_config, chk)
    if expected_request is not None:
      chk.require(expected_request.get("images_hash") == m["spec"]["images_hash"], "spec",
                  "the committed images are not the ones the client sent")
    if training_commitment is not None:
      infer_verifier.check_training_binding(m, training_commitment, chk)
    if response is not None:
      _check_response(m["spec"], response, leaves, commitment, chk)
    if chk.mode == "exact":
      _check_programs(bundle, grid, chk, fns)

  def replay(chk: core.Checks, context) -> None:
    del context
    _replay(bundle, grid, chk, fns)

  return core.verify_cell(bundle, commitment=commitment, grid=grid, id_field="inference_id",
                          what="classified batch", spec=m["spec"], mode=mode,
                          tolerances=tolerances, check_environment=check_environment,
                          challenge=challenge, authenticate=authenticate, replay=replay)


def _authenticate(bundle, commitment, expected_model_hash, challenge, grid, chk) -> dict:
  m, (k, _) = bundle.manifest, bundle.cell
  spec = m["spec"]
  spec_id = infer_verifier.check_served_spec(bundle, commitment, expected_model_hash, challenge,
                                             "classification", chk)
  chk.require(trace.InferenceGrid.from_dict(spec["grid"]) == grid and grid.num_steps == 1, "spec",
              "the spec's grid is not the committed one-step grid")
  leaves = core.check_inclusion(m["leaves"], grid, commitment, chk)
  chk.require(leaves.get(("inf_spec", -1, -1)) == spec_id, "spec",
              "the inf_spec leaf does not carry the inference id")
  chk.require(leaves.get(("sample_key", 0, -1)) == hashing.hash_key(classify.no_sampling_key()),
              "sample_key", "the committed sampling key is not classification's fixed one", 0)
  T = bundle.tensors
  for j in ([k - 1] if k > 0 else []) + [k]:
    want, arr = leaves.get(("inf_out", 0, j)), T.get(names.infer_out(0, j))
    chk.require(want is not None and arr is not None and hashing.hash_array(arr) == want, "opening",
                f"the output of block {j} is missing or does not match its committed hash", 0)
  want, arr = leaves.get(("tokens", 0, -1)), T.get(names.infer_tokens(0))
  chk.require(want is not None and arr is not None and hashing.hash_array(arr) == want, "opening",
              "the predictions are missing or do not match their committed hash", 0)
  if k == 0:
    images = T.get(classify.IMAGES)
    chk.require(images is not None and classify.images_hash(images) == spec["images_hash"], "data",
                "the revealed images are not the committed ones (spec images_hash)", 0)
  infer_verifier.check_served_weights(m, T, k, chk)
  return leaves


def _check_response(spec, response, leaves, commitment, chk) -> None:
  chk.require(response["inference_id"] == commitment["inference_id"], "response",
              "the response is for another classified batch")
  rows = response["tokens"]
  n = int(spec["images_shape"][0])
  chk.require(len(rows) == n and all(len(r) == 1 for r in rows), "response",
              f"the response must hold one class for each of the {n} images")
  preds = np.asarray([r[0] for r in rows], np.int32)
  chk.require(hashing.hash_array(preds) == leaves[("tokens", 0, -1)], "response",
              "the classes the client received are not the committed predictions", 0)


def _block_input(bundle, k: int) -> Any:
  T = bundle.tensors
  return T[classify.IMAGES] if k == 0 else T[names.infer_out(0, k - 1)]


def _check_programs(bundle, grid, chk, fns) -> None:
  m, (k, _) = bundle.manifest, bundle.cell
  cfg = family.config_from_dict(m["spec"]["model"])
  block_spec, t_abs, f_abs = grid_lib.abstract_block(cfg, grid.units_per_block, k)
  got = classify.block_program_fingerprint(block_spec, t_abs, f_abs, _block_input(bundle, k), fns=fns)
  want = m["spec"]["program_fingerprint"]
  diff = sorted(n for n, h in got.items() if want.get(n) != h)
  chk.require(not diff, "program", f"this verifier's compiled programs differ from the committed "
              f"fingerprint in {diff} (other software)")


def _replay(bundle, grid, chk, fns) -> None:
  m, (k, _) = bundle.manifest, bundle.cell
  T = bundle.tensors
  cfg = family.config_from_dict(m["spec"]["model"])
  block_spec, t_abs, f_abs = grid_lib.abstract_block(cfg, grid.units_per_block, k)
  chk.require(block_spec.num_blocks == grid.num_layer_blocks, "spec",
              "the model config and the grid disagree on the number of layer blocks")
  params = core.unflatten(t_abs, T, names.PARAMS, chk)
  frozen = core.unflatten(f_abs, T, names.FROZEN, chk)
  y = fns.block(block_spec, params, frozen, jax.numpy.asarray(_block_input(bundle, k)))
  last = k == grid.num_layer_blocks - 1
  out = T[names.infer_out(0, k)]
  chk.compare("loss" if last else "fwd_out", y, out, hashing.hash_array(out), 0,
              "logits" if last else f"output of block {k}")
  if last:
    # Re-derive the classes: from the replayed logits (exact: they equal the committed
    # ones bitwise) or from the revealed ones (tolerance: the argmax is then exact).
    logits = y if chk.mode == "exact" else jax.numpy.asarray(out)
    want = np.asarray(fns.predict(logits))
    got = T[names.infer_tokens(0)]
    rows = [int(i) for i in np.nonzero(want != got)[0]]
    chk.require(not rows, "token", f"predicted classes {got[rows].tolist()} in rows {rows} do not "
                f"follow from the logits (argmax gives {want[rows].tolist()})", 0, rows)


def tensor_schema(manifest: dict[str, Any], commitment: dict[str, Any]) -> dict | None:
  """The exact tensors (name -> dtype, shape) of a classification cell's bundle."""
  spec = manifest["spec"]
  if hashing.hash_json(spec).hex() != commitment.get("inference_id"):
    return None
  grid = trace.InferenceGrid.from_dict(commitment["grid"])
  k, t = int(manifest["cell"]["layer_block"]), int(manifest["cell"]["step_block"])
  if not (0 <= k < grid.num_layer_blocks and t == 0 and grid.num_steps == 1):
    return None
  try:
    shapes = _shapes(commitment["inference_id"], json.dumps(spec, sort_keys=True))
  except (TypeError, ValueError, KeyError) as e:
    raise core.AuditInputError(f"the spec of classified batch {commitment['inference_id'][:16]} "
                               f"does not describe a model this verifier can build ({e})") from None
  if len(shapes["blocks"]) != grid.num_layer_blocks:
    return None
  params, frozen = shapes["blocks"][k]
  out = {f"{names.PARAMS}/{p}": v for p, v in params.items()}
  out.update({f"{names.FROZEN}/{p}": v for p, v in frozen.items()})
  for j in ([k - 1] if k > 0 else []) + [k]:
    out[names.infer_out(0, j)] = shapes["outs"][j]
  out[names.infer_tokens(0)] = shapes["tokens"]
  if k == 0:
    out[classify.IMAGES] = shapes["images"]
  return out


@functools.lru_cache(maxsize=4)
def _shapes(inference_id: str, spec_json: str) -> dict[str, Any]:
  del inference_id  # the cache key: the spec hashes to it
  spec = json.loads(spec_json)
  grid = trace.InferenceGrid.from_dict(spec["grid"])
  cfg = family.config_from_dict(spec["model"])
  shape = tuple(int(d) for d in spec["images_shape"])
  if len(shape) != 4 or shape[0] < 1:
    raise ValueError(f"images_shape {list(shape)}")
  x = jax.ShapeDtypeStruct(shape, np.uint8)
  blocks, outs = [], []
  n_blocks = grid_lib.num_layer_blocks(len(family.of(cfg).unit_names(cfg)), grid.units_per_block)
  for j in range(n_blocks):
    block_spec, t_abs, f_abs = grid_lib.abstract_block(cfg, grid.units_per_block, j)
    blocks.append((core.tree_shapes(t_abs), core.tree_shapes(f_abs)))
    x = jax.eval_shape(functools.partial(classify.block_classify, block_spec), t_abs, f_abs, x)
    outs.append(core.shape_sig(x))
  return {"blocks": blocks, "outs": outs, "tokens": ("int32", (shape[0],)),
          "images": ("uint8", shape)}
