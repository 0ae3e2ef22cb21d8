"""Audited fine-tuning run sheets.

Run (CPU, about two minutes on 2 cores; the loss falls from ~7 to below 2):

  python -m experiments.finetune --config configs/finetune.py:tiny --workdir /tmp/aftune_tiny

Variants:
  smoke      the tiny model shrunk to run in seconds (2 layers, 12 steps of batch 4): what the
             tests, CI and `scripts/demo.sh --quick` run; the same code as every other sheet.
  tiny       random-init 4-layer decoder on the built-in instruction data (data/default).
  tiny_fsdp  tiny, FSDP over 4 CPU devices (docs/sharding.md).
  small50m   49.2M-parameter decoder on the same data: the benchmark config.
  llama3_8b  the paper's Llama-3.1-8B-Instruct setting; set --config.model.hf_path.
  qwen3_14b  the paper's Qwen3-14B setting; set --config.model.hf_path.
  llama3_8b_2hosts, qwen3_14b_2hosts   the same on 2 hosts x 8 GPUs (jax.distributed).

Override any field: --config.optim.learning_rate=3e-4 --config.audit.steps_per_block=4
"""

import ml_collections

from aftune.data import defaults


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # root of every random choice: init, LoRA init, batch order, dropout keys

  c.model = ml_collections.ConfigDict()
  c.model.hf_path = ""  # local Hugging Face checkpoint dir; "" builds a random-init model
  c.model.hidden_size = 128  # the fields below only apply without hf_path
  c.model.intermediate_size = 384
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 0  # 0: hidden_size // num_heads
  c.model.rope_theta = 10000.0
  c.model.tie_embeddings = False
  c.model.arch = "llama"  # llama | qwen2 (qkv bias) | qwen3 (q/k norm); random-init only
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay fp32)
  c.model.dropout_rate = 0.0  # residual dropout, keyed by fold_in(root, step)
  c.model.untie_embeddings = False  # HF import: copy tied embeddings into lm_head (full FT)

  c.lora = ml_collections.ConfigDict()
  c.lora.enabled = False  # False: full fine-tuning
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.targets = ("q_proj", "v_proj")

  c.data = ml_collections.ConfigDict()
  c.data.train_path = str(defaults.DEFAULT_TRAIN_PATH)  # JSONL, Alpaca or chat records
  c.data.tokenizer_path = str(defaults.DEFAULT_TOKENIZER_PATH)  # tokenizer.json
  c.data.template = "aftune"  # chat template: aftune | llama3 | chatml
  c.data.max_len = 64  # tokens per example after padding/truncation
  c.data.num_samples = 0  # use the first N records; 0: all

  c.batch_size = 16
  c.num_steps = 300  # optimizer steps; 0: use num_epochs
  c.num_epochs = 0.0

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"  # sgd | adamw
  c.optim.learning_rate = 3e-3
  c.optim.momentum = 0.0  # sgd only
  c.optim.weight_decay = 0.0
  c.optim.schedule = "cosine"  # constant | cosine | linear
  c.optim.warmup_steps = 20
  c.optim.end_lr_fraction = 0.1
  c.optim.clip_norm = 1.0  # global-norm clipping; 0 disables

  c.audit = ml_collections.ConfigDict()
  c.audit.steps_per_block = 8  # B_S: optimizer steps per step block
  c.audit.units_per_block = 2  # B_L: consecutive units per layer block
  c.audit.checkpoint_interval = 8  # I_C: store full state every I_C step blocks
  c.audit.activation_interval = 1  # I_A: store boundary tensors every I_A layer blocks
  c.audit.provider_key = ""  # Ed25519 PEM signing the commitment; "": <workdir>/provider_key.pem
  c.record = True  # write the committed trace (needs step_impl=blocked)
  c.step_impl = "blocked"  # blocked (auditable) | plain (single jit, unaudited baseline)

  c.log_every = 10  # steps between progress lines and metrics.jsonl rows

  c.platform = ml_collections.ConfigDict()
  # XLA:CPU's intra-op thread pool (PJRT_NPROC): it decides the bits of CPU reductions and
  # is committed in the job spec; every replay (provider, verifier) sets the same. 0: as
  # the process starts (PJRT_NPROC, else the visible cores).
  c.platform.intra_op_threads = 0
  # GPU (aftune/platform_flags.py): deterministic ops, and how autotuning picks kernels:
  # default | off | dump:PATH (the recording run) | load:PATH (replays; the file is committed).
  c.platform.gpu_deterministic = False
  c.platform.gpu_autotune = "default"

  # Sharding (aftune/train/mesh.py, docs/sharding.md): a (data, fsdp) mesh; (1, 1): one device.
  # On the CPU, the trainer forces that many host devices before JAX starts.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, 1)
  c.mesh.axes = ("data", "fsdp")
  c.mesh.min_shard_elems = 16384  # smaller leaves are replicated (64 KiB of float32: the
  # larger ones hash in the tree form, each host its own rows; docs/hashing.md)

  if variant == "tiny":
    pass
  elif variant == "smoke":
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 2
    c.model.num_heads, c.model.num_kv_heads = 4, 2
    c.data.max_len, c.data.num_samples = 32, 64
    c.batch_size, c.num_steps, c.log_every = 4, 12, 4
    c.audit.steps_per_block, c.audit.checkpoint_interval = 2, 2
    c.optim.warmup_steps = 2
  elif variant == "tiny_fsdp":
    c.mesh.shape = (1, 4)  # FSDP over 4 CPU devices: parameters and optimizer state sharded
    # Every state stored: a run over several processes is opened without regeneration
    # (a replay is bitwise only over the same processes; docs/sharding.md).
    c.audit.checkpoint_interval = 1
  elif variant == "small50m":
    c.model.hidden_size = 512
    c.model.intermediate_size = 1408
    c.model.num_layers = 15  # 49.2M parameters with the default 1024-token vocabulary
    c.model.num_heads = 8
    c.model.num_kv_heads = 8
    c.batch_size = 16
    c.data.max_len = 128
    c.optim.learning_rate = 1e-3
  elif variant in ("llama3_8b", "qwen3_14b", "llama3_8b_2hosts", "qwen3_14b_2hosts"):
    # The paper's setting: batch 16, 128 tokens, 2048 samples, SGD lr 1e-5, LoRA r=64 alpha=16 on q/v.
    c.model.hf_path = ""  # REQUIRED: e.g. /models/Meta-Llama-3.1-8B-Instruct
    c.model.dtype = "bfloat16"
    c.data.template = "llama3" if variant.startswith("llama3_8b") else "chatml"
    c.data.tokenizer_path = ""  # "": the checkpoint's tokenizer.json
    c.data.max_len = 128
    c.data.num_samples = 2048
    c.batch_size = 16
    c.num_steps = 0
    c.num_epochs = 1.0
    c.lora.enabled = True
    c.lora.rank = 64
    c.lora.alpha = 16.0
    c.optim.name = "sgd"
    c.optim.learning_rate = 1e-5
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.platform.gpu_deterministic = True  # meant for a GPU: no atomics (docs/determinism.md)
    c.optim.clip_norm = 0.0
    c.audit.units_per_block = 4
    # One 8-GPU host: FSDP over 8 (--config.mesh.shape=(2,4) mixes data parallelism,
    # (1,4,2) tensor parallelism).
    c.mesh.shape = (1, 8)
    if variant.endswith("_2hosts"):
      # 2 hosts x 8 GPUs, one process each (--coordinator/--num_processes/--process_id):
      # data parallel across the hosts (the first mesh axis is the process axis, so only the
      # gradient reduction crosses the network), FSDP over 4 and tensor parallel over 2
      # inside each host; every state stored (I_C = 1), since a multi-process run is opened
      # without regeneration (docs/sharding.md).
      c.mesh.shape = (2, 4, 2)
      c.audit.checkpoint_interval = 1
  else:
    raise ValueError(f"unknown variant {variant!r}: smoke, tiny, tiny_fsdp, small50m, llama3_8b, "
                     "qwen3_14b, llama3_8b_2hosts, qwen3_14b_2hosts")
  return c
