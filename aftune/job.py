"""A fine-tuning job: everything a run is a pure function of, built from a config.

Training, the benchmark and the verifier all build the job the same way, so that the
model, the data encoding, the batch order and the optimizer they use are one thing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aftune import chat
from aftune import data as data_lib
from aftune import grid
from aftune import model as model_lib
from aftune import optim

PyTree = Any


class ConfigError(ValueError):
  """A config that cannot describe a job."""


@dataclasses.dataclass
class Job:
  """The static parts of a run plus its initial state."""
  config: ml_collections.ConfigDict
  model_cfg: model_lib.ModelConfig
  opt_cfg: optim.OptimConfig
  blocked: grid.BlockedParams  # initial (base) parameters, cut into layer blocks
  encoded: dict[str, np.ndarray]  # the tokenized dataset, [N, T] arrays
  tokenizer: data_lib.TextTokenizer
  template: chat.ChatTemplate
  num_steps: int
  root_key: jax.Array

  @property
  def num_examples(self) -> int:
    return int(self.encoded["tokens"].shape[0])

  @property
  def steps_per_block(self) -> int:
    return int(self.config.audit.steps_per_block)

  def init_opt_states(self) -> list[PyTree]:
    return [optim.init_opt_state(self.opt_cfg, p) for p in self.blocked.trainable]

  def example_indices(self, step: int) -> np.ndarray:
    """Which examples make up the batch of `step`: a pure function of (seed, N, step)."""
    return data_lib.example_indices_for_step(self.config.seed, self.num_examples,
                                             self.config.batch_size, step)

  def batch(self, step: int) -> tuple[np.ndarray, dict[str, jax.Array]]:
    idx = self.example_indices(step)
    return idx, {k: jnp.asarray(v) for k, v in data_lib.make_batch(self.encoded, idx).items()}

  def step_key(self, step: int) -> jax.Array:
    return step_key(int(self.config.seed), step)


def step_key(seed: int, step: int) -> jax.Array:
  """The committed per-step key: fold_in(key(seed), step); the verifier recomputes it."""
  return jax.random.fold_in(jax.random.key(seed), step)


def _model_config(config: ml_collections.ConfigDict, vocab_size: int) -> model_lib.ModelConfig:
  m = config.model
  lora = None
  if config.lora.enabled:
    lora = model_lib.LoRAConfig(rank=int(config.lora.rank), alpha=float(config.lora.alpha),
                                targets=tuple(config.lora.targets))
  arch = m.arch
  if arch not in ("llama", "qwen2", "qwen3"):
    raise ConfigError(f"model.arch must be llama, qwen2 or qwen3, got {arch!r}")
  return model_lib.ModelConfig(
      vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
      head_dim=m.head_dim or None, arch=arch, rope_theta=m.rope_theta,
      tie_embeddings=m.tie_embeddings, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
      dtype=m.dtype, dropout_rate=m.dropout_rate, lora=lora)


def _optim_config(config: ml_collections.ConfigDict, num_steps: int) -> optim.OptimConfig:
  o = config.optim
  return optim.OptimConfig(
      name=o.name, learning_rate=float(o.learning_rate), momentum=float(o.momentum),
      weight_decay=float(o.weight_decay), schedule=o.schedule, warmup_steps=int(o.warmup_steps),
      total_steps=num_steps, end_lr_fraction=float(o.end_lr_fraction), clip_norm=float(o.clip_norm))


def build_job(config: ml_collections.ConfigDict) -> Job:
  """Loads model, tokenizer and data and derives everything the run depends on.

  Args:
    config: a `configs/finetune.py` config.

  Returns:
    The Job, with the base parameters cut into layer blocks of B_L units.
  """
  hf_path = config.model.hf_path
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"model.dtype must be float32 or bfloat16, got {config.model.dtype!r}")
  if config.step_impl not in ("blocked", "plain"):
    raise ConfigError(f"step_impl must be blocked or plain, got {config.step_impl!r}")
  tok_path = config.data.tokenizer_path or (Path(hf_path) / "tokenizer.json" if hf_path else "")
  if not tok_path:
    raise ConfigError("data.tokenizer_path is empty and there is no model.hf_path to take it from")
  tokenizer = data_lib.load_tokenizer(tok_path)
  template = chat.get_template(config.data.template)
  data_lib.check_template(tokenizer, template)
  records = data_lib.load_jsonl(config.data.train_path)
  if config.data.num_samples:
    if config.data.num_samples > len(records):
      raise ConfigError(f"data.num_samples={config.data.num_samples} but {config.data.train_path} "
                        f"holds {len(records)} records")
    records = records[:config.data.num_samples]
  encoded = data_lib.encode_dataset(records, tokenizer, template, config.data.max_len)
  n = int(encoded["tokens"].shape[0])
  if config.num_steps:
    num_steps = int(config.num_steps)
  elif config.num_epochs:
    num_steps = int(config.num_epochs * data_lib.steps_per_epoch(n, config.batch_size))
  else:
    raise ConfigError("set num_steps or num_epochs")

  if hf_path:
    from aftune import hf_import  # pylint: disable=g-import-not-at-top
    lora = None
    if config.lora.enabled:
      lora = model_lib.LoRAConfig(rank=int(config.lora.rank), alpha=float(config.lora.alpha),
                                  targets=tuple(config.lora.targets))
    model_cfg, units = hf_import.load_hf_model(
        hf_path, dtype=config.model.dtype, lora=lora, dropout_rate=config.model.dropout_rate,
        untie_embeddings=config.model.untie_embeddings, seed=config.seed)
    if model_cfg.vocab_size < tokenizer.vocab_size:
      raise ConfigError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model "
                        f"{hf_path} only {model_cfg.vocab_size}")
  else:
    model_cfg = _model_config(config, tokenizer.vocab_size)
    units = model_lib.build_units(model_cfg, config.seed)
  blocked = grid.split_into_blocks(model_cfg, units, int(config.audit.units_per_block))
  opt_cfg = _optim_config(config, num_steps)
  optim.make_optimizer(opt_cfg)  # fail now on a bad optimizer name, not at step 0
  optim.make_schedule(opt_cfg)
  return Job(config=config, model_cfg=model_cfg, opt_cfg=opt_cfg, blocked=blocked, encoded=encoded,
             tokenizer=tokenizer, template=template, num_steps=num_steps,
             root_key=jax.random.key(config.seed))


def count_params(tree: PyTree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
