"""Imports Hugging Face ViT / DINOv2 / ResNet image classifiers (safetensors) into aftune units.

  cfg, units = load_hf_vision(path, sheet)              # what vit/resnet.load_pretrained call
  cfg, units = load_hf_vision_model(path, image=image, num_classes=100, seed=0)

As `hf_llama`, the loader is pure and offline: it reads `config.json` and either
`model.safetensors` or `model.safetensors.index.json` plus its shards (and, for a run sheet
with `data.preprocess.from_checkpoint`, `preprocessor_config.json`) from a local directory,
without `transformers`. Every tensor of the checkpoint must be used and every parameter of
the model found, with exactly the shape the config implies; any problem raises one
`HFImportError` whose message starts with the offending file. The only tensors read and
deliberately dropped are named here: DINOv2's `mask_token` (masked-image pretraining),
ViTModel's `pooler` (not used for classification), BatchNorm's `num_batches_tracked`, and a
classifier replaced by a new head.

Names: both transformers' current ones (5.x: `vit.layers.N.attention.q_proj`, DINOv2's
`mlp.gate_proj` / `up_proj` / `down_proj`) and the hub's older ones, which transformers
converts on load (`conversion_mapping.py`): `encoder.layer.N.attention.attention.query`,
`attention.output.dense`, `intermediate.dense`, `output.dense`, and DINOv2-giant's fused
`mlp.weights_in` [2F, D] (its first half the gate, its second the up projection) and
`mlp.weights_out`. A checkpoint uses one naming throughout.

The units come from the family's own `build_units(cfg, seed)` and every variable is then
set from the checkpoint, so the structure is defined once (in `vit.py` / `resnet.py`). A
new head (another class count, or a `*Model` checkpoint without one) keeps exactly the
initialisation `build_units(cfg, seed)` draws for it. Parameters are fp32 whatever the
checkpoint's dtype (F32, F16, BF16: upcast exactly); `dtype` is the compute dtype. Linear
weights go from HF's [out, in] to [in, out], convolution kernels from OIHW to HWIO.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from safetensors import safe_open

from aftune import errors
from aftune.data import images as images_lib
from aftune.model import hf_llama
from aftune.model import resnet
from aftune.model import vision
from aftune.model import vit

CONFIG_NAME = hf_llama.CONFIG_NAME
WEIGHTS_NAME = hf_llama.WEIGHTS_NAME
PREPROCESSOR_NAME = "preprocessor_config.json"

# HF architecture name -> aftune `arch`.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "ViTForImageClassification": "vit",
    "ViTModel": "vit",
    "Dinov2ForImageClassification": "dinov2",
    "Dinov2Model": "dinov2",
    "Dinov2WithRegistersForImageClassification": "dinov2",
    "Dinov2WithRegistersModel": "dinov2",
    "ResNetForImageClassification": "resnet",
    "ResNetModel": "resnet",
}
# The classification models keep the backbone under their `base_model_prefix`.
_BASE_PREFIX = {
    "ViTForImageClassification": "vit.",
    "Dinov2ForImageClassification": "dinov2.",
    "Dinov2WithRegistersForImageClassification": "dinov2_with_registers.",
    "ResNetForImageClassification": "resnet.",
}
# ResNet's classifier is nn.Sequential(Flatten, Linear).
_CLASSIFIER = {"vit": "classifier.", "dinov2": "classifier.", "resnet": "classifier.1."}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_RESNET_NATIVE_SIZE = 224  # ResNet configs carry no image size; HF's processors crop 224

HFImportError = hf_llama.HFImportError
# hf_llama's config.json readers and weight-file resolution: the same checks and messages.
get_int = hf_llama.get_int
get_float = hf_llama.get_float
get_bool = hf_llama.get_bool
resolve_weight_files = hf_llama.resolve_weight_files


def _fail(source: Path | str, problem: str) -> HFImportError:
  return HFImportError(f"{source}: {problem}")


# ---------------------------------------------------------------------------------
# config.json


def _architecture(hf: dict[str, Any], source: Path, expect_arch: str | None) -> tuple[str, str]:
  """(HF architecture name, aftune arch), checked against the expected arch."""
  archs = hf.get("architectures")
  name = archs[0] if isinstance(archs, list) and len(archs) == 1 else None
  if expect_arch is not None:
    wanted = sorted(k for k, v in SUPPORTED_ARCHITECTURES.items() if v == expect_arch)
    if not wanted:
      raise errors.ConfigError(f"model.arch {expect_arch!r} has no Hugging Face vision importer; "
                               f"known: {sorted(set(SUPPORTED_ARCHITECTURES.values()))}")
    if SUPPORTED_ARCHITECTURES.get(name) != expect_arch:
      shown = name if name is not None else repr(archs)
      raise _fail(source, f"architecture {shown} is not a {expect_arch} checkpoint "
                  f"(supported: {', '.join(wanted)})")
  elif name not in SUPPORTED_ARCHITECTURES:
    raise _fail(source, f"unknown or unsupported architectures {archs!r}; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}")
  return name, SUPPORTED_ARCHITECTURES[name]


def _get_str(hf: dict[str, Any], key: str, source: Path, default: str, allowed: tuple[str, ...]) -> str:
  v = hf.get(key, default)
  if v is None:
    v = default
  if v not in allowed:
    raise _fail(source, f"{key} {v!r} is not supported (only {', '.join(map(repr, allowed))})")
  return v


def _get_int_list(hf: dict[str, Any], key: str, source: Path) -> tuple[int, ...]:
  v = hf.get(key)
  if (not isinstance(v, list) or not v
      or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v)):
    raise _fail(source, f"{key!r} must be a non-empty list of integers >= 1, found {v!r}")
  return tuple(v)


def _check_channels(hf: dict[str, Any], source: Path) -> None:
  if get_int(hf, "num_channels", source, default=3) != 3:
    raise _fail(source, f"num_channels {hf['num_channels']} is not supported (only RGB: 3)")


def native_image_size(hf: dict[str, Any], arch: str, source: Path | str = CONFIG_NAME) -> int:
  """The input size a checkpoint was trained at (ViT/DINOv2: config image_size; ResNet: 224)."""
  if arch == "resnet":
    return _RESNET_NATIVE_SIZE
  return get_int(hf, "image_size", source)


def _vit_config(hf: dict[str, Any], source: Path, hf_arch: str, arch: str, *,
                image: vision.ImageInput, num_classes: int, dtype: str) -> vit.ViTConfig:
  """A ViTConfig from a ViT / DINOv2 / DINOv2-with-registers config.json."""
  _check_channels(hf, source)
  hidden = get_int(hf, "hidden_size", source)
  heads = get_int(hf, "num_attention_heads", source)
  if hidden % heads:
    raise _fail(source, f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
  patch = get_int(hf, "patch_size", source)
  pos_grid = native_image_size(hf, arch, source) // patch  # HF: num_patches = (size // patch) ** 2
  if pos_grid < 1:
    raise _fail(source, f"image_size is smaller than patch_size={patch}")
  common = dict(
      hidden_size=hidden, num_layers=get_int(hf, "num_hidden_layers", source), num_heads=heads,
      patch_size=patch, num_classes=num_classes, image=image, pos_grid=pos_grid, arch=arch,
      qkv_bias=get_bool(hf, "qkv_bias", source, True), dtype=dtype, param_dtype="float32")
  if arch == "vit":
    _get_str(hf, "hidden_act", source, "gelu", ("gelu",))
    return vit.ViTConfig(
        intermediate_size=get_int(hf, "intermediate_size", source),
        layer_norm_eps=get_float(hf, "layer_norm_eps", source, 1e-12), head="cls", **common)
  swiglu = get_bool(hf, "use_swiglu_ffn", source, False)
  mlp_ratio = get_float(hf, "mlp_ratio", source, 4.0)
  width = int(hidden * mlp_ratio)
  if width < 1:
    raise _fail(source, f"mlp_ratio={mlp_ratio} gives an empty MLP")
  if swiglu:
    # transformers' Dinov2SwiGLUFFN: two thirds of the width, rounded up to a multiple of 8
    # (its activation is always SiLU, whatever hidden_act says).
    width = (int(width * 2 / 3) + 7) // 8 * 8
  else:
    _get_str(hf, "hidden_act", source, "gelu", ("gelu",))
  registers = 0
  if hf_arch.startswith("Dinov2WithRegisters"):
    registers = get_int(hf, "num_register_tokens", source, default=4, minimum=0)
  return vit.ViTConfig(
      intermediate_size=width, layer_norm_eps=get_float(hf, "layer_norm_eps", source, 1e-6),
      layerscale_init=get_float(hf, "layerscale_value", source, 1.0), swiglu=swiglu,
      num_register_tokens=registers, head="cls_mean", **common)


def _resnet_config(hf: dict[str, Any], source: Path, *, image: vision.ImageInput,
                   num_classes: int, dtype: str) -> resnet.ResNetConfig:
  """A ResNetConfig from a ResNet config.json."""
  _check_channels(hf, source)
  _get_str(hf, "hidden_act", source, "relu", ("relu",))
  hidden_sizes = _get_int_list(hf, "hidden_sizes", source)
  depths = _get_int_list(hf, "depths", source)
  if len(hidden_sizes) != len(depths):
    raise _fail(source, f"hidden_sizes {list(hidden_sizes)} and depths {list(depths)} differ in length")
  return resnet.ResNetConfig(
      embedding_size=get_int(hf, "embedding_size", source), hidden_sizes=hidden_sizes,
      depths=depths, num_classes=num_classes, image=image,
      layer_type=_get_str(hf, "layer_type", source, "bottleneck", ("bottleneck", "basic")),
      downsample_in_first_stage=get_bool(hf, "downsample_in_first_stage", source, False),
      downsample_in_bottleneck=get_bool(hf, "downsample_in_bottleneck", source, False),
      dtype=dtype, param_dtype="float32")


# ---------------------------------------------------------------------------------
# HF tensor names -> aftune variables.


class _Target(NamedTuple):
  """One aftune variable a checkpoint tensor (or a chunk of it) sets."""
  unit: str
  path: tuple[str | int, ...]  # attributes (ints: nnx.List indices) inside the unit
  op: str  # copy | linear ([out, in] -> [in, out]) | conv (OIHW -> HWIO) | lead1 | lead2 (drop leading 1s)
  chunk: tuple[int, int] | None = None  # (i, n): the i-th of n equal chunks along HF's axis 0


class _Entry(NamedTuple):
  shape: tuple[int, ...]  # the tensor's shape in the HF layout
  targets: tuple[_Target, ...]


def _lookup(unit: nnx.Module, path: tuple[str | int, ...]) -> Any:
  obj = unit
  for a in path:
    obj = obj[a] if isinstance(a, int) else getattr(obj, a)
  return obj


def _hf_shape(t: _Target, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF-layout shape whose conversion gives an aftune variable of `shape`."""
  if t.op == "linear":
    hf = shape[::-1]
  elif t.op == "conv":
    kh, kw, c_in, c_out = shape
    hf = (c_out, c_in, kh, kw)
  elif t.op in ("lead1", "lead2"):
    hf = (1,) * int(t.op[-1]) + shape
  else:
    hf = shape
  if t.chunk is not None:
    hf = (hf[0] * t.chunk[1],) + hf[1:]
  return hf


