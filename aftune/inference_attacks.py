"""Dishonest serving: deviations from the committed served batch, run for real.

Each attack is a small dataclass with two hooks (both the identity in `Honest`):
  served(model) -> ServedModel    the weights really served, and the model hash the
                                  record claims for them
  generate(run, specs, params_list, frozen_list, prompts, **kw) -> GenerationResult
                                  how the provider generates; `run` is the real
                                  `generate.generate`. Attacks patch `generate`'s
                                  block functions / sampling for the call (`patched`).
`serve(model, prompts, settings, out_dir, key_path=, attack=)` runs the real
`inference.serve` with the attack in force: the recorder commits whatever the provider
really did, so the record is self-consistent (signed, every leaf and tensor matching)
and only the replay or the model check can show the deviation.
`DishonestInferenceProvider` opens cells as that provider would: it replays its own
deviation when it regenerates unstored outputs (I_A > 1), and reveals the weights it
served under the promised model's digests (or its own digests, or the promised weights).
Perturbations are deterministic (fixed PRNG seeds). docs/inference.md lists what the
verifier reports for each attack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aftune import attacks
from aftune import generate as gen_lib
from aftune import grid as grid_lib
from aftune import hashing
from aftune import inference
from aftune import inference_audit
from aftune import jobspec
from aftune import model as model_lib
from aftune import opening


@contextlib.contextmanager
def patched(**replacements: Callable):
  """Replaces functions of `aftune.generate` (block_prefill, sample, ...) inside the block."""
  old = {name: getattr(gen_lib, name) for name in replacements}
  try:
    for name, fn in replacements.items():
      setattr(gen_lib, name, fn)
    yield
  finally:
    for name, fn in old.items():
      setattr(gen_lib, name, fn)


def noise_like(x: jax.Array, scale: float, seed: int = 0) -> jax.Array:
  """scale * N(0, 1) of x's shape and dtype (deterministic in seed)."""
  return jnp.asarray(scale, x.dtype) * jax.random.normal(jax.random.key(seed), x.shape, x.dtype)


# ---- the attacks ------------------------------------------------------------------------


class Honest:
  """The honest server (the base class of every attack): serves what it promised, as agreed."""

  def served(self, model: inference.ServedModel) -> inference.ServedModel:
    return model

  def generate(self, run: Callable[..., gen_lib.GenerationResult], *args, **kwargs):
    return run(*args, **kwargs)


@dataclasses.dataclass
class OtherModel(Honest):
  """Serves noisy weights (all, or `leaf` of `block`) under their own or the promised hash."""
  scale: float = 1e-2
  block: int | None = None
  leaf: str | None = None
  claim_promised: bool = False
  seed: int = 0

  def served(self, model):
    trainable = [attacks.perturb(p, self.scale, self.seed + k, self.leaf)
                 if self.block in (None, k) else p for k, p in enumerate(model.blocked.trainable)]
    blocked = dataclasses.replace(model.blocked, trainable=trainable)
    claimed = (model.model_hash if self.claim_promised else
               hashing.hexdigest(jobspec.model_hash(blocked)))
    return dataclasses.replace(model, blocked=blocked, model_hash=claimed)


@dataclasses.dataclass
class EditedLayer(OtherModel):
  """Edits one parameter `leaf` of layer block `block` and claims the promised model hash."""
  block: int | None = 1
  leaf: str | None = "layer_1/mlp/down_proj/kernel"
  claim_promised: bool = True


@dataclasses.dataclass
class OtherArchitecture(Honest):
  """Serves the promised weights under other config fields (`changes`, e.g. bf16 compute)."""
  changes: tuple[tuple[str, Any], ...] = (("dtype", "bfloat16"),)

  def served(self, model):
    cfg = dataclasses.replace(model.model_cfg, **dict(self.changes))
    units = {name: model_lib.abstract_unit(cfg, name) for name in cfg.unit_names}
    blocked = grid_lib.split_into_blocks(cfg, units, len(model.blocked.specs[0].unit_names))
    blocked = dataclasses.replace(blocked, trainable=model.blocked.trainable,
                                  frozen=model.blocked.frozen)
    return dataclasses.replace(model, blocked=blocked, model_cfg=cfg)


