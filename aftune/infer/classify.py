"""Audited image classification: serve a batch of images with recording, commit, sign.

A classified batch is the one-step case of the inference record (`serving.py`): the
same commitment format, leaf layout (`layout.InferenceGrid` with one step) and cells
(layer block k, step 0), so `experiments.challenge/open/verify` treat it like a generated
batch. Leaves, in Merkle order:

  0          inf_spec     hash of the classification spec (model hash, the images' hash
                          and shape, programs, environment)
  step 0:    tokens       the predicted class of every image [B] (argmax of the logits)
             sample_key   the hash of NO_SAMPLING_KEY: classification draws nothing
             inf_out[k]   the tensor leaving block k (the logits [B, C] for the last)

Block 0's input is the stored images (uint8 [B, S, S, 3], after the host-side resize of
`data/images.py`), which the spec binds by hash; the units run in inference mode (central
crop, BatchNorm running statistics). Record directory: spec.json, leaves.bin,
tensors.safetensors.zst (the images and every I_A-th block's output), commitment.json,
request.json (the images' hash: what the client sent) and response.json (the predicted
classes it received).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from aftune import errors
from aftune import jsonio
from aftune import provenance
from aftune.crypto import hashing
from aftune.crypto import signing
from aftune.data import images as images_lib
from aftune.infer import serving
from aftune.model import blocks as grid_lib
from aftune.model import family
from aftune.record import commitment as commitment_lib
from aftune.record import jobspec
from aftune.record import layout as trace
from aftune.record import recorder as recorder_lib
from aftune.record import schemas
from aftune.record import tensorfile

PyTree = Any
SPEC_FORMAT = "aftune-classify/v1"
IMAGES = "images"  # the tensor name of the classified images in a record and a bundle


def no_sampling_key() -> jax.Array:
  """The key committed as every classification's sample_key (nothing is drawn)."""
  return jax.random.key(0)


# ---- the pure functions, jitted once -----------------------------------------------------


def block_classify(spec: grid_lib.BlockSpec, params: PyTree, frozen: PyTree,
                   x_in: jax.Array) -> jax.Array:
  """One layer block in inference mode: its output boundary (logits [B, C] for the last)."""
  fam = family.get(spec.arch)
  ctx = fam.inference_context()
  x = x_in
  for name, graphdef in zip(spec.unit_names, spec.graphdefs):
    x = nnx.merge(graphdef, params[name], frozen[name])(x, ctx)
  return x


def predict(logits_BxC: jax.Array) -> jax.Array:
  """The predicted classes int32 [B]: argmax, ties to the lowest class (as numpy)."""
  return jnp.argmax(logits_BxC, axis=-1).astype(jnp.int32)


class ClassifyFns:
  """The jitted functions the server, the provider's regeneration and the verifier share."""

  def __init__(self):
    self.block = jax.jit(block_classify, static_argnums=0)
    self.predict = jax.jit(predict)


@functools.cache
def default_fns() -> ClassifyFns:
  return ClassifyFns()


def run_blocks(blocked: grid_lib.BlockedParams, images: np.ndarray, *,
               fns: ClassifyFns | None = None, hooks: Any = None) -> tuple[list[jax.Array], jax.Array]:
  """(every block's output, the predictions) for a batch of stored images."""
  fns = fns or default_fns()
  x, outs = jnp.asarray(images), []
  for k, (spec, p, f) in enumerate(zip(blocked.specs, blocked.trainable, blocked.frozen)):
    x = fns.block(spec, p, f, x)
    if hooks is not None:
      x = hooks.block_out(k, x)
    outs.append(x)
  return outs, fns.predict(outs[-1])


def program_fingerprint(blocked: grid_lib.BlockedParams, images_shape: Sequence[int], *,
                        fns: ClassifyFns | None = None) -> dict[str, str]:
  """Hashes of every block's lowered classification program for these shapes."""
  fns = fns or default_fns()
  out = {}
  x = jax.ShapeDtypeStruct(tuple(images_shape), np.uint8)
  for spec, p, f in zip(blocked.specs, blocked.trainable, blocked.frozen):
    out.update(block_program_fingerprint(spec, p, f, x, fns=fns))
    x = jax.eval_shape(fns.block, spec, p, f, x)
  return out


def block_program_fingerprint(spec: grid_lib.BlockSpec, params: PyTree, frozen: PyTree, x_in: Any,
                              *, fns: ClassifyFns | None = None) -> dict[str, str]:
  fns = fns or default_fns()
  params, frozen, x_in = jobspec.abstract((params, frozen, x_in))
  text = fns.block.lower(spec, params, frozen, x_in).as_text()
  return {f"block_classify/{spec.index}": hashing.hexdigest(
      hashing.hash_bytes(b"aftune/v1/program", text.encode()))}


# ---- the images a client sends -------------------------------------------------------------


def load_images(paths: Sequence[str | Path], pre: images_lib.Preprocess) -> np.ndarray:
  """The stored form (uint8 [B, S, S, 3]) of image files, as the server prepares them; a
  client computes the same array (and so `images_hash`) from its own files."""
  if not paths:
    raise errors.InputError("no images to classify")
  out = []
  for p in paths:
    p = Path(p)
    try:
      data = p.read_bytes()
    except OSError as e:
      raise errors.InputError(f"{p}: cannot read ({e.strerror})") from None
    out.append(images_lib.preprocess_image(images_lib.decode_image(data, str(p)), pre))
  return np.stack(out)


