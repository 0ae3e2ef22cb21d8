"""Imports Hugging Face Llama / Qwen2 / Qwen3 checkpoints (safetensors) into aftune units.

  cfg, units = load_hf_model("path/to/checkpoint")          # config.json + model.safetensors
  cfg, units = load_hf_model(path, lora=LoRAConfig(rank=8))  # frozen base + fresh adapters
  tok = load_hf_tokenizer(path)

The loader is pure and offline: it reads `config.json` and either `model.safetensors` or
`model.safetensors.index.json` plus its shards from a local directory, and nothing else
(no downloads, no `transformers`). Every tensor of the checkpoint must be used and every
parameter of the model must be found, with exactly the shape the config implies; any
problem raises one `HFImportError` whose message starts with the offending file.

Parameters are fp32 (`param_dtype`) whatever the checkpoint's dtype (F32, F16 or BF16,
upcast exactly); `dtype` is the compute dtype. Linear weights are transposed from HF's
[out, in] to aftune's [in, out]. LoRA adapters keep their fresh initialisation from
`seed`, exactly as `model.build_units(cfg, seed)` draws them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
from pathlib import Path
from typing import Any
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from aftune import errors
from aftune.model import llama as model_lib
from aftune.model.llama import LoRAConfig
from aftune.model.llama import ModelConfig
from aftune.model.llama import RopeScaling

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"

# HF architecture name -> aftune `ModelConfig.arch`.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "llama3")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# safetensors dtype tag -> accepted (all floats; upcast to fp32 exactly).
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# Buffers some older checkpoints saved; derived from the config, so checked and skipped.
_INV_FREQ_SUFFIX = ".self_attn.rotary_emb.inv_freq"


class HFImportError(errors.InputError):
  """A checkpoint that cannot be imported; the message starts with the file at fault."""


def _fail(source: Path | str, problem: str) -> HFImportError:
  return HFImportError(f"{source}: {problem}")


# ---------------------------------------------------------------------------------
# config.json


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """Reads `config.json` from a checkpoint directory (or the file itself) as a dict."""
  path = Path(path)
  file = path / CONFIG_NAME if path.is_dir() else path
  if not path.exists():
    raise _fail(path, "checkpoint path does not exist")
  if not file.is_file():
    raise _fail(file, "missing config.json")
  try:
    with open(file, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _fail(file, f"malformed JSON: {e}") from None
  if not isinstance(data, dict):
    raise _fail(file, f"expected a JSON object, found {type(data).__name__}")
  return data


def get_int(hf: Mapping[str, Any], key: str, source, default: Any = ..., minimum: int = 1) -> int:
  if key not in hf or hf[key] is None:
    if default is ...:
      raise _fail(source, f"missing required key {key!r}")
    return default
  v = hf[key]
  if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
    raise _fail(source, f"{key!r} must be an integer >= {minimum}, found {v!r}")
  return v


def get_float(d: Mapping[str, Any], key: str, source, default: Any = ..., where: str = "") -> float:
  if key not in d or d[key] is None:
    if default is ...:
      raise _fail(source, f"missing required key {where}{key!r}")
    return float(default)
  v = d[key]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise _fail(source, f"{where}{key!r} must be a finite number, found {v!r}")
  return float(v)


def get_bool(hf: Mapping[str, Any], key: str, source, default: bool) -> bool:
  v = hf.get(key, default)
  if v is None:
    return default
  if not isinstance(v, bool):
    raise _fail(source, f"{key!r} must be true or false, found {v!r}")
  return v


def _rope_from_hf(hf: Mapping[str, Any], source) -> tuple[float, RopeScaling | None]:
  """(rope_theta, rope_scaling) from the legacy keys or the newer `rope_parameters` dict.

  As transformers does, a `rope_scaling` dict takes precedence over `rope_parameters`,
  and `rope_theta` inside the dict over the top-level key (default 10000).
  """
  rp = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  if not isinstance(rp, dict):
    raise _fail(source, f"{key!r} must be an object, found {rp!r}")
  if rp and all(isinstance(v, dict) for v in rp.values()):
    raise _fail(source, f"per-layer-type {key!r} ({sorted(rp)}) are not supported")
  theta = get_float(rp, "rope_theta", source, default=get_float(hf, "rope_theta", source, 10000.0),
                     where=f"{key}.")
  if theta <= 0:
    raise _fail(source, f"rope_theta must be > 0, found {theta}")
  prf = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if prf not in (None, 1, 1.0):
    raise _fail(source, f"partial_rotary_factor={prf!r} is not supported (only 1.0)")
  rope_type = rp.get("rope_type", rp.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise _fail(source, f"unsupported {key}.rope_type {rope_type!r}; supported: "
                f"{list(SUPPORTED_ROPE_TYPES)}")
  w = f"{key}."
  factor = get_float(rp, "factor", source, where=w)
  low = get_float(rp, "low_freq_factor", source, where=w)
  high = get_float(rp, "high_freq_factor", source, where=w)
  # transformers (5.x) lets a top-level original_max_position_embeddings override the one in
  # the dict, and falls back to max_position_embeddings: refuse the ambiguous case.
  top = hf.get("original_max_position_embeddings")
  orig = rp.get("original_max_position_embeddings")
  if top is not None and orig is not None and top != orig:
    raise _fail(source, f"conflicting original_max_position_embeddings: {orig!r} in {key!r}, "
                f"{top!r} at top level")
  orig = orig if orig is not None else top if top is not None else hf.get("max_position_embeddings")
  if orig is None:
    raise _fail(source, f"missing required key {w}'original_max_position_embeddings'")
  if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
    raise _fail(source, f"{w}'original_max_position_embeddings' must be an integer >= 1, found {orig!r}")
  if factor < 1.0 or not high > low:
    raise _fail(source, f"invalid llama3 rope scaling: factor={factor} (must be >= 1), "
                f"low_freq_factor={low}, high_freq_factor={high} (must be > low_freq_factor)")
  return theta, RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=high,
                            original_max_position_embeddings=orig)


def config_from_hf(hf: Mapping[str, Any], *, source: str | os.PathLike = CONFIG_NAME,
                   dtype: str = "float32", lora: LoRAConfig | None = None,
                   dropout_rate: float = 0.0) -> ModelConfig:
  """Maps a parsed `config.json` to a `ModelConfig` (tie_embeddings as in the checkpoint).

  Args:
    hf: the parsed config.json.
    source: the file name used in error messages.
    dtype: compute dtype ("float32", "bfloat16" or "float16"); parameters stay fp32.
    lora: adapters to add, or None.
    dropout_rate: residual dropout for fine-tuning.

  Returns:
    The ModelConfig.

  Raises:
    HFImportError: unknown architecture, missing or invalid keys, unsupported features.
  """
  archs = hf.get("architectures")
  if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
    raise _fail(source, f"unknown or unsupported architectures {archs!r}; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}")
  arch = SUPPORTED_ARCHITECTURES[archs[0]]
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise _fail(source, f"hidden_act {act!r} is not supported (only 'silu')")
  vocab = get_int(hf, "vocab_size", source)
  hidden = get_int(hf, "hidden_size", source)
  inter = get_int(hf, "intermediate_size", source)
  layers = get_int(hf, "num_hidden_layers", source)
  heads = get_int(hf, "num_attention_heads", source)
  kv_heads = get_int(hf, "num_key_value_heads", source, default=heads)
  if heads % kv_heads:
    raise _fail(source, f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
  # Qwen3's config class defaults head_dim to 128; the others to hidden_size // heads.
  if arch == "qwen3":
    head_dim = get_int(hf, "head_dim", source, default=128)
  else:
    if hf.get("head_dim") is None and hidden % heads:
      raise _fail(source, f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    head_dim = get_int(hf, "head_dim", source, default=hidden // heads)
  if head_dim % 2:
    raise _fail(source, f"head_dim={head_dim} must be even for rotary embeddings")
  if arch in ("qwen2", "qwen3"):
    layer_types = hf.get("layer_types") or []
    sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    if get_bool(hf, "use_sliding_window", source, False) and not layer_types:
      mwl = get_int(hf, "max_window_layers", source, default=28, minimum=0)
      sliding = list(range(mwl, layers))
    if sliding:
      raise _fail(source, f"sliding-window attention (layers {sliding}) is not supported")
  theta, scaling = _rope_from_hf(hf, source)
  attention_bias = get_bool(hf, "attention_bias", source, False)
  if arch == "llama":
    qkv_bias, o_bias, mlp_bias = attention_bias, attention_bias, get_bool(hf, "mlp_bias", source, False)
  elif arch == "qwen2":  # Qwen2 always has q/k/v biases and none on o_proj or the MLP.
    qkv_bias, o_bias, mlp_bias = True, False, False
  else:  # qwen3
    qkv_bias, o_bias, mlp_bias = attention_bias, attention_bias, False
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
  if lora is not None:
    bad = [t for t in lora.targets if t not in LORA_TARGETS]
    if bad or not lora.targets or lora.rank < 1:
      raise ValueError(f"invalid LoRA config {lora}: targets must be non-empty and among {LORA_TARGETS}, "
                       f"rank >= 1")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
  return ModelConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
      num_heads=heads, num_kv_heads=kv_heads,
      head_dim=None if head_dim * heads == hidden else head_dim,
      arch=arch,
      rms_norm_eps=get_float(hf, "rms_norm_eps", source, 1e-6),
      rope_theta=theta, rope_scaling=scaling,
      tie_embeddings=get_bool(hf, "tie_word_embeddings", source, False),
      qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, qk_norm=arch == "qwen3",
      dtype=dtype, param_dtype="float32", dropout_rate=float(dropout_rate), lora=lora)


# ---------------------------------------------------------------------------------
# HF tensor names <-> aftune parameters.


def weight_mapping(cfg: ModelConfig) -> dict[str, tuple[str, tuple[str, ...], bool]]:
  """HF tensor name -> (unit name, attribute path inside the unit, transposed?).

  Transposed entries are linear weights: HF stores [out, in], aftune [in, out]. For a
  tied config there is no "lm_head.weight": the head reads `model.embed_tokens.weight`.
  """
  m: dict[str, tuple[str, tuple[str, ...], bool]] = {
      "model.embed_tokens.weight": ("embed", ("embedding",), False)}
  for i in range(cfg.num_layers):
    p, u = f"model.layers.{i}.", f"layer_{i}"
    m[p + "input_layernorm.weight"] = (u, ("input_layernorm", "scale"), False)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      m[p + f"self_attn.{proj}.weight"] = (u, ("self_attn", proj, "kernel"), True)
      if (cfg.o_bias if proj == "o_proj" else cfg.qkv_bias):
        m[p + f"self_attn.{proj}.bias"] = (u, ("self_attn", proj, "bias"), False)
    if cfg.qk_norm:
      m[p + "self_attn.q_norm.weight"] = (u, ("self_attn", "q_norm", "scale"), False)
      m[p + "self_attn.k_norm.weight"] = (u, ("self_attn", "k_norm", "scale"), False)
    m[p + "post_attention_layernorm.weight"] = (u, ("post_attention_layernorm", "scale"), False)
    for proj in ("gate_proj", "up_proj", "down_proj"):
      m[p + f"mlp.{proj}.weight"] = (u, ("mlp", proj, "kernel"), True)
      if cfg.mlp_bias:
        m[p + f"mlp.{proj}.bias"] = (u, ("mlp", proj, "bias"), False)
  m["model.norm.weight"] = ("final_norm", ("norm", "scale"), False)
  if not cfg.tie_embeddings:
    m["lm_head.weight"] = ("lm_head", ("kernel",), True)
  return m


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> its shape in the HF layout, as the config implies."""
  d, f, v, k = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.hd
  q_out, kv_out = cfg.num_heads * k, cfg.num_kv_heads * k
  out_in = {"q_proj": (q_out, d), "k_proj": (kv_out, d), "v_proj": (kv_out, d), "o_proj": (d, q_out),
            "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
  shapes = {}
  for name in weight_mapping(cfg):
    parts = name.split(".")
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
      shapes[name] = (v, d)
    elif parts[-2] in out_in:
      shapes[name] = out_in[parts[-2]] if parts[-1] == "weight" else (out_in[parts[-2]][0],)
    elif parts[-2] in ("q_norm", "k_norm"):
      shapes[name] = (k,)
    else:  # input/post_attention layernorm, final norm
      shapes[name] = (d,)
  return shapes


# ---------------------------------------------------------------------------------
# safetensors files.


def resolve_weight_files(root: Path) -> tuple[Path | None, dict[Path, list[str] | None]]:
  """(index file or None, shard file -> tensor names the index assigns it (None: single file))."""
  single = root / WEIGHTS_NAME
  if single.is_file():
    return None, {single: None}
  index = root / INDEX_NAME
  if not index.is_file():
    others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    hint = f" (found {others}: only safetensors are supported)" if others else ""
    raise _fail(root, f"missing weights: neither {WEIGHTS_NAME} nor {INDEX_NAME}{hint}")
  try:
    with open(index, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _fail(index, f"malformed JSON: {e}") from None
  wm = data.get("weight_map") if isinstance(data, dict) else None
  if not isinstance(wm, dict) or not wm:
    raise _fail(index, "missing or empty 'weight_map' object")
  files: dict[Path, list[str]] = {}
  for name, shard in wm.items():
    if not isinstance(shard, str) or not shard:
      raise _fail(index, f"weight_map[{name!r}] must be a shard file name, found {shard!r}")
    # A plain file name in the checkpoint directory (which may be a symlink, as in the HF
    # cache's snapshots, so the name is checked rather than the resolved path).
    if shard in (".", "..") or os.path.basename(shard) != shard or "/" in shard or "\\" in shard:
      raise _fail(index, f"weight_map[{name!r}] = {shard!r} points outside the checkpoint directory")
    path = root / shard
    files.setdefault(path, []).append(name)
  for path in files:
    if not path.is_file():
      raise _fail(index, f"points to missing shard {path.name!r} (for tensor {files[path][0]!r})")
  return index, files


class _TensorSource:
  """The checkpoint's tensors across one or more safetensors files, read lazily."""

  def __init__(self, root: Path, stack: contextlib.ExitStack):
    self.index, files = resolve_weight_files(root)
    self.handles: dict[Path, Any] = {}
    self.where: dict[str, Path] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    for path, listed in files.items():
      try:
        h = stack.enter_context(safe_open(str(path), framework="numpy"))
        keys = list(h.keys())
        meta = {n: (tuple(h.get_slice(n).get_shape()), h.get_slice(n).get_dtype()) for n in keys}
      except Exception as e:  # SafetensorError, OSError, ...: truncated or corrupt file
        raise _fail(path, f"truncated or corrupt safetensors file: {e}") from None
      self.handles[path] = h
      for name in listed or ():
        if name not in meta:
          raise _fail(self.index, f"lists tensor {name!r} in shard {path.name!r}, which does not hold it")
      for name, (shape, dt) in meta.items():
        if name in self.where:
          raise _fail(path, f"tensor {name!r} is also stored in {self.where[name].name!r}")
        if dt not in _FLOAT_DTYPES:
          raise _fail(path, f"tensor {name!r} has dtype {dt}; only {list(_FLOAT_DTYPES)} are supported")
        self.where[name] = path
        self.shapes[name] = shape

  def read(self, name: str) -> np.ndarray:
    """The tensor as a float32 numpy array (BF16/F16 upcast exactly)."""
    path = self.where[name]
    h = self.handles[path]
    try:
      try:
        arr = h.get_tensor(name)
      except TypeError:  # safetensors without numpy bfloat16: read it through jax
        with safe_open(str(path), framework="flax") as hj:
          arr = np.asarray(hj.get_tensor(name))
    except Exception as e:
      raise _fail(path, f"cannot read tensor {name!r} (truncated or corrupt file?): {e}") from None
    return np.asarray(arr).astype(np.float32)


# ---------------------------------------------------------------------------------
# Loading.


def _set(unit: nnx.Module, attr_path: tuple[str, ...], value: np.ndarray, dtype: str) -> None:
  obj = unit
  for a in attr_path[:-1]:
    obj = getattr(obj, a)
  var = getattr(obj, attr_path[-1])
  if tuple(var.shape) != value.shape:  # guarded by expected_shapes; a model.py change would trip it
    raise AssertionError(f"{attr_path}: module shape {var.shape} != {value.shape}")
  var.set_value(jnp.asarray(value, dtype=dtype))


def load_hf_model(path: str | os.PathLike, *, dtype: str = "float32", lora: LoRAConfig | None = None,
                  dropout_rate: float = 0.0, untie_embeddings: bool = False,
                  seed: int = 0) -> tuple[ModelConfig, dict[str, nnx.Module]]:
  """Loads a local HF Llama / Qwen2 / Qwen3 checkpoint as aftune units.

  Args:
    path: directory with config.json and model.safetensors (or the sharded
      model.safetensors.index.json and its shards).
    dtype: compute dtype; parameters are fp32 whatever the checkpoint's dtype.
    lora: add LoRA adapters (fresh init from `seed`; lora_b = 0, so the model is unchanged).
    dropout_rate: residual dropout rate stored in the config.
    untie_embeddings: for a tied checkpoint, return an untied config whose lm_head kernel
      is a copy of the embedding (needed for full fine-tuning); no effect if untied.
    seed: seed of `build_units` (only the LoRA adapters keep their random init).

  Returns:
    (ModelConfig, ordered dict unit name -> module) as `model.build_units` returns.

  Raises:
    HFImportError: missing/malformed files, unsupported config, missing, unexpected or
      mis-shaped tensors; the message names the file (and tensor) at fault.
  """
  root = Path(path)
  hf = read_hf_config(root)
  config_file = root / CONFIG_NAME
  cfg = config_from_hf(hf, source=config_file, dtype=dtype, lora=lora, dropout_rate=dropout_rate)
  mapping = weight_mapping(cfg)
  shapes = expected_shapes(cfg)
  with contextlib.ExitStack() as stack:
    src = _TensorSource(root, stack)
    names = set(src.where)
    tied_head_in_ckpt = cfg.tie_embeddings and "lm_head.weight" in names
    missing = [n for n in mapping if n not in names]
    if missing:
      more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
      raise _fail(src.index or root / WEIGHTS_NAME,
                  f"missing tensor {missing[0]!r}{more} required by {config_file.name}")
    hd2 = (cfg.hd // 2,)
    for name in sorted(names - set(mapping)):
      if name.endswith(_INV_FREQ_SUFFIX) and src.shapes[name] == hd2:
        continue  # checked against the config below
      if name == "lm_head.weight" and tied_head_in_ckpt:
        continue  # checked equal to the embedding below
      raise _fail(src.where[name], f"unexpected tensor {name!r} not used by a "
                  f"{cfg.arch} model with this {config_file.name}")
    for name, want in shapes.items():
      if src.shapes[name] != want:
        raise _fail(src.where[name], f"tensor {name!r} has shape {list(src.shapes[name])}, expected "
                    f"{list(want)} from {config_file.name}")
    if tied_head_in_ckpt and src.shapes["lm_head.weight"] != shapes["model.embed_tokens.weight"]:
      raise _fail(src.where["lm_head.weight"], f"tensor 'lm_head.weight' has shape "
                  f"{list(src.shapes['lm_head.weight'])}, expected {list(shapes['model.embed_tokens.weight'])}")

    inv_freq = model_lib.rope_inv_freq(cfg)
    for name in sorted(n for n in names if n.endswith(_INV_FREQ_SUFFIX)):
      saved = src.read(name)
      if not np.allclose(saved, inv_freq, rtol=1e-3, atol=0.0):
        raise _fail(src.where[name], f"tensor {name!r} does not match the rotary frequencies "
                    f"implied by {config_file.name}")

    if untie_embeddings and cfg.tie_embeddings:
      cfg = dataclasses.replace(cfg, tie_embeddings=False)
    units = model_lib.build_units(cfg, seed)
    pd = cfg.param_dtype
    embedding = None
    for name, (unit_name, attr_path, transpose) in mapping.items():
      value = src.read(name)
      if not np.all(np.isfinite(value)):
        raise _fail(src.where[name], f"tensor {name!r} holds non-finite values")
      if name == "model.embed_tokens.weight":
        embedding = value
      _set(units[unit_name], attr_path, value.T if transpose else value, pd)
      del value
    if tied_head_in_ckpt and not np.array_equal(src.read("lm_head.weight"), embedding):
      raise _fail(src.where["lm_head.weight"], "tensor 'lm_head.weight' differs from "
                  f"'model.embed_tokens.weight' although {config_file.name} sets tie_word_embeddings")
  head = units["lm_head"]
  emb = units["embed"].embedding[...]
  if cfg.tie_embeddings:
    head.tied_embedding.set_value(emb)
  elif "lm_head.weight" not in mapping:  # untied from a tied checkpoint: copy of the embedding
    head.kernel.set_value(jnp.asarray(embedding.T, dtype=pd))
  return cfg, units


def load_hf_tokenizer(path: str | os.PathLike, **kwargs: Any):
  """The checkpoint's tokenizer: `aftune.data.tokenizer.load_tokenizer` if available, else a
  `tokenizers.Tokenizer` read from tokenizer.json.

  Args:
    path: checkpoint directory or a tokenizer.json file.
    **kwargs: passed on to `aftune.data.tokenizer.load_tokenizer` (e.g. eos_token=...).
  """
  path = Path(path)
  file = path / TOKENIZER_NAME if path.is_dir() else path
  try:
    data = importlib.import_module("aftune.data.tokenizer")
  except ImportError:
    data = None
  if data is not None and hasattr(data, "load_tokenizer"):
    return data.load_tokenizer(path, **kwargs)
  if not file.is_file():
    raise _fail(file, "missing tokenizer.json")
  from tokenizers import Tokenizer
  try:
    return Tokenizer.from_file(str(file))
  except Exception as e:  # the Rust side raises a bare Exception
    raise _fail(file, f"malformed tokenizer file: {e}") from None
