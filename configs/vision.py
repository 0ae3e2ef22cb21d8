"""Audited image-classification fine-tuning run sheets (ViT, DINOv2, ResNet).

Run (CPU, a few minutes on 2 cores; the loss falls from ~1.4 towards 0.3):

  python -m experiments.finetune --config configs/vision.py:vit_tiny --workdir /tmp/aftune_vit

Variants:
  vit_tiny      random-init ViT (4 layers, width 64) on the built-in tiny image set
                (data/tiny_images: 4 classes x 96 images, 40x40, made by
                scripts/make_tiny_images.py): the CPU default.
  smoke         vit_tiny shrunk to run in seconds: what the tests and CI run.
  dinov2_smoke  the DINOv2 variant of smoke: layer scale, 2 register tokens, SwiGLU MLP,
                the CLS ++ mean-patch head.
  resnet_smoke  a two-stage bottleneck ResNet with BatchNorm (its running statistics train
                with the parameters and are committed with them).
  vit_50m       a ViT of ~50M parameters on the tiny set at 32x32 (patch 4): the benchmark.
  vit_large     the paper's ViT-Large (google/vit-large-patch16-224) on mini-ImageNet, 224x224;
                set --config.model.hf_path and --config.data.train_path.
  dinov2_giant  the paper's DINOv2-giant (facebook/dinov2-giant, a new 100-class head),
                B_S=8, B_L=8, I_C=8; set model.hf_path and data.train_path.
  resnet152     the earlier version's ResNet-152 (microsoft/resnet-152); set the same.

data.train_path is a class-folder tree (root/<class>/*.png|jpg) or the Hugging Face parquet
layout (as `timm/mini-imagenet` ships it: image bytes + label), e.g. a local copy of
mini-ImageNet's train split. With model.hf_path, the preprocessing is the checkpoint's
preprocessor_config.json (data.preprocess.from_checkpoint); data.preprocess.image_size != 0
fine-tunes at another resolution (ViT/DINOv2 resample their position embeddings).
"""

import ml_collections

from aftune.data import tiny_images


def get_config(variant: str = "vit_tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # root of every random choice: init, new heads, batch order, augmentation

  c.model = ml_collections.ConfigDict()
  c.model.arch = "vit"  # vit | dinov2 | resnet
  c.model.hf_path = ""  # local Hugging Face checkpoint dir; "" builds a random-init model
  c.model.num_classes = 4  # with hf_path: 0 keeps the checkpoint's head, else a new head
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay fp32)
  # ViT / DINOv2 (random init only)
  c.model.hidden_size = 64
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.intermediate_size = 128
  c.model.patch_size = 8
  c.model.swiglu = False  # DINOv2-giant's MLP
  c.model.num_register_tokens = 0  # DINOv2 with registers
  # ResNet (random init only)
  c.model.embedding_size = 16
  c.model.hidden_sizes = (32, 64)
  c.model.depths = (1, 1)
  c.model.layer_type = "bottleneck"

  c.data = ml_collections.ConfigDict()
  c.data.train_path = str(tiny_images.DEFAULT_IMAGES_PATH)
  c.data.num_samples = 0  # use the first N examples; 0: all
  c.data.preprocess = ml_collections.ConfigDict()
  c.data.preprocess.from_checkpoint = False  # with hf_path: the checkpoint's preprocessor_config.json
  c.data.preprocess.image_size = 32  # the model's input (in-graph crop)
  c.data.preprocess.stored_size = 40  # images are stored (and committed) at this size
  c.data.preprocess.resize = "exact"  # exact | shortest_edge (then a center crop to stored_size)
  c.data.preprocess.resize_size = 0  # shortest_edge target; 0: stored_size
  c.data.preprocess.resample = "bilinear"
  c.data.preprocess.mean = (0.5, 0.5, 0.5)
  c.data.preprocess.std = (0.5, 0.5, 0.5)
  c.data.preprocess.rescale = 1 / 255
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.random_crop = True  # keyed by the committed step key: a replay redraws it
  c.data.augment.crop_padding = 0
  c.data.augment.flip = True

  c.batch_size = 32
  c.num_steps = 800
  c.num_epochs = 0.0

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.learning_rate = 2e-3
  c.optim.momentum = 0.0
  c.optim.weight_decay = 0.01
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 10
  c.optim.end_lr_fraction = 0.1
  c.optim.clip_norm = 1.0

  c.audit = ml_collections.ConfigDict()
  c.audit.steps_per_block = 8  # B_S
  c.audit.units_per_block = 2  # B_L
  c.audit.checkpoint_interval = 8  # I_C
  c.audit.activation_interval = 1  # I_A
  c.audit.provider_key = ""
  c.record = True
  c.step_impl = "blocked"
  c.log_every = 10

  c.platform = ml_collections.ConfigDict()
  c.platform.intra_op_threads = 0
  c.platform.gpu_deterministic = False
  c.platform.gpu_autotune = "default"

  if variant == "vit_tiny":
    pass
  elif variant in ("smoke", "dinov2_smoke", "resnet_smoke"):
    c.model.hidden_size, c.model.num_layers, c.model.intermediate_size = 32, 2, 64
    c.batch_size, c.num_steps, c.log_every = 8, 8, 4
    c.audit.steps_per_block, c.audit.checkpoint_interval = 2, 2
    c.optim.warmup_steps = 2
    if variant == "dinov2_smoke":
      c.model.arch = "dinov2"
      c.model.swiglu, c.model.num_register_tokens = True, 2
    elif variant == "resnet_smoke":
      c.model.arch = "resnet"
      c.data.augment.crop_padding = 2
  elif variant == "vit_50m":
    c.model.hidden_size, c.model.num_layers, c.model.num_heads = 512, 16, 8
    c.model.intermediate_size, c.model.patch_size = 2048, 4
    c.batch_size = 16
    c.optim.learning_rate = 3e-4
  elif variant in ("vit_large", "dinov2_giant", "resnet152"):
    # The paper's vision setting: mini-ImageNet (100 classes) at 224x224.
    c.model.arch = {"vit_large": "vit", "dinov2_giant": "dinov2", "resnet152": "resnet"}[variant]
    c.model.hf_path = ""  # REQUIRED: e.g. /models/vit-large-patch16-224
    c.model.num_classes = 100
    c.model.dtype = "bfloat16"
    c.data.train_path = ""  # REQUIRED: e.g. /data/mini-imagenet/data (parquet) or a class tree
    c.data.preprocess.from_checkpoint = True
    c.data.preprocess.image_size = 224
    c.data.augment.crop_padding = 16 if variant == "vit_large" else 0  # ViT stores 224: pad-crop
    c.batch_size = 16
    c.num_steps = 0
    c.num_epochs = 1.0
    c.optim.name = "sgd"
    c.optim.learning_rate = 1e-3
    c.optim.momentum = 0.9
    c.optim.weight_decay = 0.0
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.clip_norm = 0.0
    c.audit.units_per_block = 8
    c.platform.gpu_deterministic = True
  else:
    raise ValueError(f"unknown variant {variant!r}: vit_tiny, smoke, dinov2_smoke, resnet_smoke, "
                     "vit_50m, vit_large, dinov2_giant, resnet152")
  return c
