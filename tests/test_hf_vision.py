"""Tests for aftune.model.hf_vision: logit parity with transformers, both namings, errors.

The parity tests compare aftune's fp32 units with transformers' fp32 eval-mode forward on
tiny random checkpoints written here with transformers (every parameter moved off its init,
BatchNorm running statistics random). Our first unit is fed HF's pixel_values (NHWC) through
`embed_pixels`; the other units follow with ctx {"train": False}. Run with -s to see the
measured max |diff| per case.
"""

import json
import logging
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from aftune import errors
from aftune.data import images
from aftune.model import hf_vision as HV
from aftune.model import resnet
from aftune.model import vision
from aftune.model import vit

PARITY_TOL = 1e-4  # fp32 round-off
# The ViT MLP as wide as DINOv2's (mlp_ratio 4): fewer distinct shapes for JAX to compile.
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
           image_size=32, patch_size=8)
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
            image_size=32, patch_size=8)
RESNET = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2])  # few shapes: init compiles per shape


def _image(size):
  return vision.ImageInput(images.Preprocess(image_size=size, stored_size=size, resize="exact"))


def _perturb(torch, model, seed=0):
  """Every parameter moved off its init (LayerNorm, layer scale, registers, BN affine) and
  random BN running statistics, so that no identity init hides a mapping error; eval mode."""
  g = torch.Generator().manual_seed(seed)
  noise = lambda t, s: s * torch.randn(t.shape, generator=g, dtype=t.dtype)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(noise(p, 0.1))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(noise(b, 0.3))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
      elif name.endswith("num_batches_tracked"):
        b.fill_(7)
  return model.eval()


def _pixels(torch, size, seed=1):
  """HF pixel_values [2, 3, size, size] (already normalised)."""
  return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ours(units, pixels_Bx3xHxW, upto=None):
  """Our forward from normalised pixels through the units (up to and including `upto`)."""
  x_BxHxWx3 = np.transpose(pixels_Bx3xHxW.numpy(), (0, 2, 3, 1))
  embed = units["embed"]
  h = embed.embed_pixels(x_BxHxWx3, False) if isinstance(embed, resnet.Stem) else embed.embed_pixels(x_BxHxWx3)
  for name, unit in list(units.items())[1:]:
    h = unit(h, {"train": False})
    if name == upto:
      break
  return np.asarray(h)


def _check(case, got, want):
  diff = float(np.max(np.abs(got - want)))
  print(f"\n  hf_vision parity {case}: max |diff| = {diff:.2e}")
  assert got.shape == want.shape and diff < PARITY_TOL, (case, got.shape, want.shape, diff)


