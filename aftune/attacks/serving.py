"""Dishonest serving: deviations from the committed served batch, on the `generate.ServeHooks` protocol.

Each attack is a small dataclass overriding the hooks it needs of `generate.Honest`:
  served(model)                  the weights really served, and the model hash claimed
  generate(run, *args, **kw)     how the batch is run (`run` is `generate.generate`)
  block_out(t, k, x)             block k's output at generation step t
  sample_keys(t, key)            (key sampled with, key committed)
  tokens(t, tokens, vocab)       the tokens emitted at step t
`serving.serve(model, prompts, settings, out_dir, key_path=, hooks=attack)` runs the real
server with the attack in force: the recorder commits whatever the provider really
did, so the record is self-consistent (signed, every leaf and tensor matching) and only
the replay or the model check can show the deviation. `DishonestInferenceProvider`
opens cells as that provider would: it replays its own deviation when it regenerates
unstored outputs (I_A > 1), and reveals the weights it served under the promised
model's digests (or its own digests, or the promised weights). Perturbations are
deterministic (fixed PRNG seeds). docs/inference.md lists what the verifier reports for
each attack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aftune.attacks import training
from aftune.audit import infer_provider
from aftune.audit import names
from aftune.audit import provider as provider_lib
from aftune.crypto import hashing
from aftune.infer import generate as gen_lib
from aftune.infer import serving
from aftune.model import blocks as grid_lib
from aftune.model import family
from aftune.record import jobspec


def noise_like(x: jax.Array, scale: float, seed: int = 0) -> jax.Array:
  """scale * N(0, 1) of x's shape and dtype (deterministic in seed)."""
  return jnp.asarray(scale, x.dtype) * jax.random.normal(jax.random.key(seed), x.shape, x.dtype)


# ---- the attacks ------------------------------------------------------------------------


@dataclasses.dataclass
class OtherModel(gen_lib.Honest):
  """Serves noisy weights (all, or `leaf` of `block`) under their own or the promised hash."""
  scale: float = 1e-2
  block: int | None = None
  leaf: str | None = None
  claim_promised: bool = False
  seed: int = 0

  def served(self, model):
    trainable = [training.perturb(p, self.scale, self.seed + k, self.leaf)
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
class OtherArchitecture(gen_lib.Honest):
  """Serves the promised weights under other config fields (`changes`, e.g. bf16 compute)."""
  changes: tuple[tuple[str, Any], ...] = (("dtype", "bfloat16"),)

  def served(self, model):
    cfg = dataclasses.replace(model.model_cfg, **dict(self.changes))
    fam = family.of(cfg)
    units = {name: fam.abstract_unit(cfg, name) for name in fam.unit_names(cfg)}
    blocked = grid_lib.split_into_blocks(cfg, units, len(model.blocked.specs[0].unit_names))
    blocked = dataclasses.replace(blocked, trainable=model.blocked.trainable,
                                  frozen=model.blocked.frozen)
    return dataclasses.replace(model, blocked=blocked, model_cfg=cfg)


@dataclasses.dataclass
class PerturbedActivation(gen_lib.Honest):
  """Adds scale * noise to block `block`'s output at step `step`; generation goes on from it."""
  block: int
  step: int
  scale: float = 1e-2
  seed: int = 0

  def block_out(self, t, k, x):
    if (t, k) == (self.step, self.block):
      x = x + noise_like(x, self.scale, self.seed)
    return x


@dataclasses.dataclass
class SwappedToken(gen_lib.Honest):
  """Emits (sampled + 1) mod V in row `row` at step `step` and goes on with that token."""
  step: int
  row: int = 0

  def tokens(self, t, tokens_B, vocab_size):
    if t == self.step:
      tokens_B = np.array(tokens_B)
      tokens_B[self.row] = (tokens_B[self.row] + 1) % vocab_size
    return tokens_B


@dataclasses.dataclass
class OtherSamplingKey(gen_lib.Honest):
  """Samples step `step` with a key not from the seed; commits it (or the agreed key)."""
  step: int
  commit_agreed_key: bool = False

  def sample_keys(self, t, key):
    if t != self.step:
      return key, key
    other = jax.random.fold_in(key, 0xBAD)
    return other, (key if self.commit_agreed_key else other)


@dataclasses.dataclass
class Truncated(gen_lib.Honest):
  """Stops after `steps` generation steps (fewer than max_new_tokens) with rows unfinished."""
  steps: int

  def generate(self, run, specs, params_list, frozen_list, prompts, **kwargs):
    size = kwargs.get("max_total_len") or max(map(len, prompts)) + kwargs["max_new_tokens"]
    return run(specs, params_list, frozen_list, prompts,  # the agreed cache length, stopped early
               **{**kwargs, "max_new_tokens": self.steps, "max_total_len": size})


@dataclasses.dataclass
class OtherComposition(gen_lib.Honest):
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
      width = len(max(batch, key=len))
      done.append((res, trace.steps, rows, width))
    steps = {res.num_steps for res, _, _, _ in done}
    if len(steps) != 1:
      raise ValueError(f"the runs stopped after different step counts {sorted(steps)}")
    ids, mask = gen_lib.left_pad(prompts, kw.get("pad_id", 0))
    p = ids.shape[1]
    row_of = {i: (res, trace, j, width) for res, trace, rows, width in done
              for i, j in rows.items()}

    def agreed(t, k=None):  # block k's output (or the tokens) of the agreed batch at step t
      rows = []
      for i in range(b):
        _, trace, j, width = row_of[i]
        out = None if k is None else np.asarray(trace[t].block_outputs[k])
        x = np.asarray(trace[t].tokens)[j] if k is None else out[j]
        # Prefill outputs that keep every prompt column ([B, P, D]: the blocks before the
        # model keeps only the last position) have other columns in a run with other
        # prompt widths: its real columns go right-aligned (left padding), the padding
        # columns it never computed are zeros.
        if k is not None and t == 0 and out.ndim == 3 and out.shape[1] == width and width > 1:
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
        num_steps, kw.get("max_total_len") or p + max_new, sum(r.seconds for r, _, _, _ in done))


