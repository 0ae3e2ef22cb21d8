"""The opening bundle of one cell: a self-describing, versioned file that loads without pickle.

A bundle is one tensor file (record/tensorfile.py: safetensors inside a checksummed zstd
frame) whose metadata holds the JSON manifest: which cell, the signed commitment, the
job spec, every revealed leaf with its inclusion proof, and what each tensor is.

Tensor names (the one schema is audit/names.py):
  state/start/params/<path>, state/start/opt_state/<path>   block k at the step-block start
  state/end/params/<path>, state/end/opt_state/<path>       block k at the step-block end
  frozen/<path>                                             block k's frozen parameters
  step/<t>/batch/<field>                                    the examples of step t [B, T]
  step/<t>/<kind>[/<block>]                                 single-tensor leaves of step t

Reading is hostile-input safe, in two phases: the manifest (in the file's header, whose
size is bounded before it is decompressed) is validated against the format's schema
below; then the caller's `schema(manifest)` gives the exact tensors the cell needs (names,
dtypes, shapes derived from the committed job spec) and the file's tensor table must
list exactly those before a byte of tensor data is decompressed. A bundle that does not
parse, lacks a field, lists a tensor the cell does not need or declares another size is a
`BundleError` (malformed input, exit 2), never a failed cell.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any
from typing import Callable
from typing import Mapping

import numpy as np

from aftune import errors
from aftune import jsonio
from aftune.record import schemas
from aftune.record import tensorfile

FORMAT = "aftune-bundle/v1"
INFERENCE_FORMAT = "aftune-inference-bundle/v1"
REQUEST_FORMAT = "aftune-request-bundle/v1"  # one row of a served batch (audit/request_provider.py)
_META_KEY = "aftune_bundle"

# name -> (dtype name, shape): what a cell's bundle must hold, exactly.
TensorSchema = Mapping[str, tuple[str, tuple[int, ...]]]

_CELL = {"type": "object", "required": ["layer_block", "step_block"],
         "properties": {"layer_block": schemas.COUNT, "step_block": schemas.COUNT},
         "additionalProperties": False}
_KIND = {"type": "string", "pattern": "^[a-z_]{1,32}$"}
LEAF = {"type": "object", "required": ["kind", "step", "block", "payload", "proof"],
        "properties": {"kind": _KIND, "step": schemas.STEP, "block": schemas.STEP,
                       "payload": {**schemas.HEX, "maxLength": 128},
                       "proof": {"type": "array", "maxItems": 64, "items": schemas.HEX32}},
        "additionalProperties": False}
_LEAVES = {"type": "array", "maxItems": 1 << 20, "items": LEAF}
DIGESTS = {"type": "array", "maxItems": 1 << 20, "items": {
    "type": "array", "prefixItems": [{"type": "array", "minItems": 1, "maxItems": 32,
                                      "items": schemas.NAME}, schemas.HEX32],
    "minItems": 2, "maxItems": 2}}
_TENSOR_ENTRY = {"type": "object", "required": ["name", "kind", "step", "block"],
                 # names.step_tensor: step/<t>/<kind>[/<block>]
                 "properties": {"name": {"type": "string",
                                         "pattern": "^step/[0-9]{1,10}/[a-z_]{1,32}(/[0-9]{1,6})?$"},
                                "kind": _KIND, "step": schemas.COUNT,
                                "block": schemas.STEP},
                 "additionalProperties": False}
_TREE_ENTRY = {"type": "object", "required": ["prefix", "kind", "step", "block"],
               # names.state: state/<start|end>/<params|opt_state>
               "properties": {"prefix": {"type": "string",
                                         "pattern": "^state/(start|end)/(params|opt_state)$"},
                              "kind": _KIND, "step": schemas.COUNT,
                              "block": schemas.COUNT},
               "additionalProperties": False}
TRAINING_MANIFEST = {
    "type": "object",
    "required": ["format", "cell", "steps", "commitment", "job_spec", "leaves", "tensors",
                 "trees", "frozen_prefix", "model_digests", "final_model_digests",
                 "example_proofs", "regenerated"],
    "properties": {
        "format": {"const": FORMAT}, "cell": _CELL,
        "steps": {"type": "array", "maxItems": 1 << 20, "items": schemas.COUNT},
        "commitment": schemas.TRAINING_COMMITMENT, "job_spec": schemas.JOB_SPEC,
        "leaves": _LEAVES,
        "tensors": {"type": "array", "maxItems": 1 << 20, "items": _TENSOR_ENTRY},
        "trees": {"type": "array", "maxItems": 64, "items": _TREE_ENTRY},
        "frozen_prefix": {"const": "frozen"},
        "model_digests": DIGESTS, "final_model_digests": DIGESTS,
        "example_proofs": {"type": "object", "propertyNames": {"pattern": "^(0|[1-9][0-9]{0,9})$"},
                           "additionalProperties": {"type": "array", "maxItems": 1 << 16, "items": {
                               "type": "array", "maxItems": 64, "items": schemas.HEX32}}},
        "regenerated": {"enum": ["", "block", "model"]},
    },
    "additionalProperties": False,
}
# What ties a served model to the end state of the training that made it: that job's
# signed commitment, the inclusion proofs of every block's final parameter leaf, and the
# base model's digests (frozen parameters are the base model's).
TRAINING_BINDING = {
    "type": "object", "required": ["commitment", "leaves", "base_model_digests"],
    "properties": {"commitment": schemas.TRAINING_COMMITMENT, "leaves": _LEAVES,
                   "base_model_digests": DIGESTS},
    "additionalProperties": False,
}
INFERENCE_MANIFEST = {
    "type": "object",
    "required": ["format", "cell", "commitment", "spec", "leaves", "model_digests"],
    "properties": {"format": {"const": INFERENCE_FORMAT}, "cell": _CELL,
                   "commitment": schemas.INFERENCE_COMMITMENT, "spec": schemas.SERVED_SPEC,
                   "leaves": _LEAVES, "model_digests": DIGESTS, "training": TRAINING_BINDING},
    "additionalProperties": False,
}
ROW_LEAF = {"type": "object", "required": ["kind", "row", "step", "block", "payload", "proof"],
            "properties": {"kind": {"enum": ["serve_spec", "request", "output", "token",
                                             "sample_key", "inf_out"]},
                           "row": schemas.STEP, "step": schemas.STEP, "block": schemas.STEP,
                           "payload": schemas.HEX32,
                           "proof": {"type": "array", "maxItems": 64, "items": schemas.HEX32}},
            "additionalProperties": False}
REQUEST_MANIFEST = {
    "type": "object",
    "required": ["format", "request_id", "row", "cell", "commitment", "spec", "leaves",
                 "model_digests"],
    "properties": {"format": {"const": REQUEST_FORMAT},
                   "request_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                   "row": schemas.COUNT, "cell": _CELL, "commitment": schemas.SERVING_COMMITMENT,
                   "spec": schemas.SERVING_SPEC,
                   "leaves": {"type": "array", "maxItems": 1 << 20, "items": ROW_LEAF},
                   "model_digests": DIGESTS, "training": TRAINING_BINDING},
    "additionalProperties": False,
}
_MANIFESTS = {FORMAT: TRAINING_MANIFEST, INFERENCE_FORMAT: INFERENCE_MANIFEST,
              REQUEST_FORMAT: REQUEST_MANIFEST}


class BundleError(errors.InputError):
  """A bundle that cannot be read or is not a bundle of this format (names the file)."""


@dataclasses.dataclass
class Bundle:
  manifest: dict[str, Any]
  tensors: dict[str, np.ndarray]

  @property
  def is_inference(self) -> bool:
    return self.manifest["format"] == INFERENCE_FORMAT

  @property
  def cell(self) -> tuple[int, int]:
    c = self.manifest["cell"]
    return int(c["layer_block"]), int(c["step_block"])


def bundle_name(layer_block: int, step_block: int) -> str:
  return f"cell_L{layer_block:03d}_S{step_block:05d}.bundle"


def write_bundle(path: Path, bundle: Bundle) -> int:
  meta = {_META_KEY: json.dumps(bundle.manifest, sort_keys=True)}
  return tensorfile.write(Path(path), bundle.tensors, metadata=meta)


def read_bundle(path: str | Path, *,
                schema: Callable[[dict[str, Any]], TensorSchema | None] | None = None) -> Bundle:
  """Loads a bundle; anything malformed raises BundleError naming the file.

  Args:
    path: the bundle file.
    schema: manifest -> the exact tensors the cell needs (names, dtypes, shapes), or
      None to read no tensors (a bundle for another job: the verifier fails it on its
      manifest alone). Without `schema` every tensor is read (the provider's own tools).

  Returns:
    The bundle.
  """
  path = Path(path)
  try:
    with tensorfile.Reader(path) as reader:
      manifest = _manifest(path, reader.metadata)
      if schema is None:
        tensors = reader.read_tensors()
      else:
        expected = schema(manifest)
        tensors = {} if expected is None else reader.read_tensors(expected)
  except tensorfile.TensorFileError as e:
    raise BundleError(str(e)) from None
  return Bundle(manifest, tensors)


def read_manifest(path: str | Path) -> dict[str, Any]:
  """The validated manifest alone (no tensor data is decompressed)."""
  path = Path(path)
  try:
    with tensorfile.Reader(path) as reader:
      return _manifest(path, reader.metadata)
  except tensorfile.TensorFileError as e:
    raise BundleError(str(e)) from None


def _manifest(path: Path, meta: Mapping[str, str]) -> dict[str, Any]:
  if _META_KEY not in meta:
    raise BundleError(f"{path}: not an aftune bundle (no manifest)")
  try:
    manifest = jsonio.strict_loads(meta[_META_KEY])
  except ValueError as e:
    raise BundleError(f"{path}: manifest is not valid JSON ({e})") from None
  fmt = manifest.get("format") if isinstance(manifest, dict) else None
  if fmt not in _MANIFESTS:
    raise BundleError(f"{path}: format {fmt!r}, this verifier reads {sorted(_MANIFESTS)}")
  return schemas.check(manifest, _MANIFESTS[fmt], f"{path} (manifest)", BundleError)