def _convert(t: _Target, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if t.chunk is not None:
    value = np.split(value, t.chunk[1], axis=0)[t.chunk[0]]
  if t.op == "linear":
    return value.T
  if t.op == "conv":
    return value.transpose(2, 3, 1, 0)
  if t.op in ("lead1", "lead2"):
    return value.reshape(shape)
  return value


class _Mapping:
  """Builds HF name -> _Entry with shapes read off the (abstract) aftune units."""

  def __init__(self, abstract: dict[str, nnx.Module]):
    self.abstract = abstract
    self.entries: dict[str, _Entry] = {}

  def add(self, name: str, *targets: _Target) -> None:
    shapes = {_hf_shape(t, tuple(_lookup(self.abstract[t.unit], t.path).shape)) for t in targets}
    if len(shapes) != 1:  # the chunks of one tensor must agree on its shape
      raise AssertionError(f"{name}: chunk shapes {shapes} disagree")
    self.entries[name] = _Entry(shapes.pop(), targets)

  def linear(self, name: str, unit: str, *paths: tuple[str | int, ...]) -> None:
    """`name`.weight (and .bias, when the aftune Dense has one); several paths: fused chunks."""
    n = len(paths)
    chunk = lambda i: (i, n) if n > 1 else None
    self.add(name + ".weight", *(_Target(unit, p + ("kernel",), "linear", chunk(i))
                                 for i, p in enumerate(paths)))
    if _lookup(self.abstract[unit], paths[0]).bias is not None:
      self.add(name + ".bias", *(_Target(unit, p + ("bias",), "copy", chunk(i))
                                 for i, p in enumerate(paths)))

  def norm(self, name: str, unit: str, path: tuple[str | int, ...]) -> None:
    self.add(name + ".weight", _Target(unit, path + ("scale",), "copy"))
    self.add(name + ".bias", _Target(unit, path + ("bias",), "copy"))

  def conv_bn(self, name: str, unit: str, path: tuple[str | int, ...]) -> None:
    self.add(name + "convolution.weight", _Target(unit, path + ("conv", "kernel"), "conv"))
    bn = name + "normalization."
    self.norm(bn[:-1], unit, path + ("norm",))
    self.add(bn + "running_mean", _Target(unit, path + ("norm", "mean"), "copy"))
    self.add(bn + "running_var", _Target(unit, path + ("norm", "var"), "copy"))


def _vit_mapping(cfg: vit.ViTConfig, abstract: dict[str, nnx.Module], base: str,
                 legacy: bool) -> dict[str, _Entry]:
  """The backbone's tensors (ViT / DINOv2) in the current or the older (hub) naming."""
  m = _Mapping(abstract)
  e = base + "embeddings."
  m.add(e + "cls_token", _Target("embed", ("cls_token",), "lead2"))
  m.add(e + "position_embeddings", _Target("embed", ("position",), "lead1"))
  m.add(e + "patch_embeddings.projection.weight", _Target("embed", ("patch_kernel",), "conv"))
  m.add(e + "patch_embeddings.projection.bias", _Target("embed", ("patch_bias",), "copy"))
  if cfg.num_register_tokens:
    m.add(e + "register_tokens", _Target("embed", ("registers",), "lead1"))
  dinov2 = cfg.arch == "dinov2"
  for i in range(cfg.num_layers):
    u = f"layer_{i}"
    p = base + (f"encoder.layer.{i}." if dinov2 or legacy else f"layers.{i}.")
    m.norm(p + ("norm1" if dinov2 else "layernorm_before"), u, ("norm1",))
    m.norm(p + ("norm2" if dinov2 else "layernorm_after"), u, ("norm2",))
    for hf_new, hf_old, ours in (("q_proj", "attention.query", "query"),
                                 ("k_proj", "attention.key", "key"),
                                 ("v_proj", "attention.value", "value"),
                                 ("o_proj", "output.dense", "out")):
      m.linear(p + "attention." + (hf_old if legacy else hf_new), u, ("attention", ours))
    if dinov2:
      m.add(p + "layer_scale1.lambda1", _Target(u, ("layer_scale1",), "copy"))
      m.add(p + "layer_scale2.lambda1", _Target(u, ("layer_scale2",), "copy"))
    if cfg.swiglu and legacy:
      m.linear(p + "mlp.weights_in", u, ("mlp", "gate_proj"), ("mlp", "up_proj"))
      m.linear(p + "mlp.weights_out", u, ("mlp", "down_proj"))
    elif cfg.swiglu:
      for proj in ("gate_proj", "up_proj", "down_proj"):
        m.linear(p + "mlp." + proj, u, ("mlp", proj))
    elif legacy and not dinov2:
      m.linear(p + "intermediate.dense", u, ("mlp", "fc1"))
      m.linear(p + "output.dense", u, ("mlp", "fc2"))
    else:
      m.linear(p + "mlp.fc1", u, ("mlp", "fc1"))
      m.linear(p + "mlp.fc2", u, ("mlp", "fc2"))
  m.norm(base + "layernorm", "final_norm", ("norm",))
  return m.entries


def _resnet_mapping(cfg: resnet.ResNetConfig, abstract: dict[str, nnx.Module],
                    base: str) -> dict[str, _Entry]:
  """The backbone's tensors (ResNet; one naming in every version)."""
  m = _Mapping(abstract)
  m.conv_bn(base + "embedder.embedder.", "embed", ("embedder",))
  for i, depth in enumerate(cfg.depths):
    for j in range(depth):
      u = f"stage{i}_layer{j}"
      p = base + f"encoder.stages.{i}.layers.{j}."
      if abstract[u].shortcut is not None:
        m.conv_bn(p + "shortcut.", u, ("shortcut",))
      for k in range(len(abstract[u].layers)):
        m.conv_bn(p + f"layer.{k}.", u, ("layers", k))
  return m.entries


def _head_mapping(cfg: Any, abstract: dict[str, nnx.Module]) -> dict[str, _Entry]:
  m = _Mapping(abstract)
  m.linear(_CLASSIFIER[cfg.arch][:-1], "head", ("classifier", "dense"))
  return m.entries


def _ignored_tensors(cfg: Any, hf: dict[str, Any], base: str,
                     backbone: dict[str, _Entry]) -> dict[str, tuple[int, ...]]:
  """Tensors a checkpoint may carry that the classifier does not use: name -> shape."""
  if cfg.arch == "resnet":  # torch's BatchNorm step counter (only its momentum=None mode reads it)
    return {n.removesuffix("running_mean") + "num_batches_tracked": ()
            for n in backbone if n.endswith(".running_mean")}
  d = cfg.hidden_size
  if cfg.arch == "dinov2":
    # The mask token only replaces patches in masked-image pretraining; an empty register
    # parameter is what a with-registers model of 0 registers saves.
    ignored = {base + "embeddings.mask_token": (1, d)}
    if not cfg.num_register_tokens:
      ignored[base + "embeddings.register_tokens"] = (1, 0, d)
    return ignored
  pooled = hf.get("pooler_output_size") or d  # ViTModel's pooler (CLS -> dense -> tanh)
  return {base + "pooler.dense.weight": (pooled, d), base + "pooler.dense.bias": (pooled,)}


# ---------------------------------------------------------------------------------
# safetensors files.


class _Tensors:
  """The checkpoint's tensors across one or more safetensors files, read lazily.

  As `hf_llama._TensorSource`, but any dtype is listed (BatchNorm's num_batches_tracked is
  int64); the tensors that are read are checked to be floats.
  """

  def __init__(self, root: Path, stack: contextlib.ExitStack):
    self.index, files = resolve_weight_files(root)
    self.handles: dict[Path, Any] = {}
    self.where: dict[str, Path] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.dtypes: dict[str, str] = {}
    for path, listed in files.items():
      try:
        h = stack.enter_context(safe_open(str(path), framework="numpy"))
        meta = {n: (tuple(h.get_slice(n).get_shape()), h.get_slice(n).get_dtype()) for n in h.keys()}
      except Exception as e:  # SafetensorError, OSError, ...: truncated or corrupt file
        raise _fail(path, f"truncated or corrupt safetensors file: {e}") from None
      self.handles[path] = h
      for name in listed or ():
        if name not in meta:
          raise _fail(self.index, f"lists tensor {name!r} in shard {path.name!r}, which does not hold it")
      for name, (shape, dt) in meta.items():
        if name in self.where:
          raise _fail(path, f"tensor {name!r} is also stored in {self.where[name].name!r}")
        self.where[name], self.shapes[name], self.dtypes[name] = path, shape, dt

  @property
  def weights_file(self) -> Path:
    """The file that lists the tensors: the index, or the single safetensors file."""
    return self.index or next(iter(self.handles))

  def read(self, name: str) -> np.ndarray:
    """The tensor as a float32 numpy array (BF16/F16 upcast exactly)."""
    path = self.where[name]
    try:
      try:
        arr = self.handles[path].get_tensor(name)
      except TypeError:  # safetensors without numpy bfloat16: read it through jax
        with safe_open(str(path), framework="flax") as hj:
          arr = np.asarray(hj.get_tensor(name))
    except Exception as e:
      raise _fail(path, f"cannot read tensor {name!r} (truncated or corrupt file?): {e}") from None
    return np.asarray(arr).astype(np.float32)


# ---------------------------------------------------------------------------------
# Loading.


def _default_image(size: int) -> vision.ImageInput:
  """The model's input at `size`, stored at that size (no crop margin, no augmentation)."""
  return vision.ImageInput(images_lib.Preprocess(image_size=size, stored_size=size, resize="exact"))


def _check_tensors(src: _Tensors, config_file: Path, arch: str, load: dict[str, _Entry],
                   optional: dict[str, tuple[int, ...]]) -> None:
  """Every `load` tensor present with its shape and a float dtype; `optional` ones may be
  present (with their shape); nothing else."""
  names = set(src.where)
  missing = [n for n in load if n not in names]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise _fail(src.weights_file, f"missing tensor {missing[0]!r}{more} required by {config_file.name}")
  for name in sorted(names - set(load)):
    if name not in optional:
      raise _fail(src.where[name], f"unexpected tensor {name!r} not used by a {arch} model with "
                  f"this {config_file.name}")
  for name in sorted(names):
    want = load[name].shape if name in load else optional[name]
    if src.shapes[name] != want:
      raise _fail(src.where[name], f"tensor {name!r} has shape {list(src.shapes[name])}, expected "
                  f"{list(want)} from {config_file.name}")
    if name in load and src.dtypes[name] not in _FLOAT_DTYPES:
      raise _fail(src.where[name], f"tensor {name!r} has dtype {src.dtypes[name]}; only "
                  f"{list(_FLOAT_DTYPES)} are supported")


def load_hf_vision_model(path: str | os.PathLike, *, image: vision.ImageInput | None = None,
                         num_classes: int = 0, dtype: str = "float32", seed: int = 0,
                         expect_arch: str | None = None) -> tuple[Any, dict[str, nnx.Module]]:
  """Loads a local HF ViT / DINOv2 / ResNet checkpoint as aftune units.

  Args:
    path: directory with config.json and model.safetensors (or the sharded
      model.safetensors.index.json and its shards).
    image: how stored images become the model's input (its image_size is the size the model
      runs at; ViT/DINOv2 resample their position embeddings to it). None: the checkpoint's
      own size (config image_size; ResNet 224), stored at that size.
    num_classes: 0 keeps the checkpoint's classifier (a `*Model` checkpoint has none: then
      this is required); another count gets a new head, initialised from `seed`.
    dtype: compute dtype ("float32" or "bfloat16"); parameters are fp32.
    seed: seed of `build_units` (only a new head keeps its random init).
    expect_arch: the run sheet's model.arch ("vit", "dinov2", "resnet"): a checkpoint of
      another architecture is refused.

  Returns:
    (ViTConfig or ResNetConfig, ordered dict unit name -> module) as the family's
    `build_units` returns.

  Raises:
    HFImportError: missing/malformed files, another or an unsupported architecture or
      config, missing, unexpected or mis-shaped tensors; the message starts with the file.
    errors.ConfigError: a config the family refuses (e.g. an image size that is not a
      multiple of the patch size), or a bad dtype.
  """
  root = Path(path)
  hf = hf_llama.read_hf_config(root)
  config_file = root / CONFIG_NAME
  hf_arch, arch = _architecture(hf, config_file, expect_arch)
  vision.check_dtype(dtype)
  if num_classes < 0:
    raise errors.ConfigError(f"num_classes must be >= 0, got {num_classes}")
  fam = resnet if arch == "resnet" else vit
  base = _BASE_PREFIX.get(hf_arch, "")
  classifier = _CLASSIFIER[arch]
  with contextlib.ExitStack() as stack:
    src = _Tensors(root, stack)
    # The checkpoint's class count: its classifier's rows (HF drops the classifier when
    # num_labels is 0, and *Model checkpoints have none).
    cls_weight = classifier + "weight"
    ckpt_classes = 0
    if hf_arch in _BASE_PREFIX and cls_weight in src.shapes:
      ckpt_classes = src.shapes[cls_weight][0] if src.shapes[cls_weight] else 0
    labels = hf.get("id2label")  # transformers' num_labels is len(id2label)
    if hf_arch in _BASE_PREFIX and isinstance(labels, dict) and len(labels) != ckpt_classes:
      raise _fail(config_file, f"id2label names {len(labels)} classes but the checkpoint's "
                  f"classifier has {ckpt_classes}")
    if num_classes == 0 and not ckpt_classes:
      raise _fail(config_file, f"the {hf_arch} checkpoint has no classification head: set "
                  "num_classes (model.num_classes) for a new one")
    num_classes = num_classes or ckpt_classes
    new_head = num_classes != ckpt_classes
    if image is None:
      image = _default_image(native_image_size(hf, arch, config_file))
    if arch == "resnet":
      cfg = _resnet_config(hf, config_file, image=image, num_classes=num_classes, dtype=dtype)
    else:
      cfg = _vit_config(hf, config_file, hf_arch, arch, image=image, num_classes=num_classes,
                        dtype=dtype)
    cfg.validate()
    abstract = {n: fam.abstract_unit(cfg, n) for n in cfg.unit_names}

    if arch == "resnet":
      backbone = _resnet_mapping(cfg, abstract, base)
    else:  # the older naming, if any tensor has a name only it uses
      current, older = (_vit_mapping(cfg, abstract, base, legacy) for legacy in (False, True))
      backbone = older if set(src.where) & (set(older) - set(current)) else current
    head = _head_mapping(cfg, abstract)
    optional = _ignored_tensors(cfg, hf, base, backbone)
    load = dict(backbone)
    if new_head:
      if ckpt_classes:  # unused on purpose, but still the checkpoint's own classifier
        optional.update({n: (ckpt_classes,) + e.shape[1:] for n, e in head.items()})
    else:
      load.update(head)
    _check_tensors(src, config_file, arch, load, optional)

    # Every variable of the model is set exactly once (a new head's keep their init): a
    # mapping that drifted from vit.py / resnet.py is a bug, caught here.
    targets = [(t.unit, t.path) for e in load.values() for t in e.targets]
    wanted = [(u, tuple(p)) for u, m in abstract.items() if not (new_head and u == "head")
              for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Any(nnx.Param, nnx.BatchStat)))]
    if len(targets) != len(set(targets)) or set(targets) != set(wanted):
      raise AssertionError(f"mapping != model: {sorted(set(targets) ^ set(wanted), key=str)}")

    units = fam.build_units(cfg, seed)
    for name, entry in load.items():
      value = src.read(name)
      if not np.all(np.isfinite(value)):
        raise _fail(src.where[name], f"tensor {name!r} holds non-finite values")
      for t in entry.targets:
        var = _lookup(units[t.unit], t.path)
        v = _convert(t, value, tuple(var.shape))
        if tuple(var.shape) != v.shape:  # guarded by the mapping's shapes
          raise AssertionError(f"{t}: module shape {var.shape} != {v.shape}")
        var.set_value(jnp.asarray(v, dtype=var[...].dtype))
      del value
  if new_head:
    dropped = (f"the checkpoint's {ckpt_classes}-class classifier ({classifier}weight, "
               f"{classifier}bias) is deliberately unused" if ckpt_classes
               else "the checkpoint has no classifier")
    logging.info("%s: a new %d-class head initialised from seed %d; %s", root, num_classes,
                 seed, dropped)
  return cfg, units


