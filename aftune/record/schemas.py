"""The shapes of every JSON document a provider hands out, as JSON Schemas.

The verifier treats what a provider sends as hostile: before any field is read, a
document is validated here, so a missing proof, a cell without its layer block or a
string where a count belongs is one `InputError` naming the file and the field (exit 2
at the entry points), never a KeyError deep inside a check. Signatures, hashes and
proofs are checked afterwards by the code that uses them; a schema only fixes shapes.

Documents (formats in `commitment.py`, `history.py`, `audit/bundle.py`):
  commitment (training, inference), periodic root, history, job spec, inference spec,
  the client's response and request; the bundle manifests build on these pieces.
"""

from __future__ import annotations

import os
from typing import Any

import jsonschema

from aftune import errors

HEX32 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
HEX = {"type": "string", "pattern": "^([0-9a-f]{2})*$"}
COUNT = {"type": "integer", "minimum": 0}
POSITIVE = {"type": "integer", "minimum": 1}
STEP = {"type": "integer", "minimum": -1}  # -1: a per-job leaf (the job spec)
NAME = {"type": "string", "minLength": 1, "maxLength": 256}
SIGNATURE = {
    "type": "object",
    "required": ["alg", "public_key", "sig"],
    "properties": {"alg": {"const": "ed25519"}, "public_key": HEX32,
                   "sig": {"type": "string", "pattern": "^[0-9a-f]{128}$"}},
    "additionalProperties": False,
}
GRID = {
    "type": "object",
    "required": ["num_steps", "steps_per_block", "num_layer_blocks", "units_per_block",
                 "checkpoint_interval", "activation_interval", "num_units", "num_step_blocks",
                 "num_leaves"],
    "properties": {"num_steps": POSITIVE, "steps_per_block": POSITIVE,
                   "num_layer_blocks": POSITIVE, "units_per_block": POSITIVE,
                   "checkpoint_interval": POSITIVE, "activation_interval": POSITIVE,
                   "num_units": COUNT, "num_step_blocks": POSITIVE, "num_leaves": POSITIVE},
    "additionalProperties": False,
}
INFERENCE_GRID = {
    "type": "object",
    "required": ["num_steps", "num_layer_blocks", "units_per_block", "activation_interval",
                 "num_step_blocks", "num_leaves"],
    "properties": {"num_steps": POSITIVE, "num_layer_blocks": POSITIVE,
                   "units_per_block": POSITIVE, "activation_interval": POSITIVE,
                   "num_step_blocks": POSITIVE, "num_leaves": POSITIVE},
    "additionalProperties": False,
}
_SOURCE = {"type": "object", "additionalProperties": {"type": ["string", "null"]}}
TRAINING_COMMITMENT = {
    "type": "object",
    "required": ["format", "job_id", "merkle_root", "num_leaves", "grid", "base_model_hash",
                 "final_model_hash", "signature"],
    "properties": {"format": {"const": "aftune-commitment/v1"}, "job_id": HEX32,
                   "merkle_root": HEX32, "num_leaves": POSITIVE, "grid": GRID,
                   "base_model_hash": HEX32, "final_model_hash": HEX32, "signature": SIGNATURE},
    "additionalProperties": False,
}
INFERENCE_COMMITMENT = {
    "type": "object",
    "required": ["format", "inference_id", "job_id", "merkle_root", "num_leaves", "grid",
                 "model_hash", "source", "signature"],
    "properties": {"format": {"const": "aftune-inference-commitment/v1"}, "inference_id": HEX32,
                   "job_id": HEX32, "merkle_root": HEX32, "num_leaves": POSITIVE,
                   "grid": INFERENCE_GRID, "model_hash": HEX32, "source": _SOURCE,
                   "signature": SIGNATURE},
    "additionalProperties": False,
}
ROW_LAYOUT = {
    "type": "object", "required": ["rows", "num_steps", "num_layer_blocks"],
    "properties": {"rows": {"type": "integer", "minimum": 1, "maximum": 4096},
                   "num_steps": {"type": "integer", "minimum": 1, "maximum": 1 << 12},
                   "num_layer_blocks": {"type": "integer", "minimum": 1, "maximum": 4096}},
    "additionalProperties": False,
}
SERVING_SPEC = {  # one served batch's public spec (infer/request_record.py)
    "type": "object",
    "required": ["format", "batch_id", "model_hash", "source", "model", "grid", "layout",
                 "prompt_width", "max_total_len", "max_new_tokens", "sampling", "stop_tokens",
                 "pad_id", "program_fingerprint", "environment"],
    "properties": {
        "format": {"const": "aftune-serving-batch/v1"}, "batch_id": COUNT,
        "model_hash": HEX32, "model": {"type": "object"},
        "grid": INFERENCE_GRID, "layout": ROW_LAYOUT,
        "prompt_width": {"type": "integer", "minimum": 1, "maximum": 1 << 16},
        "max_total_len": {"type": "integer", "minimum": 1,
                          "maximum": (1 << 16) + (1 << 12)},
        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": 1 << 12},
        "sampling": {"type": "object", "required": ["temperature", "top_k", "top_p"],
                     "properties": {"temperature": {"type": "number", "minimum": 0},
                                    "top_k": COUNT, "top_p": {"type": "number"}},
                     "additionalProperties": False},
        "stop_tokens": {"type": "array", "maxItems": 64, "items": COUNT},
        "pad_id": COUNT,
        "program_fingerprint": {"type": "object", "additionalProperties": HEX32},
        "environment": {"type": "object"}},
}
SERVING_COMMITMENT = {  # one served batch of requests (infer/request_record.py)
    "type": "object",
    "required": ["format", "batch_id", "batch_spec_id", "merkle_root", "num_leaves", "layout",
                 "model_hash", "source", "signature"],
    "properties": {"format": {"const": "aftune-serving-commitment/v1"}, "batch_id": COUNT,
                   "batch_spec_id": HEX32, "merkle_root": HEX32, "num_leaves": POSITIVE,
                   "layout": ROW_LAYOUT, "model_hash": HEX32, "source": _SOURCE,
                   "signature": SIGNATURE},
    "additionalProperties": False,
}
ROOT = {
    "type": "object",
    "required": ["format", "job_id", "step", "size", "root", "signature"],
    "properties": {"format": {"const": "aftune-root/v1"}, "job_id": HEX32, "step": COUNT,
                   "size": POSITIVE, "root": HEX32, "signature": SIGNATURE},
    "additionalProperties": False,
}
HISTORY = {
    "type": "object",
    "required": ["format", "job_id", "merkle_root", "num_leaves", "roots"],
    "properties": {
        "format": {"const": "aftune-history/v1"}, "job_id": HEX32, "merkle_root": HEX32,
        "num_leaves": POSITIVE,
        "roots": {"type": "array", "maxItems": 1 << 20, "items": {
            "type": "object", "required": ["root_doc", "proof"],
            "properties": {"root_doc": ROOT,
                           "proof": {"type": "array", "maxItems": 64, "items": HEX32}},
            "additionalProperties": False}},
    },
    "additionalProperties": False,
}
_OBJECT = {"type": "object"}
JOB_SPEC = {
    "type": "object",
    "required": ["format", "base_model_hash", "tokenizer_hash", "dataset_root", "num_examples",
                 "hyperparameters", "seed", "prng_impl", "grid", "program_fingerprint",
                 "environment"],
    "properties": {
        "format": {"const": "aftune-job/v1"}, "base_model_hash": HEX32,
        "tokenizer_hash": {"type": ["string", "null"]}, "dataset_root": HEX32,
        "num_examples": POSITIVE, "seed": COUNT, "prng_impl": {"type": "string"}, "grid": GRID,
        "program_fingerprint": {"type": "object", "additionalProperties": {"type": "string"}},
        "environment": _OBJECT,
        "hyperparameters": {
            "type": "object", "required": ["batch_size", "num_steps", "model", "optimizer"],
            "properties": {"batch_size": POSITIVE, "max_len": POSITIVE, "num_steps": POSITIVE,
                           "model": {"type": "object", "required": ["arch"]},
                           "optimizer": _OBJECT},
        },
    },
    "additionalProperties": False,
}
# The fields of the job spec a client agrees to before training (train_verifier.AGREED_FIELDS).
AGREED = {
    "type": "object",
    "required": ["base_model_hash", "tokenizer_hash", "dataset_root", "num_examples",
                 "hyperparameters", "seed", "prng_impl", "grid"],
    "properties": {k: JOB_SPEC["properties"][k] for k in (
        "base_model_hash", "tokenizer_hash", "dataset_root", "num_examples", "hyperparameters",
        "seed", "prng_impl", "grid")},
    "additionalProperties": False,
}
TOKEN_ROWS = {"type": "array", "maxItems": 1 << 16,
              "items": {"type": "array", "maxItems": 1 << 20, "items": COUNT}}