def image_files(path: str | Path) -> list[Path]:
  """A directory's image files (sorted by name), or the one file given."""
  path = Path(path)
  if path.is_dir():
    files = sorted(p for p in path.iterdir()
                   if p.suffix.lower() in images_lib.IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
      raise errors.InputError(f"{path}: no .png/.jpg/.jpeg images")
    return files
  if not path.exists():
    raise errors.InputError(f"{path}: no such file or directory")
  return [path]


def images_hash(images: np.ndarray) -> str:
  return hashing.hexdigest(hashing.hash_array(np.asarray(images, np.uint8)))


# ---- serving ------------------------------------------------------------------------------


class Honest:
  """A classification server's hooks (the identity; attacks override them)."""

  def served(self, model: serving.ServedModel) -> serving.ServedModel:
    return model

  def block_out(self, k: int, x: jax.Array) -> jax.Array:
    return x

  def predictions(self, preds: np.ndarray) -> np.ndarray:
    return preds


def check_images(model_cfg: Any, images: np.ndarray, source: str = "images") -> np.ndarray:
  s = model_cfg.image.stored_size
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
    raise errors.InputError(f"{source}: expected uint8 [B, {s}, {s}, 3] stored images, got "
                            f"{images.dtype} {list(images.shape)}")
  return images


def serve_images(model: serving.ServedModel, images: np.ndarray, out_dir: str | Path, *,
                 key_path: str | Path, activation_interval: int = 1, record: bool = True,
                 hooks: Honest | None = None, fns: ClassifyFns | None = None) -> dict[str, Any]:
  """Classifies a batch of stored images and writes its signed record to out_dir.

  Args:
    model: the served model (an image family).
    images: uint8 [B, S, S, 3], as `load_images` prepares them (the batch, in this order).
    out_dir: the record directory (must not exist yet).
    key_path: the provider's Ed25519 key (created if missing).
    activation_interval: I_A, store every I_A-th block's output.
    record: False classifies without recording (the unaudited baseline).
    hooks: a dishonest server's deviations; None: honest.
    fns: the jitted functions (default: the process's).

  Returns:
    {"predictions": int32 [B], "commitment": the signed commitment or None}.
  """
  out_dir = Path(out_dir)
  if family.of(model.model_cfg).MODALITY != "image":
    raise errors.ConfigError(f"{model.model_cfg.arch} is not an image model")
  images = check_images(model.model_cfg, images)
  if record and out_dir.exists():
    raise FileExistsError(f"{out_dir}: a record exists already; refusing to overwrite it")
  hooks = hooks or Honest()
  model = hooks.served(model)
  b = model.blocked
  outs, preds = run_blocks(b, images, fns=fns, hooks=hooks)
  outs, preds = jax.device_get((outs, preds))
  preds = np.asarray(hooks.predictions(np.asarray(preds, np.int32)), np.int32)
  if not record:
    return {"predictions": preds, "commitment": None}
  out_dir.mkdir(parents=True, exist_ok=False)  # never overwrite a record
  grid = trace.InferenceGrid(1, b.num_blocks, len(b.specs[0].unit_names), activation_interval)
  spec = {
      "format": SPEC_FORMAT,
      "model_hash": model.model_hash,
      "source": model.source,
      "model": json.loads(json.dumps(model.model_cfg.to_dict())),
      "grid": grid.to_dict(),
      "images_hash": images_hash(images),
      "images_shape": list(images.shape),
      "program_fingerprint": program_fingerprint(b, images.shape, fns=fns),
      "environment": provenance.environment_manifest(),
  }
  jsonio.write_json(out_dir / "spec.json", spec)
  inference_id = hashing.hash_json(spec)
  writer = trace.LeafWriter(out_dir / "leaves.bin", grid)
  writer.append(trace.Leaf("inf_spec", -1, -1, inference_id))
  writer.append(trace.Leaf("tokens", 0, -1, hashing.hash_array(preds)))
  writer.append(trace.Leaf("sample_key", 0, -1, hashing.hash_key(no_sampling_key())))
  for k, o in enumerate(outs):
    writer.append(trace.Leaf("inf_out", 0, k, hashing.hash_array(np.asarray(o))))
  writer.close()
  tensors = {IMAGES: images, "tokens/0": preds}
  tensors.update({f"out/0/{k}": np.asarray(o) for k, o in enumerate(outs)
                  if k % activation_interval == 0})
  tensorfile.write(out_dir / "tensors.safetensors.zst", tensors)
  doc = {"format": commitment_lib.INFERENCE_FORMAT, "inference_id": inference_id.hex(),
         "job_id": inference_id.hex(), "merkle_root": writer.tree.root().hex(),
         "num_leaves": writer.size, "grid": grid.to_dict(), "model_hash": model.model_hash,
         "source": model.source}
  doc = signing.sign_document(doc, recorder_lib.load_or_create_key(Path(key_path)))
  jsonio.write_json(out_dir / "commitment.json", doc)
  jsonio.write_json(out_dir / "request.json", {"images_hash": spec["images_hash"],
                                               "images_shape": spec["images_shape"]})
  jsonio.write_json(out_dir / "response.json", {
      "format": schemas.RESPONSE_FORMAT, "inference_id": doc["inference_id"],
      "merkle_root": doc["merkle_root"], "tokens": [[int(p)] for p in preds]})
  logging.info("classified %d images; committed root %s", len(preds), doc["merkle_root"][:16])
  return {"predictions": preds, "commitment": doc}


@dataclasses.dataclass
class Prediction:
  source: str
  label: int
  name: str


def describe(preds: np.ndarray, sources: Sequence[str], class_names: Sequence[str]) -> list[Prediction]:
  names = list(class_names)
  return [Prediction(str(s), int(p), names[int(p)] if int(p) < len(names) else str(int(p)))
          for s, p in zip(sources, preds)]
