"""The opening bundle of one cell: a self-describing, versioned file that loads without pickle.

A bundle is one tensor file (aftune/tensorfile.py: safetensors inside a checksummed zstd
frame) whose metadata holds the JSON manifest: which cell, the signed commitment, the
job spec, every revealed leaf with its inclusion proof, and what each tensor is.

Tensor names:
  state/start/params/<path>, state/start/opt_state/<path>   block k at the step-block start
  state/end/params/<path>, state/end/opt_state/<path>       block k at the step-block end
  frozen/<path>                                             block k's frozen parameters
  step/<t>/batch/<field>                                    the examples of step t [B, T]
  step/<t>/<kind>[/<block>]                                 single-tensor leaves of step t
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from aftune import errors
from aftune.record import tensorfile

FORMAT = "aftune-bundle/v1"
INFERENCE_FORMAT = "aftune-inference-bundle/v1"  # aftune/inference_audit.py
_REQUIRED = {
    FORMAT: ("cell", "commitment", "job_spec", "leaves", "steps", "model_digests"),
    INFERENCE_FORMAT: ("cell", "commitment", "spec", "leaves", "model_digests"),
}
_META_KEY = "aftune_bundle"


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


def read_bundle(path: str | Path) -> Bundle:
  """Loads a bundle; a missing, truncated or bit-flipped file raises BundleError."""
  path = Path(path)
  try:
    tensors, meta = tensorfile.read_with_metadata(path)
  except tensorfile.TensorFileError as e:
    raise BundleError(str(e)) from None
  if _META_KEY not in meta:
    raise BundleError(f"{path}: not an aftune bundle (no manifest)")
  try:
    manifest = json.loads(meta[_META_KEY])
  except json.JSONDecodeError as e:
    raise BundleError(f"{path}: manifest is not valid JSON ({e})") from None
  if manifest.get("format") not in _REQUIRED:
    raise BundleError(f"{path}: format {manifest.get('format')!r}, this verifier reads "
                      f"{sorted(_REQUIRED)}")
  for field in _REQUIRED[manifest["format"]]:
    if field not in manifest:
      raise BundleError(f"{path}: manifest has no {field!r}")
  return Bundle(manifest, tensors)
