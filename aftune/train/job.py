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

from aftune import errors
from aftune.data import chat
from aftune.data import encoding
from aftune.data import order
from aftune.data import records as records_lib
from aftune.data import tokenizer as tokenizer_lib
from aftune.model import blocks as grid
from aftune.model import family
from aftune.train import mesh as mesh_lib
from aftune.train import optim

PyTree = Any


@dataclasses.dataclass
class Job:
  """The static parts of a run plus its initial state."""
  config: ml_collections.ConfigDict
  model_cfg: Any  # the model family's config (hashable)
  opt_cfg: optim.OptimConfig
  blocked: grid.BlockedParams  # initial (base) parameters, cut into layer blocks
  encoded: dict[str, np.ndarray]  # the dataset as fed to the model: [N, ...] arrays per field
  tokenizer: tokenizer_lib.TextTokenizer | None  # text jobs
  template: chat.ChatTemplate | None  # text jobs
  num_steps: int
  root_key: jax.Array
  class_names: tuple[str, ...] = ()  # image jobs: label i is class_names[i]
  placement: Any = None  # mesh_lib.Placement of a sharded job (config.mesh); None: one device
  mesh_spec: Any = None  # the run sheet's mesh (mesh_lib.MeshSpec), placed or not

  @property
  def num_examples(self) -> int:
    return int(next(iter(self.encoded.values())).shape[0])

  @property
  def steps_per_block(self) -> int:
    return int(self.config.audit.steps_per_block)

  def init_opt_states(self) -> list[PyTree]:
    states = [optim.init_opt_state(self.opt_cfg, p) for p in self.blocked.trainable]
    return [self.placement.state(o) for o in states] if self.placement else states

  def place_state(self, trees: list[PyTree]) -> list[PyTree]:
    """Per-block parameters or optimizer states placed on the job's mesh (if any)."""
    return [self.placement.state(t) for t in trees] if self.placement else trees

  def example_indices(self, step: int) -> np.ndarray:
    """Which examples make up the batch of `step`: a pure function of (seed, N, step)."""
    return order.example_indices_for_step(self.config.seed, self.num_examples,
                                          self.config.batch_size, step)

  def batch(self, step: int) -> tuple[np.ndarray, dict[str, jax.Array]]:
    idx = self.example_indices(step)
    batch = {k: jnp.asarray(v) for k, v in order.make_batch(self.encoded, idx).items()}
    return idx, (self.placement.batch(batch) if self.placement else batch)

  def step_key(self, step: int) -> jax.Array:
    return step_key(int(self.config.seed), step)


def step_key(seed: int, step: int) -> jax.Array:
  """The committed per-step key: fold_in(key(seed), step); the verifier recomputes it."""
  return jax.random.fold_in(jax.random.key(seed), step)


def _optim_config(config: ml_collections.ConfigDict, num_steps: int) -> optim.OptimConfig:
  o = config.optim
  return optim.OptimConfig(
      name=o.name, learning_rate=float(o.learning_rate), momentum=float(o.momentum),
      weight_decay=float(o.weight_decay), schedule=o.schedule, warmup_steps=int(o.warmup_steps),
      total_steps=num_steps, end_lr_fraction=float(o.end_lr_fraction), clip_norm=float(o.clip_norm))


def _num_steps(config: ml_collections.ConfigDict, n: int) -> int:
  if config.num_steps:
    return int(config.num_steps)
  if config.num_epochs:
    return int(config.num_epochs * order.steps_per_epoch(n, config.batch_size))
  raise errors.ConfigError("set num_steps or num_epochs")


def place(job: Job, placed: bool = True) -> Job:
  """The job's base model placed on the run sheet's mesh (config.mesh), if it has one;
  `placed=False` only notes the mesh (what the client needs to compute the agreed fields,
  on any number of devices)."""
  spec = mesh_lib.spec_from_sheet(job.config)
  if spec is None:
    return job
  if not placed:
    return dataclasses.replace(job, mesh_spec=spec)
  placement = mesh_lib.Placement(
      spec, tensor_rules=getattr(family.of(job.model_cfg), "TENSOR_PARALLEL", ()))
  blocked = dataclasses.replace(job.blocked,
                                trainable=[placement.state(t) for t in job.blocked.trainable],
                                frozen=[placement.state(f) for f in job.blocked.frozen])
  return dataclasses.replace(job, blocked=blocked, placement=placement, mesh_spec=spec)