SETTINGS = {
    "type": "object",
    "required": ["max_new_tokens", "temperature", "top_k", "top_p", "seed", "batch_id",
                 "stop_tokens", "pad_id", "activation_interval"],
    "properties": {"max_new_tokens": POSITIVE, "temperature": {"type": "number", "minimum": 0},
                   "top_k": COUNT, "top_p": {"type": "number", "minimum": 0, "maximum": 1},
                   "seed": COUNT, "batch_id": COUNT,
                   "stop_tokens": {"type": "array", "items": COUNT}, "pad_id": COUNT,
                   "activation_interval": POSITIVE},
    "additionalProperties": False,
}
INFERENCE_SPEC = {
    "type": "object",
    "required": ["format", "model_hash", "source", "model", "grid", "prompts", "settings",
                 "max_total_len", "program_fingerprint", "environment"],
    "properties": {
        "format": {"const": "aftune-inference/v1"}, "model_hash": HEX32, "source": _SOURCE,
        "model": {"type": "object", "required": ["arch"]}, "grid": INFERENCE_GRID,
        "prompts": {**TOKEN_ROWS, "minItems": 1}, "settings": SETTINGS,
        "max_total_len": POSITIVE,
        "program_fingerprint": {"type": "object", "additionalProperties": {"type": "string"}},
        "environment": _OBJECT,
    },
    "additionalProperties": False,
}
# A classified image batch (infer/classify.py): the one-step inference record.
CLASSIFY_SPEC = {
    "type": "object",
    "required": ["format", "model_hash", "source", "model", "grid", "images_hash", "images_shape",
                 "program_fingerprint", "environment"],
    "properties": {
        "format": {"const": "aftune-classify/v1"}, "model_hash": HEX32, "source": _SOURCE,
        "model": {"type": "object", "required": ["arch"]}, "grid": INFERENCE_GRID,
        "images_hash": HEX32,
        "images_shape": {"type": "array", "minItems": 4, "maxItems": 4,
                         "items": {"type": "integer", "minimum": 1, "maximum": 1 << 20}},
        "program_fingerprint": {"type": "object", "additionalProperties": {"type": "string"}},
        "environment": _OBJECT,
    },
    "additionalProperties": False,
}
SERVED_SPEC = {"oneOf": [INFERENCE_SPEC, CLASSIFY_SPEC]}
RESPONSE_FORMAT = "aftune-response/v1"
RESPONSE = {  # what a client keeps of a served batch (`serving.serve` writes it)
    "type": "object",
    "required": ["format", "inference_id", "merkle_root", "tokens"],
    "properties": {"format": {"const": RESPONSE_FORMAT}, "inference_id": HEX32,
                   "merkle_root": HEX32, "tokens": TOKEN_ROWS},
    "additionalProperties": False,
}
IMAGES_REQUEST = {  # what a client sent to be classified: its images, by hash
    "type": "object",
    "required": ["images_hash"],
    "properties": {"images_hash": HEX32, "images_shape": CLASSIFY_SPEC["properties"]["images_shape"]},
    "additionalProperties": False,
}
REQUEST = {  # what a client sent: the prompts and the settings it asked for
    "type": "object",
    "required": ["prompts"],
    "properties": {"prompts": {**TOKEN_ROWS, "minItems": 1},
                   "settings": {"type": "object", "properties": SETTINGS["properties"],
                                "additionalProperties": False}},
    "additionalProperties": False,
}


def check(doc: Any, schema: dict[str, Any], where: str | os.PathLike[str],
          error: type[errors.InputError] = errors.InputError) -> Any:
  """Returns `doc` if it has the shape `schema` gives, else raises `error` naming `where`
  and the first offending field (e.g. "bundle.x: leaves/3: 'proof' is a required property")."""
  validator = jsonschema.Draft202012Validator(schema)
  problem = jsonschema.exceptions.best_match(validator.iter_errors(doc))
  if problem is not None:
    field = "/".join(str(p) for p in problem.absolute_path) or "(top level)"
    message = problem.message if len(problem.message) <= 200 else problem.message[:200] + "…"
    raise error(f"{os.fspath(where)}: {field}: {message}")
  return doc