# ---- serving and opening as the dishonest provider ---------------------------------------


def serve(model: serving.ServedModel, prompts_tokens: Sequence[Sequence[int]],
          settings: serving.ServeSettings, out_dir: str | Path, *, key_path: str | Path,
          attack: gen_lib.ServeHooks | None = None) -> dict[str, Any]:
  """`serving.serve` by a provider that runs `attack` (see the module docstring)."""
  return serving.serve(model, prompts_tokens, settings, out_dir, key_path=key_path, hooks=attack)


class DishonestInferenceProvider(infer_provider.InferenceProvider):
  """Opens the cells of a record served with `attack` the way its provider would.

  Args:
    record_dir: the record that `serve(promised, ..., attack=attack)` wrote.
    promised: the model the client was promised.
    attack: the provider's attack (regeneration replays it).
    digests: "promised" reveals the promised model's parameter digests (they hash to
      the claimed model hash), "served" those of the weights it served.
    weights: "served" reveals block k's served weights, "promised" the promised ones.
  """

  def __init__(self, record_dir: str | Path, promised: serving.ServedModel,
               attack: gen_lib.ServeHooks, *, digests: str = "promised", weights: str = "served"):
    super().__init__(record_dir, attack.served(promised), hooks=attack)
    if digests not in ("promised", "served") or weights not in ("promised", "served"):
      raise ValueError(f"digests / weights must be promised or served, got {digests}, {weights}")
    self.promised, self.attack = promised, attack
    self.reveal_digests, self.reveal_weights = digests, weights

  def open_cell(self, k: int, t: int):
    bundle = super().open_cell(k, t)
    if self.reveal_digests == "promised":
      bundle.manifest["model_digests"] = provider_lib.model_digests(self.promised.blocked)
    if self.reveal_weights == "promised":
      b = self.promised.blocked
      bundle.tensors.update(names.flatten_tree(b.trainable[k], names.PARAMS))
      bundle.tensors.update(names.flatten_tree(b.frozen[k], names.FROZEN))
    return bundle
