"""The model-family contract: all that training, recording, audit and serving know of a model.

A family is a module (as big_vision takes a model module) that defines the names below.
Everything outside `aftune/model/` reaches a model only through them, so adding a family
(a ViT, a ResNet) is one new module here plus one line in `_FAMILIES`; no trainer,
recorder, verifier or sampler changes.

The model is an ordered list of *units*, each an `nnx.Module` mapping the boundary
tensor entering it to the one leaving it, `unit(x, ctx)`: the audit grid groups them
into layer blocks of B_L consecutive units.

  NAME: str                                 the family's name
  ARCHS: tuple[str, ...]                    the `arch` values of its configs
  MODALITY: str                             "text" (a tokenized dataset) | "image"
  INPUT_KEY: str                            the batch field the first unit reads
  BATCH_KEYS: tuple[str, ...]               the fields of a training batch
  batch_shapes(cfg, batch_size, hp) -> {field: (dtype, shape)}   a batch, from the job
                                            spec's hyperparameters (the verifier's schema)
  config_from_dict(d) -> cfg                inverse of `cfg.to_dict()` (cfg is hashable)
  config_from_sheet(sheet, vocab_size) -> cfg    a random-init model from a run sheet
                                            (vocab_size: text families only)
  load_pretrained(path, sheet) -> (cfg, units)   a local checkpoint (Hugging Face layout)
  unit_names(cfg) -> tuple[str, ...]        the units, in model order
  build_units(cfg, seed) -> {name: Module}  initialised units, in order
  abstract_unit(cfg, name) -> Module        shape-only (allocates nothing)
  trainable_filter(cfg) -> nnx filter       which variables train (LoRA: the adapters)
  check_trainable(cfg) -> None              raises ConfigError for an untrainable setup
  context(batch) -> ctx                     the per-batch context every unit receives
  loss(out, batch) -> scalar                the loss of the last unit's output
  prefill_unit(name, unit, x, ctx, max_len) -> (x, cache | None)   generation step 0
  decode_unit(name, unit, x, ctx, cache) -> (x, cache | None)      generation steps >= 1
  merge_lora(units) -> units                adapters folded into the weights (serving)

Optional:
  TRAIN_STATE: nnx filter                   non-parameter state a training forward updates
                                            (BatchNorm statistics; `train/step.py`)
  inference_context() -> ctx                the context of inference (image families)
  TENSOR_PARALLEL: ((path regex, axis), ...) which parameters a mesh's "tensor" axis splits,
                                            and along which axis (`train/mesh.py`)

The vision families (`vit.py`, `resnet.py`) share `vision.py`: their batch holds the
stored images and labels, and the first unit crops, flips and normalises in-graph.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from aftune import errors

# arch -> family module. A new family adds its module here.
_FAMILIES = {
    "llama": "aftune.model.llama",
    "qwen2": "aftune.model.llama",
    "qwen3": "aftune.model.llama",
    "vit": "aftune.model.vit",
    "dinov2": "aftune.model.vit",
    "resnet": "aftune.model.resnet",
}


def get(arch: str) -> types.ModuleType:
  """The family module of an architecture name (a config's `arch`)."""
  if arch not in _FAMILIES:
    raise errors.ConfigError(f"unknown model architecture {arch!r}; known: {sorted(_FAMILIES)}")
  return importlib.import_module(_FAMILIES[arch])


def of(cfg: Any) -> types.ModuleType:
  """The family module of a model config."""
  return get(cfg.arch)


def config_from_dict(d: dict[str, Any]) -> Any:
  """A model config from its committed dict (the job spec's hyperparameters.model)."""
  if not isinstance(d, dict) or not isinstance(d.get("arch"), str):
    raise errors.InputError("the model config has no 'arch' string")
  return get(d["arch"]).config_from_dict(d)