def _checkpoint_preprocess(root: Path, image_size: int | None) -> images_lib.Preprocess:
  """The checkpoint's preprocessor_config.json as a Preprocess (maybe at another size)."""
  file = root / PREPROCESSOR_NAME
  if not file.is_file():
    raise _fail(file, f"missing {PREPROCESSOR_NAME} (data.preprocess.from_checkpoint is set: "
                "the checkpoint's preprocessing is required)")
  try:
    return images_lib.from_hf_preprocessor(file, image_size=image_size)
  except errors.ConfigError:
    raise
  except errors.InputError as e:  # already names the file
    raise HFImportError(str(e)) from None


def load_hf_vision(path: str | os.PathLike, sheet: Any) -> tuple[Any, dict[str, nnx.Module]]:
  """A local HF vision checkpoint for a `configs/vision.py` run sheet.

  The image input is the sheet's `data.preprocess` / `data.augment`, or with
  `data.preprocess.from_checkpoint` the checkpoint's preprocessor_config.json (at
  `data.preprocess.image_size` when that is non-zero) with the sheet's augmentation.

  Args:
    path: the checkpoint directory (the sheet's model.hf_path).
    sheet: the run sheet: model.arch, model.num_classes (0: the checkpoint's head),
      model.dtype, seed, data.preprocess, data.augment.

  Returns:
    (cfg, units) as `load_hf_vision_model`.

  Raises:
    HFImportError: as `load_hf_vision_model`, and a missing or unsupported
      preprocessor_config.json when the sheet asks for it.
  """
  root = Path(path)
  m, p = sheet.model, sheet.data.preprocess
  # The architecture first: a wrong checkpoint is the clearer error than its preprocessing.
  _architecture(hf_llama.read_hf_config(root), root / CONFIG_NAME, m.arch)
  if p.get("from_checkpoint", False):
    pre = _checkpoint_preprocess(root, int(p.image_size) or None)
    image = vision.image_input_from_sheet(sheet, pre)
  else:
    image = vision.image_input_from_sheet(sheet)
  return load_hf_vision_model(root, image=image, num_classes=int(m.num_classes), dtype=m.dtype,
                              seed=int(sheet.seed), expect_arch=m.arch)