def _save_current_names(model, path):
  """The checkpoint in transformers' own (5.x) parameter names, as a plain state dict."""
  from safetensors.torch import save_file as save_torch  # pylint: disable=g-import-not-at-top
  path.mkdir(exist_ok=True)
  model.config.architectures = [type(model).__name__]
  model.config.save_pretrained(path)
  save_torch({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def vit_ckpt(hf, tmp_path_factory):
  """(dir, model): a tiny 5-class ViTForImageClassification saved by save_pretrained."""
  torch, tr = hf
  model = _perturb(torch, tr.ViTForImageClassification(tr.ViTConfig(**VIT, num_labels=5)))
  path = tmp_path_factory.mktemp("vit")
  model.save_pretrained(path)
  return path, model


def _copy(src, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return dst


def _sheet(path, arch="vit", **overrides):
  """configs/vision.py:smoke, loading `path` with the checkpoint's preprocessing."""
  from configs import vision as vision_sheets  # pylint: disable=g-import-not-at-top
  c = vision_sheets.get_config("smoke")
  c.model.arch, c.model.hf_path = arch, str(path)
  c.data.preprocess.from_checkpoint = True
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# --- parity ---------------------------------------------------------------------------------


def test_vit_parity_native_and_resampled(hf, vit_ckpt):
  torch, _ = hf
  path, model = vit_ckpt
  for size in (32, 48):
    cfg, units = HV.load_hf_vision_model(path, image=_image(size))
    assert (cfg.arch, cfg.num_classes, cfg.pos_grid, cfg.grid) == ("vit", 5, 4, size // 8)
    px = _pixels(torch, size)
    with torch.no_grad():
      want = model(pixel_values=px, interpolate_pos_encoding=size != 32).logits.numpy()
    _check(f"vit@{size}", _ours(units, px), want)


DINO_CASES = {
    "dinov2_mlp": ("Dinov2ForImageClassification", dict(), (32, 40)),
    "dinov2_swiglu": ("Dinov2ForImageClassification", dict(use_swiglu_ffn=True), (32, 40)),
    "dinov2_registers": ("Dinov2WithRegistersForImageClassification",
                         dict(num_register_tokens=2), (32,)),
}


@pytest.mark.parametrize("case", sorted(DINO_CASES))
def test_dinov2_parity(hf, tmp_path, case):
  torch, tr = hf
  cls_name, extra, sizes = DINO_CASES[case]
  config_cls = tr.Dinov2WithRegistersConfig if "Registers" in cls_name else tr.Dinov2Config
  model = _perturb(torch, getattr(tr, cls_name)(config_cls(**DINO, **extra, num_labels=5)))
  model.save_pretrained(tmp_path)
  for size in sizes:
    cfg, units = HV.load_hf_vision_model(tmp_path, image=_image(size), expect_arch="dinov2")
    assert (cfg.arch, cfg.head, cfg.num_classes) == ("dinov2", "cls_mean", 5)
    assert cfg.swiglu == bool(extra.get("use_swiglu_ffn"))
    assert cfg.num_register_tokens == extra.get("num_register_tokens", 0)
    px = _pixels(torch, size)
    with torch.no_grad():
      want = model(pixel_values=px).logits.numpy()
    _check(f"{case}@{size}", _ours(units, px), want)


def test_dinov2_registers_parity_resampled(hf, tmp_path):
  # Dinov2WithRegisters resamples its position grid with antialias=True (another kernel,
  # A=-0.5, also when upsampling): vision.torch_bicubic_aa_matrix.
  torch, tr = hf
  model = _perturb(torch, tr.Dinov2WithRegistersForImageClassification(
      tr.Dinov2WithRegistersConfig(**DINO, num_register_tokens=2, num_labels=5)))
  model.save_pretrained(tmp_path)
  _, units = HV.load_hf_vision_model(tmp_path, image=_image(48))
  px = _pixels(torch, 48)
  with torch.no_grad():
    want = model(pixel_values=px).logits.numpy()
  _check("dinov2_registers@48", _ours(units, px), want)


@pytest.mark.parametrize("cls_name", ["Dinov2Model", "ViTModel"])
def test_backbone_checkpoint_gets_new_head(hf, tmp_path, cls_name):
  """A *Model checkpoint: the backbone matches HF's last_hidden_state; the head is the
  fresh one build_units(cfg, seed) draws; without num_classes it is refused."""
  torch, tr = hf
  config = tr.Dinov2Config(**DINO) if cls_name == "Dinov2Model" else tr.ViTConfig(**VIT)
  model = _perturb(torch, getattr(tr, cls_name)(config))  # ViTModel: with its pooler
  model.save_pretrained(tmp_path)
  with pytest.raises(HV.HFImportError, match="no classification head") as e:
    HV.load_hf_vision_model(tmp_path)
  assert str(e.value).startswith(str(tmp_path / "config.json"))
  cfg, units = HV.load_hf_vision_model(tmp_path, image=_image(40), num_classes=3, seed=7)
  assert cfg.num_classes == 3
  px = _pixels(torch, 40)
  with torch.no_grad():
    kw = {} if cls_name == "Dinov2Model" else {"interpolate_pos_encoding": True}
    want = model(pixel_values=px, **kw).last_hidden_state.numpy()
  _check(f"{cls_name}@40 final_norm", _ours(units, px, upto="final_norm"), want)
  fresh = vit.build_units(cfg, 7)["head"].classifier.dense
  np.testing.assert_array_equal(units["head"].classifier.dense.kernel[...], fresh.kernel[...])
  np.testing.assert_array_equal(units["head"].classifier.dense.bias[...], fresh.bias[...])


RESNET_CASES = {
    "resnet_bottleneck": dict(layer_type="bottleneck"),
    "resnet_bottleneck_downsample_in_bottleneck": dict(layer_type="bottleneck",
                                                       downsample_in_bottleneck=True),
    "resnet_basic_downsample_in_first_stage": dict(layer_type="basic", downsample_in_first_stage=True),
}


@pytest.mark.parametrize("case", sorted(RESNET_CASES))
def test_resnet_parity(hf, tmp_path, case):
  torch, tr = hf
  model = _perturb(torch, tr.ResNetForImageClassification(
      tr.ResNetConfig(**RESNET, **RESNET_CASES[case], num_labels=5)))
  model.save_pretrained(tmp_path)
  # ResNet configs have no image size (224 is native): two other sizes for one case.
  for size in (64, 48) if case == "resnet_bottleneck" else (48,):
    cfg, units = HV.load_hf_vision_model(tmp_path, image=_image(size), expect_arch="resnet")
    assert (cfg.arch, cfg.num_classes, cfg.layer_type) == ("resnet", 5, RESNET_CASES[case]["layer_type"])
    px = _pixels(torch, size)
    with torch.no_grad():
      want = model(pixel_values=px).logits.numpy()
    _check(f"{case}@{size}", _ours(units, px), want)
  stat = units["stage1_layer0"].shortcut.norm.var[...]
  want = model.resnet.encoder.stages[1].layers[0].shortcut.normalization.running_var.numpy()
  np.testing.assert_array_equal(stat, want)  # the running statistics are the checkpoint's


# --- names, dtypes, shards ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["vit", "dinov2_swiglu"])
def test_current_transformers_names(hf, tmp_path, case):
  """A state dict in transformers' 5.x names (q_proj, gate_proj/up_proj, vit.layers.N)."""
  torch, tr = hf
  if case == "vit":
    model = tr.ViTForImageClassification(tr.ViTConfig(**VIT, num_labels=5))
  else:
    model = tr.Dinov2ForImageClassification(tr.Dinov2Config(**DINO, use_swiglu_ffn=True, num_labels=5))
  model = _perturb(torch, model)
  _save_current_names(model, tmp_path)
  names = set(load_file(tmp_path / "model.safetensors"))
  assert any(".q_proj." in n for n in names) and not any("attention.attention" in n for n in names)
  _, units = HV.load_hf_vision_model(tmp_path)
  px = _pixels(torch, 32)
  with torch.no_grad():
    want = model(pixel_values=px).logits.numpy()
  _check(f"{case} (5.x names)", _ours(units, px), want)


@pytest.mark.parametrize("dtype,tag", [("float16", "F16"), ("bfloat16", "BF16")])
def test_half_precision_checkpoint_upcast_exactly(hf, tmp_path, dtype, tag):
  torch, tr = hf
  model = _perturb(torch, tr.ViTForImageClassification(tr.ViTConfig(**VIT, num_labels=5)))
  model.to(getattr(torch, dtype)).save_pretrained(tmp_path)
  with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
    assert f.get_slice("vit.layernorm.weight").get_dtype() == tag
  _, units = HV.load_hf_vision_model(tmp_path)
  model.float()  # the same (rounded) values in fp32
  kernel = model.vit.embeddings.patch_embeddings.projection.weight.detach().numpy()
  np.testing.assert_array_equal(units["embed"].patch_kernel[...], kernel.transpose(2, 3, 1, 0))
  assert units["embed"].patch_kernel[...].dtype == np.float32
  px = _pixels(torch, 32)
  with torch.no_grad():
    want = model(pixel_values=px).logits.numpy()
  _check(f"vit {tag} checkpoint", _ours(units, px), want)


def test_sharded_checkpoint(hf, tmp_path, vit_ckpt):
  torch, _ = hf
  _, model = vit_ckpt
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
  _, units = HV.load_hf_vision_model(tmp_path)
  px = _pixels(torch, 32)
  with torch.no_grad():
    want = model(pixel_values=px).logits.numpy()
  _check("vit sharded", _ours(units, px), want)


# --- bad checkpoints ------------------------------------------------------------------------


def _edit_tensors(path, edit):
  f = path / "model.safetensors"
  tensors = load_file(f)
  edit(tensors)
  save_file(tensors, f)
  return f


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("vit.layernorm.bias"), "missing tensor 'vit.layernorm.bias'"),
    (lambda t: t.update({"vit.extra.weight": np.zeros(3, np.float32)}), "unexpected tensor 'vit.extra.weight'"),
    (lambda t: t.update({"vit.layernorm.bias": np.zeros(31, np.float32)}),
     r"'vit.layernorm.bias' has shape \[31\], expected \[32\]"),
    (lambda t: t.update({"classifier.bias": np.zeros(4, np.float32)}),
     r"'classifier.bias' has shape \[4\], expected \[5\]"),
    (lambda t: t.update({"vit.layernorm.bias": np.full(32, np.nan, np.float32)}), "non-finite"),
], ids=["missing", "unexpected", "shape", "head_shape", "nan"])
def test_bad_tensors(vit_ckpt, tmp_path, edit, message):
  path = _copy(vit_ckpt[0], tmp_path)
  f = _edit_tensors(path, edit)
  with pytest.raises(HV.HFImportError, match=message) as e:
    HV.load_hf_vision_model(path)
  assert str(e.value).startswith(str(f))


def _edit_config(path, **changes):
  f = path / "config.json"
  hf = json.loads(f.read_text())
  hf.update(changes)
  f.write_text(json.dumps(hf))
  return f


@pytest.mark.parametrize("changes,message", [
    (dict(hidden_act="gelu_new"), "hidden_act 'gelu_new' is not supported"),
    (dict(num_channels=1), "num_channels 1 is not supported"),
    (dict(num_attention_heads=5), "not a multiple of num_attention_heads"),
    (dict(architectures=["ViTForMaskedImageModeling"]), "unknown or unsupported architectures"),
    (dict(hidden_size=None), "missing required key 'hidden_size'"),
    (dict(id2label={"0": "a", "1": "b"}), "id2label names 2 classes but the checkpoint's classifier has 5"),
])
def test_bad_config(vit_ckpt, tmp_path, changes, message):
  path = _copy(vit_ckpt[0], tmp_path)
  f = _edit_config(path, **changes)
  with pytest.raises(HV.HFImportError, match=message) as e:
    HV.load_hf_vision_model(path)
  assert str(e.value).startswith(str(f))


def test_other_architectures_refused(hf, tiny_hf, tmp_path, vit_ckpt):
  llama = tmp_path / "llama"
  llama.mkdir()
  (llama / "config.json").write_text(json.dumps(tiny_hf.tiny_config("llama")))
  with pytest.raises(HV.HFImportError, match="architecture LlamaForCausalLM is not a vit checkpoint "
                     r"\(supported: ViTForImageClassification, ViTModel\)") as e:
    HV.load_hf_vision_model(llama, expect_arch="vit")
  assert str(e.value).startswith(str(llama / "config.json"))
  with pytest.raises(HV.HFImportError, match="unknown or unsupported architectures"):
    HV.load_hf_vision_model(llama)
  # A ViT checkpoint is not a DINOv2 one; through the sheet, before its preprocessing.
  with pytest.raises(HV.HFImportError, match="architecture ViTForImageClassification is not a dinov2"):
    HV.load_hf_vision(vit_ckpt[0], _sheet(vit_ckpt[0], arch="dinov2"))
  _, tr = hf
  rn = tmp_path / "resnet"
  tr.ResNetForImageClassification(tr.ResNetConfig(**RESNET, num_labels=5)).save_pretrained(rn)
  with pytest.raises(HV.HFImportError, match="ResNetForImageClassification is not a vit checkpoint") as e:
    vit.load_pretrained(rn, _sheet(rn, arch="vit"))
  assert str(e.value).startswith(str(rn / "config.json"))


def test_image_size_not_multiple_of_patch(vit_ckpt):
  with pytest.raises(errors.ConfigError, match="not a multiple of the patch size"):
    HV.load_hf_vision_model(vit_ckpt[0], image=_image(36))


# --- the run sheet --------------------------------------------------------------------------


def test_load_from_sheet_with_checkpoint_preprocessing(hf, vit_ckpt, tmp_path, caplog):
  """vit.load_pretrained with configs/vision.py:smoke: the checkpoint's preprocessing, the
  sheet's augmentation; logits from stored uint8 images match HF's processor + model."""
  torch, tr = hf
  path, model = vit_ckpt
  path = _copy(path, tmp_path)
  with pytest.raises(HV.HFImportError, match="missing preprocessor_config.json") as e:
    vit.load_pretrained(path, _sheet(path))
  assert str(e.value).startswith(str(path / "preprocessor_config.json"))
  processor = tr.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                   image_std=[0.2, 0.3, 0.25])
  processor.save_pretrained(path)

  cfg, units = vit.load_pretrained(path, _sheet(path, **{"model.num_classes": 0}))
  assert cfg.image.preprocess == images.from_hf_preprocessor(path, image_size=32)
  assert cfg.image.preprocess.mean == pytest.approx((0.4, 0.5, 0.6))
  assert cfg.image.random_crop and cfg.image.flip  # the sheet's augmentation
  assert cfg.num_classes == 5
  stored = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  px = processor(images=list(stored), return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    want = model(pixel_values=px).logits.numpy()
  h = stored
  for unit in units.values():
    h = unit(h, vit.inference_context())
  _check("vit sheet (uint8 -> logits)", np.asarray(h), want)

  caplog.set_level(logging.INFO)
  sheet = _sheet(path)  # smoke: 4 classes, a new head
  cfg, units = vit.load_pretrained(path, sheet)
  assert cfg.num_classes == 4
  fresh = vit.build_units(cfg, sheet.seed)["head"].classifier.dense.kernel[...]
  np.testing.assert_array_equal(units["head"].classifier.dense.kernel[...], fresh)
  assert "deliberately unused" in caplog.text
