"""Phase 0: the job spec, one canonical document whose hash is the job id.

It binds the base model, the tokenizer, the dataset, every hyperparameter, the seed, the
audit grid, the compiled programs (StableHLO of every jitted block function for the
agreed shapes) and the environment a bitwise replay needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from aftune import provenance
from aftune.crypto import hashing
from aftune.crypto import merkle
from aftune.model import blocks as grid_lib
from aftune.model import family
from aftune.record import layout as trace
from aftune.train import job as job_lib
from aftune.train import multihost
from aftune.train import optim
from aftune.train import step as step_lib

FORMAT = "aftune-job/v1"
PyTree = Any


def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def unit_tree(blocked: grid_lib.BlockedParams, trainable: list[PyTree] | None = None) -> dict:
  """unit name -> all its parameters (trainable and frozen merged)."""
  trainable = blocked.trainable if trainable is None else trainable
  units = {}
  for t_block, f_block in zip(trainable, blocked.frozen):
    for name in f_block:
      units[name] = _deep_merge(f_block[name], t_block.get(name, {}))
  return units


def model_hash(blocked: grid_lib.BlockedParams, trainable: list[PyTree] | None = None) -> bytes:
  """Canonical hash of a model: per unit, trainable and frozen parameters together.

  It does not depend on B_L (how units are grouped), so the hash of a served model can
  be compared with the final model of any job. With several processes, each hashes the
  shards it holds (`multihost.global_digests`; on one process: `hashing.hash_pytree`).
  """
  return multihost.global_digests([("pytree", unit_tree(blocked, trainable))])[0]


def example_leaf(i: int, encoded: dict[str, np.ndarray]) -> bytes:
  """Merkle leaf of example i of the dataset: its tokenized arrays, as fed to the model."""
  example = {k: v[i] for k, v in encoded.items()}
  return merkle.leaf_hash("example", i, -1, hashing.hash_batch(example))


def dataset_root(encoded: dict[str, np.ndarray]) -> bytes:
  n = int(next(iter(encoded.values())).shape[0])
  tree = merkle.StreamingMerkle()
  for i in range(n):
    tree.append(example_leaf(i, encoded))
  return tree.root()


def file_hash(path: str | Path) -> bytes:
  return hashing.hash_bytes(b"aftune/v1/file", Path(path).read_bytes())


def _program_hash(text: str) -> str:
  return hashing.hexdigest(hashing.hash_bytes(b"aftune/v1/program", text.encode()))


def abstract(tree: PyTree) -> PyTree:
  """Shape-and-dtype stand-ins (no sharding), so a fingerprint is independent of placement."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def block_fingerprint(spec: grid_lib.BlockSpec, opt_cfg: optim.OptimConfig, params: PyTree,
                      frozen: PyTree, opt_state: PyTree, x_in: Any, batch: Any,
                      key: jax.Array, *, fns: step_lib.BlockFns | None = None
                      ) -> tuple[dict[str, str], Any, Any]:
  """Program hashes of one block's jitted functions (`fns`) for these shapes.

  Returns:
    ({name: hex}, abstract output boundary, abstract norm partials).
  """
  fns = fns or step_lib.default_fns()
  # Shapes and dtypes only: where the arrays live (their sharding) is not the program.
  params, frozen, opt_state, x_in, batch, key = abstract((params, frozen, opt_state, x_in, batch,
                                                           key))
  out = {f"block_fwd/{spec.index}": fns.fwd.lower(spec, params, frozen, x_in, batch,
                                                  key).as_text()}
  y, vjp, _, updates = jax.eval_shape(fns.fwd, spec, params, frozen, x_in, batch, key)
  g, _ = jax.eval_shape(fns.bwd, vjp, y)
  out[f"block_bwd/{spec.index}"] = fns.bwd.lower(vjp, y).as_text()
  out[f"block_sq_norms/{spec.index}"] = fns.sq_norms.lower(spec, g).as_text()
  norm = jax.ShapeDtypeStruct((), np.float32)
  out[f"block_update/{spec.index}"] = fns.update.lower(opt_cfg, params, opt_state, g,
                                                       norm, updates).as_text()
  return ({k: _program_hash(v) for k, v in out.items()}, y,
          jax.eval_shape(fns.sq_norms, spec, g))


def combine_fingerprint(partials: list[Any], *, fns: step_lib.BlockFns | None = None) -> str:
  fns = fns or step_lib.default_fns()
  return _program_hash(fns.combine.lower(partials).as_text())


def program_fingerprint(job: job_lib.Job, *, fns: step_lib.BlockFns | None = None) -> dict[str, str]:
  """BLAKE3 of the lowered StableHLO text of every jitted block function (agreed shapes)."""
  _, batch = job.batch(0)
  key = job.step_key(0)
  out: dict[str, str] = {}
  x = batch[family.of(job.model_cfg).INPUT_KEY]
  partials = []
  for spec, p, f, o in zip(job.blocked.specs, job.blocked.trainable, job.blocked.frozen,
                           job.init_opt_states()):
    hashes, x, part = block_fingerprint(spec, job.opt_cfg, p, f, o, x, batch, key, fns=fns)
    out.update(hashes)
    partials.append(part)
  out["combine_norms"] = combine_fingerprint(partials, fns=fns)
  return out


def hyperparameters(job: job_lib.Job) -> dict[str, Any]:
  """Text jobs add max_len and the chat template; an image job's preprocessing and
  augmentation are in its model config (`model.image`)."""
  c = job.config
  hp = {
      "model": job.model_cfg.to_dict(),
      "optimizer": job.opt_cfg.to_dict(),
      "batch_size": int(c.batch_size),
      "num_steps": job.num_steps,
      "num_samples": int(c.data.num_samples),
      "step_impl": c.step_impl,
  }
  if job.template is not None:
    hp.update(max_len=int(c.data.max_len), template=job.template.name)
  if job.mesh_spec is not None:  # reductions over sharded axes decide the bits
    hp["mesh"] = job.mesh_spec.to_dict()
  return json.loads(json.dumps(hp))  # tuples -> lists: canonical JSON has no tuples


def make_grid(job: job_lib.Job) -> trace.Grid:
  a = job.config.audit
  return trace.Grid(num_steps=job.num_steps, steps_per_block=int(a.steps_per_block),
                    num_layer_blocks=job.blocked.num_blocks, units_per_block=int(a.units_per_block),
                    checkpoint_interval=int(a.checkpoint_interval),
                    activation_interval=int(a.activation_interval),
                    num_units=len(family.of(job.model_cfg).unit_names(job.model_cfg)))


def build_job_spec(job: job_lib.Job) -> dict[str, Any]:
  """The canonical job spec document (its `hash_json` is the job id).

  Args:
    job: the built job.

  Returns:
    A JSON-able dict: model, tokenizer, data, hyperparameters, seed, grid, programs, env.
  """
  return {
      "format": FORMAT,
      "base_model_hash": hashing.hexdigest(model_hash(job.blocked)),
      "tokenizer_hash": (hashing.hexdigest(file_hash(job.tokenizer.path))
                         if job.tokenizer is not None else None),
      "dataset_root": hashing.hexdigest(dataset_root(job.encoded)),
      "num_examples": job.num_examples,
      "hyperparameters": hyperparameters(job),
      "seed": int(job.config.seed),
      "prng_impl": hashing.key_impl_name(job.root_key),
      "grid": make_grid(job).to_dict(),
      "program_fingerprint": program_fingerprint(job),
      "environment": provenance.environment_manifest(),
  }


def job_id(spec: dict[str, Any]) -> bytes:
  return hashing.hash_json(spec)