@dataclasses.dataclass
class PerturbedActivation(Honest):
  """Adds scale * noise to block `block`'s output at step `step`; generation goes on from it."""
  block: int
  step: int
  scale: float = 1e-2
  seed: int = 0

  def generate(self, run, *args, **kwargs):
    prefill, decode = gen_lib.block_prefill, gen_lib.block_decode
    step = {"t": -1}  # the generation step block `block` is computing

    def edit(spec, out):
      x, cache = out
      if spec.index == self.block and step["t"] == self.step:
        x = x + noise_like(x, self.scale, self.seed)
      return x, cache

    def block_prefill(spec, *a, **kw):
      if spec.index == self.block:
        step["t"] = 0
      return edit(spec, prefill(spec, *a, **kw))

    def block_decode(spec, *a, **kw):
      if spec.index == self.block:
        step["t"] += 1
      return edit(spec, decode(spec, *a, **kw))

    with patched(block_prefill=block_prefill, block_decode=block_decode):
      return run(*args, **kwargs)


@dataclasses.dataclass
class SwappedToken(Honest):
  """Emits (sampled + 1) mod V in row `row` at step `step` and goes on with that token."""
  step: int
  row: int = 0

  def generate(self, run, *args, **kwargs):
    sample, calls = gen_lib.sample, itertools.count()

    def swapped(logits, key, *a, **kw):
      tokens = sample(logits, key, *a, **kw)
      if next(calls) == self.step:  # `sample` runs once per generation step
        tokens = tokens.at[self.row].set((tokens[self.row] + 1) % logits.shape[-1])
      return tokens

    with patched(sample=swapped):
      return run(*args, **kwargs)


@dataclasses.dataclass
class OtherSamplingKey(Honest):
  """Samples step `step` with a key not from the seed; commits it (or the agreed key)."""
  step: int
  commit_agreed_key: bool = False

  def generate(self, run, *args, **kwargs):
    sampling_key, sample, calls = gen_lib.sampling_key, gen_lib.sample, itertools.count()
    other = lambda key: jax.random.fold_in(key, 0xBAD)

    def key_fn(seed, batch_id, t):  # the key both sampling and the recorder see
      key = sampling_key(seed, batch_id, t)
      return other(key) if t == self.step else key

    def sample_fn(logits, key, *a, **kw):  # only sampling sees the other key
      return sample(logits, other(key) if next(calls) == self.step else key, *a, **kw)

    with (patched(sample=sample_fn) if self.commit_agreed_key else patched(sampling_key=key_fn)):
      return run(*args, **kwargs)


@dataclasses.dataclass
class Truncated(Honest):
  """Stops after `steps` generation steps (fewer than max_new_tokens) with rows unfinished."""
  steps: int

  def generate(self, run, specs, params_list, frozen_list, prompts, **kwargs):
    size = kwargs.get("max_total_len") or max(map(len, prompts)) + kwargs["max_new_tokens"]
    return run(specs, params_list, frozen_list, prompts,  # the agreed cache length, stopped early
               **{**kwargs, "max_new_tokens": self.steps, "max_total_len": size})