def build_job(config: ml_collections.ConfigDict, *, placed: bool = True) -> Job:
  """Loads model, data (and tokenizer) and derives everything the run depends on.

  Args:
    config: a `configs/finetune.py` (text) or `configs/vision.py` (images) config.
    placed: put a sharded job's arrays on its mesh (False: only note the mesh, e.g. for
      the agreed fields).

  Returns:
    The Job, with the base parameters cut into layer blocks of B_L units.
  """
  if config.model.dtype not in ("float32", "bfloat16"):
    raise errors.ConfigError(f"model.dtype must be float32 or bfloat16, got {config.model.dtype!r}")
  if config.step_impl not in ("blocked", "plain"):
    raise errors.ConfigError(f"step_impl must be blocked or plain, got {config.step_impl!r}")
  fam = family.get(config.model.arch)
  if fam.MODALITY == "image":
    return place(_build_image_job(config, fam), placed)
  hf_path = config.model.hf_path
  tok_path = config.data.tokenizer_path or (Path(hf_path) / "tokenizer.json" if hf_path else "")
  if not tok_path:
    raise errors.ConfigError("data.tokenizer_path is empty and there is no model.hf_path to take "
                             "it from")
  tokenizer = tokenizer_lib.load_tokenizer(tok_path)
  template = chat.get_template(config.data.template)
  tokenizer_lib.check_template(tokenizer, template)
  records = records_lib.load_jsonl(config.data.train_path)
  if config.data.num_samples:
    if config.data.num_samples > len(records):
      raise errors.ConfigError(f"data.num_samples={config.data.num_samples} but "
                               f"{config.data.train_path} holds {len(records)} records")
    records = records[:config.data.num_samples]
  encoded = encoding.encode_dataset(records, tokenizer, template, config.data.max_len)
  num_steps = _num_steps(config, int(encoded["tokens"].shape[0]))
  if hf_path:
    model_cfg, units = fam.load_pretrained(hf_path, config)
    if model_cfg.vocab_size < tokenizer.vocab_size:
      raise errors.ConfigError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the "
                               f"model {hf_path} only {model_cfg.vocab_size}")
  else:
    model_cfg = fam.config_from_sheet(config, tokenizer.vocab_size)
    units = fam.build_units(model_cfg, config.seed)
  blocked = grid.split_into_blocks(model_cfg, units, int(config.audit.units_per_block))
  opt_cfg = _optim_config(config, num_steps)
  optim.make_optimizer(opt_cfg)  # fail now on a bad optimizer name, not at step 0
  optim.make_schedule(opt_cfg)
  return place(Job(config=config, model_cfg=model_cfg, opt_cfg=opt_cfg, blocked=blocked,
                   encoded=encoded, tokenizer=tokenizer, template=template, num_steps=num_steps,
                   root_key=jax.random.key(config.seed)), placed)


def _build_image_job(config: ml_collections.ConfigDict, fam: Any) -> Job:
  """An image-classification job: the model (its config fixes the preprocessing), then the
  images prepared as that config says (`data/images.py`)."""
  from aftune.data import images as images_lib  # pylint: disable=g-import-not-at-top
  if config.model.hf_path:
    model_cfg, units = fam.load_pretrained(config.model.hf_path, config)
  else:
    model_cfg = fam.config_from_sheet(config)
    units = None
  data = images_lib.load_image_dataset(config.data.train_path, model_cfg.image.preprocess,
                                       num_classes=model_cfg.num_classes,
                                       num_samples=int(config.data.num_samples))
  encoded = {"image": data.images, "label": data.labels}
  num_steps = _num_steps(config, int(data.labels.shape[0]))
  if units is None:
    units = fam.build_units(model_cfg, config.seed)
  blocked = grid.split_into_blocks(model_cfg, units, int(config.audit.units_per_block))
  opt_cfg = _optim_config(config, num_steps)
  optim.make_optimizer(opt_cfg)
  optim.make_schedule(opt_cfg)
  return Job(config=config, model_cfg=model_cfg, opt_cfg=opt_cfg, blocked=blocked, encoded=encoded,
             tokenizer=None, template=None, num_steps=num_steps,
             root_key=jax.random.key(config.seed), class_names=data.class_names)


def count_params(tree: PyTree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