@dataclasses.dataclass
class OtherComposition(Honest):
  """Runs another batch ("reversed", + `extra` prompts, "solo") and commits the agreed rows."""
  kind: str = "extra"
  extra: tuple[tuple[int, ...], ...] = ()

  def generate(self, run, specs, params_list, frozen_list, prompts, *, observer=None, **kw):
    prompts = [list(p) for p in prompts]
    b = len(prompts)
    if self.kind == "reversed":
      runs = [(prompts[::-1], {i: b - 1 - i for i in range(b)})]
    elif self.kind == "extra":
      runs = [(prompts + [list(p) for p in self.extra], {i: i for i in range(b)})]
    elif self.kind == "solo":
      runs = [([p], {i: 0}) for i, p in enumerate(prompts)]
    else:
      raise ValueError(f"unknown composition {self.kind!r}: reversed, extra, solo")
    done = []
    for batch, rows in runs:
      trace = gen_lib.TraceCollector()
      res = run(specs, params_list, frozen_list, batch, observer=trace,  # its own cache length
                **{**kw, "max_total_len": None})
      done.append((res, trace.steps, rows))
    steps = {res.num_steps for res, _, _ in done}
    if len(steps) != 1:
      raise ValueError(f"the runs stopped after different step counts {sorted(steps)}")
    ids, mask = gen_lib.left_pad(prompts, kw.get("pad_id", 0))
    p = ids.shape[1]
    row_of = {i: (res, trace, j) for res, trace, rows in done for i, j in rows.items()}
    # Prefill outputs of the blocks before the final norm are [B, P, D]: a run with other
    # prompt widths has other columns; its real columns go right-aligned (left padding),
    # the padding columns it never computed are zeros.
    full_width = [not any("final_norm" in s.unit_names for s in specs[:k + 1])
                  for k in range(len(specs))]

    def agreed(t, k=None):  # block k's output (or the tokens) of the agreed batch at step t
      rows = []
      for i in range(b):
        _, trace, j = row_of[i]
        x = np.asarray(trace[t].tokens if k is None else trace[t].block_outputs[k])[j]
        if k is not None and t == 0 and full_width[k]:
          x = np.concatenate([np.zeros((max(p - x.shape[0], 0),) + x.shape[1:], x.dtype),
                              x[-p:]], axis=0)
        rows.append(x)
      return np.stack(rows)

    num_steps = steps.pop()
    for t in range(num_steps):
      outs = [jnp.asarray(agreed(t, k)) for k in range(len(specs))]
      if observer is not None:
        observer(t, [], outs, outs[-1], jnp.asarray(agreed(t)), done[0][1][t].key)
    token_array = np.stack([row_of[i][0].token_array[row_of[i][2]] for i in range(b)])
    max_new = kw["max_new_tokens"]
    return gen_lib.GenerationResult(
        [row_of[i][0].tokens[row_of[i][2]] for i in range(b)],
        [row_of[i][0].finish_reasons[row_of[i][2]] for i in range(b)], token_array, ids, mask,
        num_steps, kw.get("max_total_len") or p + max_new, sum(r.seconds for r, _, _ in done))


# ---- serving and opening as the dishonest provider ---------------------------------------


@contextlib.contextmanager
def serving(attack: Honest):
  """While inside, `generate.generate` (as `inference.serve` calls it) runs the attack."""
  run = gen_lib.generate

  def generate(*args, **kwargs):
    return attack.generate(run, *args, **kwargs)

  with patched(generate=generate):
    yield


def serve(model: inference.ServedModel, prompts_tokens: Sequence[Sequence[int]],
          settings: inference.ServeSettings, out_dir: str | Path, *, key_path: str | Path,
          attack: Honest | None = None) -> dict[str, Any]:
  """`inference.serve` by a provider that runs `attack` (see the module docstring)."""
  attack = attack or Honest()
  with serving(attack):
    return inference.serve(attack.served(model), prompts_tokens, settings, out_dir,
                           key_path=key_path)


def model_digests(model: inference.ServedModel) -> list:
  """The per-parameter digests an opening reveals for a model ([[path...], hex])."""
  return [[list(c), d.hex()] for c, d in
          hashing.pytree_leaf_hashes(jobspec.unit_tree(model.blocked))]


class DishonestInferenceProvider(inference_audit.InferenceProvider):
  """Opens the cells of a record served with `attack` the way its provider would.

  Args:
    record_dir: the record that `serve(promised, ..., attack=attack)` wrote.
    promised: the model the client was promised.
    attack: the provider's attack (regeneration replays it).
    digests: "promised" reveals the promised model's parameter digests (they hash to
      the claimed model hash), "served" those of the weights it served.
    weights: "served" reveals block k's served weights, "promised" the promised ones.
  """

  def __init__(self, record_dir: str | Path, promised: inference.ServedModel, attack: Honest,
               *, digests: str = "promised", weights: str = "served"):
    super().__init__(record_dir, attack.served(promised))
    if digests not in ("promised", "served") or weights not in ("promised", "served"):
      raise ValueError(f"digests / weights must be promised or served, got {digests}, {weights}")
    self.promised, self.attack = promised, attack
    self.reveal_digests, self.reveal_weights = digests, weights

  def _output(self, t: int, k: int) -> np.ndarray:
    with serving(self.attack):
      return super()._output(t, k)

  def open_cell(self, k: int, t: int):
    bundle = super().open_cell(k, t)
    if self.reveal_digests == "promised":
      bundle.manifest["model_digests"] = model_digests(self.promised)
    if self.reveal_weights == "promised":
      b = self.promised.blocked
      bundle.tensors.update(opening.flatten_tree(b.trainable[k], "params"))
      bundle.tensors.update(opening.flatten_tree(b.frozen[k], "frozen"))
    return bundle
