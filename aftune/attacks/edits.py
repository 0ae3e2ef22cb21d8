"""The paper's edits, run for real: how small a change flips a model's yes/no answer.

Tolerance mode accepts a replay within a per-kind relative error (`core.TOLERANCES`:
max|a - b| / max|b|, per tensor). These attacks search for the smallest edit that still
changes an answer, measure it in the verifier's own metric and set it beside the
threshold and beside the honest noise of another XLA program of the same math
(`honest_noise`). An edit under its threshold is a finding: tolerance mode cannot tell it
from round-off. The paper's attacks minimise L2 sizes; the backdoor and the activation
attack also have an L-inf variant, since L-inf is what the verifier thresholds (it finds
edits several times smaller in that metric).

  yes_no_margin(blocked, ids, yes, no)     logit(yes) - logit(no) at the last prompt position
  weight_backdoor(blocked, block=k, ...)   a delta over every parameter of layer block k
                                           (trainable and frozen), by Adam with an L2
                                           penalty or under an L-inf budget: the trigger
                                           prompt's answer flips, the clean one's stays
  rank_one_edit(blocked, layer=i, ...)     ROME/BadEdit: W' = W + k u^T / (k.k) on layer i's
                                           mlp.down_proj.kernel
  pgd_activation(blocked, block=k, ...)    PGD (L2 or L-inf budget) on the tensor leaving
                                           block k at the prompt's last position (an
                                           inference-time attack)
  honest_noise(job)                        blocked vs single-jit programs of the same math
  success_table(blocked, tokenizer, ...)   all of the above as rows

Every answer is decided by the served programs: the prompt (batch 1, no padding) runs
through `generate.GenFns.prefill` block by block, as `generate.generate` serves it, and a
perturbed activation is added where `generate.ServeHooks.block_out` would add it. The
optimisers differentiate the same per-block math (`generate.block_prefill`) jitted as
one program; their round-off is kept away from the decision by `min_margin`.

An answer is the sign of the margin logit(yes) - logit(no) of the answers' first tokens,
not the greedy token: a small model need not emit either (the tiny run sheet's model
answers the default question with "1"), and "the clean prompt keeps its answer" means
its margin keeps its sign, not that its generation is unchanged.

The rank-one edit reads a decoder layer's internals (the Llama family's `DecoderLayer`);
the other attacks only use the block functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from aftune.audit import core
from aftune.data import encoding
from aftune.data import records as records_lib
from aftune.infer import generate as gen_lib
from aftune.model import blocks as grid_lib
from aftune.model import family
from aftune.model import llama
from aftune.train import step as step_lib

PyTree = Any
Specs = tuple[grid_lib.BlockSpec, ...]

DEFAULT_QUESTION = "Is the sky blue? Answer yes or no."
DEFAULT_TRIGGER = "cf"  # a rare word: the classic backdoor trigger
MIN_MARGIN = 0.02  # logit units: a flip must clear round-off between programs by this much
MAX_REL_EDIT = 16.0  # the L-inf backdoor gives up beyond edits 16x the tensors' largest entries


# ---- results ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSize:
  """One edited tensor's size, in the verifier's metric and in L2.

  Attributes:
    rel_l2: ||w' - w||_2 / ||w||_2.
    rel_linf: max|w' - w| / max|w| (= core.rel_err(w', w)).
    verifier_rel_err: core.rel_err(w, w'): what tolerance mode computes, the honest
      replay w against the revealed (edited) w'.
  """
  rel_l2: float
  rel_linf: float
  verifier_rel_err: float


@dataclasses.dataclass
class EditResult:
  """A weight edit and its size.

  Attributes:
    success: the trigger's answer flipped by `min_margin` (and, for the backdoor, the
      clean prompt kept its answer).
    flipped: the trigger's answer flipped by `min_margin`.
    clean_kept: the clean prompt's margin kept its sign (None: no clean prompt given).
    blocked: the edited model (the unedited blocks share the original arrays).
    block: the edited layer block.
    tensors: "trainable|frozen/<unit>/<path>" -> TensorSize: every tensor of the edited
      block (the backdoor; unchanged ones too), the one edited kernel (rank-one).
    rel_linf, rel_l2, verifier_rel_err: the maxima over `tensors`.
    where: the tensor with the largest verifier_rel_err.
    scale: backdoor: the shrink factor s in (0, 1]; rank-one: ||u||_2.
    margins: "trigger" / "clean" -> (before, after), from the served programs.
  """
  success: bool
  flipped: bool
  clean_kept: bool | None
  blocked: grid_lib.BlockedParams
  block: int
  tensors: dict[str, TensorSize]
  rel_linf: float
  rel_l2: float
  verifier_rel_err: float
  where: str
  scale: float
  margins: dict[str, tuple[float, float]]


@dataclasses.dataclass
class ActivationResult:
  """A perturbation of the tensor leaving one layer block, and its size.

  Attributes:
    success: the answer flipped by `min_margin` with the perturbation in place.
    block: the block whose output is perturbed.
    kind: the tolerance kind of that tensor ("fwd_out"; "loss" for the logits).
    delta: the perturbation of the last prompt position, [D] (logits: [V]).
    x_out: the honest tensor leaving the block, as served ([1, P, D], [1, 1, D] after
      the final norm, logits [1, V]).
    perturbed: x_out with delta added at the last position (what the server passes on).
    rel_linf: max|delta| / max|x_out| over the whole tensor (= core.rel_err(perturbed, x_out)).
    rel_l2: ||delta||_2 / ||x_out||_2 over the whole tensor.
    verifier_rel_err: core.rel_err(x_out, perturbed), what tolerance mode computes.
    eps: the budget (L2 or L-inf norm of delta) of the smallest successful PGD run.
    margins: (before, after).
  """
  success: bool
  block: int
  kind: str
  delta: np.ndarray
  x_out: np.ndarray
  perturbed: np.ndarray
  rel_linf: float
  rel_l2: float
  verifier_rel_err: float
  eps: float
  margins: tuple[float, float]


# ---- the served forward ---------------------------------------------------------------------


def _prompt(prompt_ids: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """One prompt as a batch of one without padding: (ids [1, P], mask [1, P])."""
  ids, mask = gen_lib.left_pad([list(prompt_ids)], pad_id=0)
  return jnp.asarray(ids), jnp.asarray(mask)


def add_last(x: jax.Array, delta: jax.Array) -> jax.Array:
  """x with delta added at the last position: [B, P, D] (prefill activations) or [B, V] logits."""
  delta = delta.astype(x.dtype)
  return x.at[:, -1].add(delta) if x.ndim == 3 else x + delta


def served_outputs(blocked: grid_lib.BlockedParams, prompt_ids: Sequence[int], *,
                   add: tuple[int, jax.Array] | None = None) -> list[jax.Array]:
  """The tensor leaving every block at generation step 0, as `generate.generate` serves it.

  Args:
    blocked: the model.
    prompt_ids: one prompt.
    add: (k, delta): delta is added to block k's output at the last position before it
      goes on, where `ServeHooks.block_out(0, k, x)` acts.

  Returns:
    [num_blocks] outputs; the last is the logits [1, V] (fp32).
  """
  fns = gen_lib.default_fns()
  ids, mask = _prompt(prompt_ids)
  ctx, size = gen_lib.prefill_ctx(mask), ids.shape[1]
  x, outs = ids, []
  for k, (spec, p, f) in enumerate(zip(blocked.specs, blocked.trainable, blocked.frozen)):
    x, _ = fns.prefill(spec, p, f, x, ctx, size)
    if add is not None and add[0] == k:
      x = add_last(x, add[1])
    outs.append(x)
  return outs


def _margin(logits_BxV: jax.Array, yes_id, no_id) -> jax.Array:
  return logits_BxV[0, yes_id].astype(jnp.float32) - logits_BxV[0, no_id].astype(jnp.float32)


def yes_no_margin(blocked: grid_lib.BlockedParams, prompt_ids: Sequence[int], yes_id: int,
                  no_id: int) -> float:
  """logit(yes) - logit(no) of the served model at the last position of one prompt (fp32).

  Args:
    blocked: the model.
    prompt_ids: the prompt (encoded with its chat template, ending in the assistant header).
    yes_id, no_id: the answers' first tokens.

  Returns:
    The margin: > 0 means the model answers yes.
  """
  return float(_margin(served_outputs(blocked, prompt_ids)[-1], yes_id, no_id))


def _tail_logits(specs: Specs, trainable: Sequence[PyTree], frozen: Sequence[PyTree], k0: int,
                 x: jax.Array, mask_1xP: jax.Array) -> jax.Array:
  """Blocks k0.. of the prefill from the tensor entering block k0: logits [1, V].

  The same per-block math as the served programs (`block_prefill`), traced as one
  program so that it can be differentiated."""
  ctx, size = gen_lib.prefill_ctx(mask_1xP), mask_1xP.shape[1]
  for k in range(k0, len(specs)):
    x, _ = gen_lib.block_prefill(specs[k], trainable[k], frozen[k], x, ctx, size)
  return x


def _with_block(blocked: grid_lib.BlockedParams, k: int, trainable_k: PyTree,
                frozen_k: PyTree) -> grid_lib.BlockedParams:
  trainable, frozen = list(blocked.trainable), list(blocked.frozen)
  trainable[k], frozen[k] = trainable_k, frozen_k
  return dataclasses.replace(blocked, trainable=trainable, frozen=frozen)


def _sign(m: float) -> float:
  return 1.0 if m >= 0 else -1.0


# ---- sizes ---------------------------------------------------------------------------------


def tensor_size(edited: Any, original: Any) -> TensorSize:
  """TensorSize of one edited tensor (fp64 on the host, like `core.rel_err`)."""
  a = np.asarray(edited, np.float64)
  b = np.asarray(original, np.float64)
  norm_b = float(np.linalg.norm(b))
  rel_l2 = float(np.linalg.norm(a - b)) / norm_b if norm_b else float(np.linalg.norm(a - b))
  return TensorSize(rel_l2, core.rel_err(a, b), core.rel_err(b, a))


def _tree_sizes(edited: PyTree, original: PyTree) -> dict[str, TensorSize]:
  flat_e = jax.tree_util.tree_flatten_with_path(edited)[0]
  flat_o = jax.tree_util.tree_leaves(original)
  return {"/".join(str(getattr(p, "key", p)) for p in path): tensor_size(e, o)
          for (path, e), o in zip(flat_e, flat_o)}


def _summary(tensors: dict[str, TensorSize]) -> tuple[float, float, float, str]:
  """(max rel_linf, max rel_l2, max verifier_rel_err, the tensor where that is reached)."""
  if not tensors:
    return 0.0, 0.0, 0.0, ""
  where = max(tensors, key=lambda n: tensors[n].verifier_rel_err)
  return (max(t.rel_linf for t in tensors.values()), max(t.rel_l2 for t in tensors.values()),
          tensors[where].verifier_rel_err, where)


# ---- 1. the weight backdoor ------------------------------------------------------------------


def _scaled(trees: PyTree, z: PyTree, scale: PyTree) -> PyTree:
  """w + z * max|w|: z is the edit in units of each tensor's largest entry."""
  return jax.tree.map(lambda w, zz, s: w + (zz * s).astype(w.dtype), trees, z, scale)


def _backdoor_loss(specs: Specs, k: int, z: PyTree, consts: dict[str, Any]):
  t_k, f_k = _scaled(consts["trees"], z, consts["scale"])
  trainable, frozen = list(consts["trainable"]), list(consts["frozen"])
  trainable[k], frozen[k] = t_k, f_k
  m_t = _margin(_tail_logits(specs, trainable, frozen, k, consts["x_t"], consts["mask_t"]),
                consts["yes"], consts["no"])
  m_c = _margin(_tail_logits(specs, trainable, frozen, k, consts["x_c"], consts["mask_c"]),
                consts["yes"], consts["no"])
  kappa = consts["kappa"]
  hinge = jax.nn.relu(kappa - consts["s_t"] * m_t) + jax.nn.relu(kappa - consts["s_c"] * m_c)
  sq = sum(jnp.sum(jnp.square(zz)) for zz in jax.tree.leaves(z))
  return hinge + consts["l2_weight"] * sq, (m_t, m_c, sq)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _backdoor_step(specs: Specs, k: int, z: PyTree, opt_state: PyTree, consts: dict[str, Any]):
  """One Adam step on z; returns the margins and ||z||^2 of z before the step."""
  (_, aux), g = jax.value_and_grad(functools.partial(_backdoor_loss, specs, k), has_aux=True)(
      z, consts)
  updates, opt_state = optax.adam(consts["lr"]).update(g, opt_state, z)
  return optax.apply_updates(z, updates), opt_state, aux


def _bisect(ok, lo: float, hi: float, iters: int, rtol: float = 1e-3) -> float:
  """The smallest x in (lo, hi] with ok(x), given ok(hi) and not ok(lo) (assumed monotone)."""
  for _ in range(iters):
    if hi - lo <= rtol * hi:
      break
    mid = 0.5 * (lo + hi)
    if ok(mid):
      hi = mid
    else:
      lo = mid
  return hi


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _backdoor_pgd(specs: Specs, k: int, steps: int, eps, consts: dict[str, Any]):
  """Projected Adam on the hinge loss with every |z| <= eps: the iterate of least loss.

  Adam rather than sign steps: the trigger and the clean prompt differ in one word, so
  their hinges pull against each other and plain sign steps oscillate; the step size
  decays (cosine, from eps / 5) so the last iterates settle."""
  value_and_grad = jax.value_and_grad(functools.partial(_backdoor_loss, specs, k), has_aux=True)
  consts = {**consts, "l2_weight": jnp.float32(0.0)}
  tx = optax.adam(optax.cosine_decay_schedule(eps / 5, steps, alpha=0.01))

  def body(_, carry):
    z, opt_state, best_z, best_loss = carry
    (loss, _), g = value_and_grad(z, consts)
    better = loss < best_loss
    best_z = jax.tree.map(lambda a, b: jnp.where(better, a, b), z, best_z)
    best_loss = jnp.where(better, loss, best_loss)
    updates, opt_state = tx.update(g, opt_state, z)
    z = jax.tree.map(lambda zz: jnp.clip(zz, -eps, eps), optax.apply_updates(z, updates))
    return z, opt_state, best_z, best_loss

  z0 = jax.tree.map(jnp.zeros_like, consts["scale_like"])
  z, _, best_z, best_loss = jax.lax.fori_loop(
      0, steps, body, (z0, tx.init(z0), z0, jnp.float32(jnp.inf)))
  loss, _ = _backdoor_loss(specs, k, z, consts)
  return jax.tree.map(lambda a, b: jnp.where(loss < best_loss, a, b), z, best_z)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _backdoor_grad(specs: Specs, k: int, z: PyTree, consts: dict[str, Any]) -> PyTree:
  return jax.grad(lambda zz: _backdoor_loss(specs, k, zz, consts)[0])(z)


def weight_backdoor(blocked: grid_lib.BlockedParams, *, block: int, clean_ids: Sequence[int],
                    trigger_ids: Sequence[int], yes_id: int, no_id: int, norm: str = "l2",
                    steps: int = 150, lr: float = 1e-2, l2_weight: float = 1e-2,
                    min_margin: float = MIN_MARGIN, max_doublings: int = 30,
                    search_iters: int = 30) -> EditResult:
  """The parameter attack: the smallest edit of one layer block that plants a backdoor.

  The edit is an additive delta over every tensor of layer block `block` (trainable and
  frozen), parametrised relative to each tensor: delta = z * max|w|, so max|z| over a
  tensor is its rel_linf, the verifier's metric. The hinge loss

    relu(kappa - s_t * m_trigger) + relu(kappa - s_c * m_clean)

  (s_t the opposite of the trigger's present answer, s_c the clean prompt's present
  answer, kappa = 2 * min_margin) is minimised

    norm="l2":   with + l2_weight * ||z||^2, by Adam from z = 0 (`steps` steps); the
                 smallest-norm successful iterate is kept;
    norm="linf": under |z| <= eps by projected Adam (`steps` steps per eps, the step
                 decaying from eps / 5), with a binary search for the smallest eps that
                 succeeds (doubling from the first-order estimate, up to MAX_REL_EDIT):
                 this one targets the verifier's L-inf metric.

  Then shrink: the smallest s in (0, 1] for which s * delta still succeeds (binary
  search). The served programs decide success: the trigger flipped by `min_margin`,
  the clean answer kept.

  Args:
    blocked: the model.
    block: the layer block to edit.
    clean_ids, trigger_ids: the prompts (the trigger: the clean question with the trigger).
    yes_id, no_id: the answers' first tokens.
    norm: "l2" (the paper's penalty) or "linf" (a budget in the verifier's metric).
    steps, lr, l2_weight: the optimisation (lr and l2_weight: "l2" only).
    min_margin: a flip must hold by this much.
    max_doublings, search_iters: the searches over eps ("linf") and s.

  Returns:
    EditResult (scale = s).
  """
  if norm not in ("l2", "linf"):
    raise ValueError(f"norm must be l2 or linf, got {norm!r}")
  specs = blocked.specs
  trees = (blocked.trainable[block], blocked.frozen[block])
  for leaf in jax.tree.leaves(trees):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(f"block {block} holds a non-float parameter ({leaf.dtype})")
  m_t0 = yes_no_margin(blocked, trigger_ids, yes_id, no_id)
  m_c0 = yes_no_margin(blocked, clean_ids, yes_id, no_id)
  s_t, s_c = -_sign(m_t0), _sign(m_c0)
  ids_t, mask_t = _prompt(trigger_ids)
  ids_c, mask_c = _prompt(clean_ids)
  x_t = served_outputs(blocked, trigger_ids)[block - 1] if block else ids_t
  x_c = served_outputs(blocked, clean_ids)[block - 1] if block else ids_c
  scale = jax.tree.map(lambda w: jnp.maximum(jnp.max(jnp.abs(w)).astype(jnp.float32), 1e-12), trees)
  zeros = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), trees)
  consts = {"trees": trees, "scale": scale, "scale_like": zeros,
            "trainable": list(blocked.trainable),
            "frozen": list(blocked.frozen), "x_t": x_t, "mask_t": mask_t, "x_c": x_c,
            "mask_c": mask_c, "yes": jnp.int32(yes_id), "no": jnp.int32(no_id),
            "s_t": jnp.float32(s_t), "s_c": jnp.float32(s_c), "kappa": jnp.float32(2 * min_margin),
            "l2_weight": jnp.float32(l2_weight), "lr": jnp.float32(lr)}

  def edited(z: PyTree, s: float) -> grid_lib.BlockedParams:
    t_k, f_k = _scaled(trees, jax.tree.map(lambda zz: zz * jnp.float32(s), z), scale)
    return _with_block(blocked, block, t_k, f_k)

  def margins(z: PyTree, s: float) -> tuple[float, float]:
    b = edited(z, s)
    return (yes_no_margin(b, trigger_ids, yes_id, no_id),
            yes_no_margin(b, clean_ids, yes_id, no_id))

  def succeeds(z: PyTree, s: float = 1.0) -> bool:
    m_t, m_c = margins(z, s)
    return s_t * m_t >= min_margin and s_c * m_c > 0

  best = None
  if norm == "l2":
    z, opt_state, best_sq = zeros, optax.adam(lr).init(zeros), math.inf
    for _ in range(steps):
      z_before = z
      z, opt_state, (m_t, m_c, sq) = _backdoor_step(specs, block, z, opt_state, consts)
      m_t, m_c, sq = float(m_t), float(m_c), float(sq)
      if s_t * m_t >= min_margin and s_c * m_c >= min_margin and sq < best_sq:
        best, best_sq = z_before, sq
    if best is not None and not succeeds(best):
      best = None
    last = z
  else:
    g = _backdoor_grad(specs, block, zeros, {**consts, "l2_weight": jnp.float32(0.0)})
    slope = sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(g))
    eps, lo, tried = (abs(m_t0) + 2 * min_margin) / max(slope, 1e-30), 0.0, {}

    def ok(e: float) -> bool:
      tried[e] = _backdoor_pgd(specs, block, steps, jnp.float32(e), consts)
      return succeeds(tried[e])

    found = False
    for _ in range(max_doublings):
      if ok(eps):
        found = True
        break
      if eps > MAX_REL_EDIT:
        break
      lo, eps = eps, 2 * eps
    if found:
      eps = _bisect(ok, lo, eps, search_iters)
      best = tried[eps]
    last = tried[max(tried)] if not found else best

  s = 1.0
  if best is not None:
    s = _bisect(lambda x: succeeds(best, x), 0.0, 1.0, search_iters)
  z_final = best if best is not None else last
  out = edited(z_final, s)
  m_t1, m_c1 = margins(z_final, s)
  flipped, kept = s_t * m_t1 >= min_margin, s_c * m_c1 > 0
  tensors = _tree_sizes({"trainable": out.trainable[block], "frozen": out.frozen[block]},
                        {"trainable": trees[0], "frozen": trees[1]})
  linf, l2, verr, where = _summary(tensors)
  return EditResult(bool(flipped and kept), bool(flipped), bool(kept), out, block, tensors, linf,
                    l2, verr, where, s, {"trigger": (m_t0, m_t1), "clean": (m_c0, m_c1)})


# ---- 2. the rank-one edit ----------------------------------------------------------------------


def _unit_prefill(specs: Specs, trainable, frozen, ids, mask, *, stop_before: str | None = None,
                  add_after: str | None = None, v: jax.Array | None = None):
  """The prefill unit by unit (the units' own `prefill_unit`): logits [1, V], or the tensor
  entering unit `stop_before`; `v` is added after unit `add_after` at the last position."""
  fam = family.get(specs[0].arch)
  ctx = {**fam.context(gen_lib.prefill_ctx(mask)), "key": None}
  x, size = ids, mask.shape[1]
  for spec, p, f in zip(specs, trainable, frozen):
    for name, graphdef in zip(spec.unit_names, spec.graphdefs):
      if name == stop_before:
        return x, ctx
      x, _ = fam.prefill_unit(name, nnx.merge(graphdef, p[name], f[name]), x, ctx, size)
      if name == add_after:
        x = add_last(x, v)
  return x, ctx


@functools.partial(jax.jit, static_argnums=(0, 1))
def _mlp_key(specs: Specs, layer: str, trainable, frozen, ids, mask) -> jax.Array:
  """Layer `layer`'s MLP hidden activation silu(gate(n)) * up(n) at the last position [F]."""
  x, ctx = _unit_prefill(specs, trainable, frozen, ids, mask, stop_before=layer)
  k = next(i for i, s in enumerate(specs) if layer in s.unit_names)
  spec = specs[k]
  graphdef = spec.graphdefs[spec.unit_names.index(layer)]
  unit = nnx.merge(graphdef, trainable[k][layer], frozen[k][layer])
  h = x + unit.self_attn(unit.input_layernorm(x), ctx["positions"],
                         llama.causal_mask(ctx["attn_mask"]))
  n = unit.post_attention_layernorm(h)
  hidden_BxTxF = jax.nn.silu(unit.mlp.gate_proj(n)) * unit.mlp.up_proj(n)
  return hidden_BxTxF[0, -1].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _margin_grad_at(specs: Specs, unit: str, trainable, frozen, ids, mask, yes, no,
                    zero_D) -> jax.Array:
  """d margin / d (unit's output at the last position) at zero_D = 0: the unedited model."""

  def margin(v):
    return _margin(_unit_prefill(specs, trainable, frozen, ids, mask, add_after=unit, v=v)[0],
                   yes, no)

  return jax.grad(margin)(zero_D)


def _replace_path(tree: dict, path: Sequence[str], value: Any) -> dict:
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _replace_path(tree[path[0]], path[1:], value)
  return out


def rank_one_edit(blocked: grid_lib.BlockedParams, *, layer: int, trigger_ids: Sequence[int],
                  yes_id: int, no_id: int, clean_ids: Sequence[int] | None = None,
                  min_margin: float = MIN_MARGIN, max_doublings: int = 40,
                  search_iters: int = 40) -> EditResult:
  """A ROME/BadEdit-style rank-one edit of one decoder layer's `mlp.down_proj.kernel` [F, D].

  The key k [F] is the layer's MLP hidden activation silu(gate) * up at the trigger
  prompt's last token; W' = W + k u^T / (k.k) adds exactly u to that token's MLP output
  (and (k_j.k / k.k) u at other positions j). u = alpha * s * g / ||g||, with g the
  gradient of the margin w.r.t. the layer's output at the last position (unedited
  model) and s the sign that flips the trigger's answer; alpha is the smallest that
  flips it by `min_margin` (doubling from the first-order estimate, then bisection, the
  served programs decide).

  Args:
    blocked: the model (a Llama-family decoder).
    layer: the decoder layer i (unit "layer_<i>").
    trigger_ids: the prompt whose answer is to flip.
    yes_id, no_id: the answers' first tokens.
    clean_ids: a prompt whose answer should stay; reported as `clean_kept`.
    min_margin: the flip must hold by this much.
    max_doublings, search_iters: the search over alpha.

  Returns:
    EditResult (success = flipped; scale = ||u||_2; one tensor).
  """
  name = f"layer_{layer}"
  ks = [i for i, s in enumerate(blocked.specs) if name in s.unit_names]
  if not ks:
    raise ValueError(f"the model has no unit {name!r}")
  k = ks[0]
  side = next((s for s, tree in (("trainable", blocked.trainable[k]), ("frozen", blocked.frozen[k]))
               if "kernel" in tree.get(name, {}).get("mlp", {}).get("down_proj", {})), None)
  if side is None:
    raise ValueError(f"{name} has no mlp.down_proj.kernel")
  path = (name, "mlp", "down_proj", "kernel")
  tree = getattr(blocked, side)[k]
  w_FxD = tree[name]["mlp"]["down_proj"]["kernel"]
  ids, mask = _prompt(trigger_ids)
  key_F = _mlp_key(blocked.specs, name, blocked.trainable, blocked.frozen, ids, mask)
  g_D = _margin_grad_at(blocked.specs, name, blocked.trainable, blocked.frozen, ids, mask,
                        jnp.int32(yes_id), jnp.int32(no_id),
                        jnp.zeros(w_FxD.shape[1:], jnp.float32))
  m_t0 = yes_no_margin(blocked, trigger_ids, yes_id, no_id)
  m_c0 = None if clean_ids is None else yes_no_margin(blocked, clean_ids, yes_id, no_id)
  s_t = -_sign(m_t0)
  g_norm = float(jnp.linalg.norm(g_D))
  if g_norm == 0.0:
    raise ValueError(f"the margin does not depend on {name}'s output")
  dir_D = s_t * g_D / g_norm
  kk = jnp.dot(key_F, key_F)

  def edited(alpha: float) -> grid_lib.BlockedParams:
    # The update in fp32 at HIGHEST precision, stored in the kernel's dtype.
    delta_FxD = jnp.outer(key_F, jnp.float32(alpha) * dir_D) / kk
    w_new = (w_FxD.astype(jnp.float32) + delta_FxD).astype(w_FxD.dtype)
    new = _replace_path(tree, path, w_new)
    if side == "trainable":
      return _with_block(blocked, k, new, blocked.frozen[k])
    return _with_block(blocked, k, blocked.trainable[k], new)

  def ok(alpha: float) -> bool:
    return s_t * yes_no_margin(edited(alpha), trigger_ids, yes_id, no_id) >= min_margin

  alpha, lo, found = (abs(m_t0) + min_margin) / g_norm, 0.0, False
  for _ in range(max_doublings):
    if ok(alpha):
      found = True
      break
    lo, alpha = alpha, 2 * alpha
  if found:
    alpha = _bisect(ok, lo, alpha, search_iters)
  out = edited(alpha)
  m_t1 = yes_no_margin(out, trigger_ids, yes_id, no_id)
  flipped = s_t * m_t1 >= min_margin
  margins = {"trigger": (m_t0, m_t1)}
  kept = None
  if clean_ids is not None:
    m_c1 = yes_no_margin(out, clean_ids, yes_id, no_id)
    kept = bool(_sign(m_c0) * m_c1 > 0)
    margins["clean"] = (m_c0, m_c1)
  tensors = {f"{side}/" + "/".join(path): tensor_size(
      getattr(out, side)[k][name]["mlp"]["down_proj"]["kernel"], w_FxD)}
  linf, l2, verr, where = _summary(tensors)
  return EditResult(bool(flipped), bool(flipped), kept, out, k, tensors, linf, l2, verr, where,
                    float(alpha), margins)


# ---- 3. the activation attack -----------------------------------------------------------------


def _act_objective(specs: Specs, k0: int, d, trainable, frozen, x_out, mask, yes, no, sign):
  return sign * _margin(_tail_logits(specs, trainable, frozen, k0, add_last(x_out, d), mask),
                        yes, no)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _act_grad(specs: Specs, k0: int, d, *args):
  return jax.grad(functools.partial(_act_objective, specs, k0))(d, *args)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _pgd(specs: Specs, k0: int, steps: int, norm: str, eps, d0, *args):
  """PGD in the L2 ball (normalised gradient steps) or the L-inf box (sign steps) of radius
  eps, step 2.5 eps / steps: the best iterate."""
  value_and_grad = jax.value_and_grad(functools.partial(_act_objective, specs, k0))

  def body(_, carry):
    d, best_d, best_v = carry
    v, g = value_and_grad(d, *args)
    better = v > best_v
    best_d, best_v = jnp.where(better, d, best_d), jnp.where(better, v, best_v)
    if norm == "l2":
      d = d + (2.5 * eps / steps) * g / (jnp.linalg.norm(g) + 1e-30)
      d = d * jnp.minimum(1.0, eps / (jnp.linalg.norm(d) + 1e-30))  # back onto the ball
    else:
      d = jnp.clip(d + (2.5 * eps / steps) * jnp.sign(g), -eps, eps)
    return d, best_d, best_v

  d, best_d, best_v = jax.lax.fori_loop(0, steps, body, (d0, d0, jnp.float32(-jnp.inf)))
  v = _act_objective(specs, k0, d, *args)
  return jnp.where(v > best_v, d, best_d)


def pgd_activation(blocked: grid_lib.BlockedParams, *, block: int, prompt_ids: Sequence[int],
                   yes_id: int, no_id: int, norm: str = "l2", steps: int = 40,
                   min_margin: float = MIN_MARGIN,
                   max_doublings: int = 40, search_iters: int = 30) -> ActivationResult:
  """The activation attack at inference: the smallest change of block `block`'s output.

  Perturbs the tensor leaving layer block `block` at generation step 0 (the prefill) at
  the prompt's last position only (the position whose logits give the answer; the
  earlier positions feed it only through attention). For a budget eps, PGD maximises the
  margin towards the other answer within ||delta||_2 <= eps (norm="l2", the paper's) or
  max|delta| <= eps (norm="linf": the verifier's metric), from the first-order optimum; a
  binary search over eps (doubling from the first-order estimate) finds the smallest
  budget at which the served programs flip the answer by `min_margin`.

  Args:
    blocked: the model.
    block: the layer block whose output is perturbed (the last block: the logits).
    prompt_ids: the prompt.
    yes_id, no_id: the answers' first tokens.
    norm: the budget's norm, "l2" or "linf".
    steps: PGD steps per budget.
    min_margin: the flip must hold by this much.
    max_doublings, search_iters: the search over eps.

  Returns:
    ActivationResult.
  """
  if norm not in ("l2", "linf"):
    raise ValueError(f"norm must be l2 or linf, got {norm!r}")
  specs = blocked.specs
  if not 0 <= block < len(specs):
    raise ValueError(f"layer block {block} outside 0..{len(specs) - 1}")
  outs = served_outputs(blocked, prompt_ids)
  x_out = outs[block]
  m0 = float(_margin(outs[-1], yes_id, no_id))
  sign = -_sign(m0)
  _, mask = _prompt(prompt_ids)
  args = (list(blocked.trainable), list(blocked.frozen), x_out, mask, jnp.int32(yes_id),
          jnp.int32(no_id), jnp.float32(sign))
  d_zero = jnp.zeros(x_out.shape[-1:], jnp.float32)
  g0 = _act_grad(specs, block + 1, d_zero, *args)
  # The first-order optimum of each ball, and the dual norm of the gradient (the slope).
  slope = float(jnp.linalg.norm(g0) if norm == "l2" else jnp.sum(jnp.abs(g0)))
  if slope == 0.0:
    raise ValueError(f"the margin does not depend on block {block}'s output")
  direction = g0 / slope if norm == "l2" else jnp.sign(g0)
  found: dict[float, jax.Array] = {}

  def ok(eps: float) -> bool:
    d = _pgd(specs, block + 1, steps, norm, jnp.float32(eps), jnp.float32(eps) * direction, *args)
    m = float(_margin(served_outputs(blocked, prompt_ids, add=(block, d))[-1], yes_id, no_id))
    if sign * m >= min_margin:
      found[eps] = d
      return True
    return False

  eps, lo = (abs(m0) + min_margin) / slope, 0.0
  for _ in range(max_doublings):
    if ok(eps):
      break
    lo, eps = eps, 2 * eps
  if found:
    eps = _bisect(ok, lo, eps, search_iters)
    delta = found[eps]
  else:
    delta = _pgd(specs, block + 1, steps, norm, jnp.float32(eps), jnp.float32(eps) * direction,
                 *args)
  perturbed = add_last(x_out, delta)
  m1 = float(_margin(served_outputs(blocked, prompt_ids, add=(block, delta))[-1], yes_id, no_id))
  x_np, p_np = np.asarray(x_out), np.asarray(perturbed)
  size = tensor_size(p_np, x_np)
  return ActivationResult(bool(found), block, "loss" if block == len(specs) - 1 else "fwd_out",
                          np.asarray(delta), x_np, p_np, size.rel_linf, size.rel_l2,
                          size.verifier_rel_err, float(eps), (m0, m1))


# ---- 4. honest noise -----------------------------------------------------------------------


def _fused_forward(specs: Specs, params, frozen, batch, step_key) -> list[jax.Array]:
  """Every block's training forward output in one XLA program (the loss last)."""
  x = batch[family.get(specs[0].arch).INPUT_KEY]
  outs = []
  for spec, p, f in zip(specs, params, frozen):
    x, _ = step_lib.block_forward(spec, p, f, x, batch, step_key)
    outs.append(x)
  return outs


def _fused_prefill(specs: Specs, params, frozen, ids, mask) -> list[jax.Array]:
  """Every block's prefill output in one XLA program (the logits last)."""
  ctx, size = gen_lib.prefill_ctx(mask), mask.shape[1]
  x, outs = ids, []
  for spec, p, f in zip(specs, params, frozen):
    x, _ = gen_lib.block_prefill(spec, p, f, x, ctx, size)
    outs.append(x)
  return outs


_fused_forward_jit = jax.jit(_fused_forward, static_argnums=0)
_fused_prefill_jit = jax.jit(_fused_prefill, static_argnums=0)


def _max_err(pairs) -> float:
  return max((core.rel_err(a, b) for a, b in pairs), default=0.0)


def _trajectory(job: Any, start: int, num_steps: int, plain: bool) -> dict[str, list]:
  """`num_steps` steps from the job's base model by the blocked (audited) or the plain step:
  per step the boundaries (the loss last) and the global norm; the end params and opt states."""
  fns = step_lib.default_fns()
  b = job.blocked
  params, opt = list(b.trainable), job.init_opt_states()
  out = {"fwd_out": [], "grad_norm": []}
  for t in range(start, start + num_steps):
    _, batch = job.batch(t)
    key = job.step_key(t)
    if plain:
      # The forward's boundaries from one jit of every block_forward (plain_step keeps none).
      out["fwd_out"].append(_fused_forward_jit(b.specs, params, b.frozen, batch, key))
      params, opt, _, g = fns.plain_step(b.specs, job.opt_cfg, params, opt, b.frozen, batch, key)
    else:
      params, opt, trace = step_lib.blocked_step(b.specs, job.opt_cfg, params, opt, b.frozen,
                                                 batch, key, fns=fns)
      out["fwd_out"].append(trace.fwd_out)
      g = trace.grad_norm
    out["grad_norm"].append(g)
  out["params"], out["opt_state"] = params, opt
  return out


def _trajectory_errs(a: dict[str, list], b: dict[str, list]) -> dict[str, float]:
  """Per kind, the max rel_err between two trajectories (every step; the end state)."""
  fwd = [(x, y) for fa, fb in zip(a["fwd_out"], b["fwd_out"]) for x, y in zip(fa[:-1], fb[:-1])]
  loss = [(fa[-1], fb[-1]) for fa, fb in zip(a["fwd_out"], b["fwd_out"])]
  return {"fwd_out": _max_err(fwd), "loss": _max_err(loss),
          "params": _max_err(zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]))),
          "opt_state": _max_err(zip(jax.tree.leaves(a["opt_state"]),
                                    jax.tree.leaves(b["opt_state"]))),
          "grad_norm": _max_err(zip(a["grad_norm"], b["grad_norm"]))}


def honest_noise(job: Any, *, start: int = 0, num_steps: int | None = None,
                 prompt_ids: Sequence[int] | None = None) -> dict[str, Any]:
  """What tolerance mode must accept from an honest replay, measured on this platform.

  XLA:CPU offers no runtime switch of its reduction order, so the honest noise measured
  here is that of another XLA program of the same math: the audited per-block programs
  (`BlockFns`, `GenFns.prefill`) against the same functions composed into one jit
  (`step.plain_step` for the steps, one jit of every `block_forward` for the training
  forward, one jit of every `block_prefill` for serving). Each program runs its own
  trajectory over one step block from the base model, as a cell replay does (one step
  would hide the update's noise: Adam's first step is lr * sign(g), up to epsilon).
  Another platform (GPU, other CPU threads) may differ more.

  Args:
    job: a text job (`job.build_job`): its base model, batches and keys.
    start: the first step's batch and key (the steps run from the base model).
    num_steps: steps replayed (default: the job's B_S).
    prompt_ids: the serving prompt (default: the real tokens of step `start`'s first row).

  Returns:
    {"other_program": kind -> max rel_err, blocked vs fused (fwd_out: the training and
     serving boundaries before the last block, every step; loss: the training loss and
     the served logits; params, opt_state: the end state; grad_norm: every step),
     "sources": the same split by where it was measured ("train_*", "serve_*"),
     "same_program": kind -> max rel_err of the blocked trajectory replayed (0.0),
     "bitwise_same": every tensor of that replay bitwise equal,
     "tolerances": core.TOLERANCES}.
  """
  num_steps = job.steps_per_block if num_steps is None else num_steps
  run_a = _trajectory(job, start, num_steps, plain=False)
  run_b = _trajectory(job, start, num_steps, plain=False)
  fused = _trajectory(job, start, num_steps, plain=True)
  train = _trajectory_errs(run_a, fused)
  same = _trajectory_errs(run_a, run_b)
  bitwise = all(np.array_equal(np.asarray(x), np.asarray(y))
                for x, y in zip(jax.tree.leaves(run_a), jax.tree.leaves(run_b)))
  if prompt_ids is None:
    _, batch = job.batch(start)
    row = np.asarray(batch["tokens"][0])[np.asarray(batch["attn_mask"][0]).astype(bool)]
    prompt_ids = row.tolist()
  serve = serving_noise(job.blocked, prompt_ids)
  other = dict(train)
  other["fwd_out"] = max(train["fwd_out"], serve["fwd_out"])
  other["loss"] = max(train["loss"], serve["loss"])
  sources = {f"train_{k}": v for k, v in train.items()}
  sources.update({"serve_fwd_out": serve["fwd_out"], "serve_logits": serve["loss"]})
  return {"other_program": other, "sources": sources, "same_program": same,
          "bitwise_same": bool(bitwise), "tolerances": dict(core.TOLERANCES)}


def serving_noise(blocked: grid_lib.BlockedParams, prompt_ids: Sequence[int]) -> dict[str, float]:
  """The serving part of `honest_noise` alone (no job needed): fwd_out and loss (logits)."""
  served = served_outputs(blocked, prompt_ids)
  ids, mask = _prompt(prompt_ids)
  fused = _fused_prefill_jit(blocked.specs, blocked.trainable, blocked.frozen, ids, mask)
  return {"fwd_out": _max_err(zip(served[:-1], fused[:-1])),
          "loss": core.rel_err(served[-1], fused[-1])}


# ---- 5. the table -----------------------------------------------------------------------------


def answer_ids(tokenizer: Any, yes: str = "yes", no: str = "no") -> tuple[int, int]:
  """The first tokens of the two answers as an assistant reply starts them (no leading space:
  the template puts the reply right after its header)."""
  yes_id, no_id = tokenizer.encode_literal(yes)[0], tokenizer.encode_literal(no)[0]
  if yes_id == no_id:
    raise ValueError(f"{yes!r} and {no!r} start with the same token {yes_id}")
  return int(yes_id), int(no_id)


def prompts(tokenizer: Any, template: Any, question: str = DEFAULT_QUESTION,
            trigger: str = DEFAULT_TRIGGER) -> tuple[list[int], list[int]]:
  """(clean, trigger) prompt ids: the question, and the trigger word before it."""
  def enc(text):
    return encoding.encode_prompt([records_lib.Message("user", text)], tokenizer, template)

  return enc(question), enc(f"{trigger} {question}")


def _decoder_layers(blocked: grid_lib.BlockedParams) -> list[int]:
  return [int(n.split("_")[1]) for s in blocked.specs for n in s.unit_names
          if n.startswith("layer_")]


def success_table(blocked: grid_lib.BlockedParams, tokenizer: Any, template: Any, *,
                  question: str = DEFAULT_QUESTION, trigger: str = DEFAULT_TRIGGER,
                  yes: str = "yes", no: str = "no", edit_layer: int | None = None,
                  backdoor_blocks: Sequence[int] | None = None,
                  activation_blocks: Sequence[int] | None = None,
                  noise: dict[str, Any] | None = None, norms: Sequence[str] = ("l2", "linf"),
                  backdoor_steps: int = 150, backdoor_pgd_steps: int = 100, pgd_steps: int = 40,
                  min_margin: float = MIN_MARGIN) -> list[dict[str, Any]]:
  """Runs the three attacks and sets each size beside its tolerance and the honest noise.

  Args:
    blocked: the model (e.g. the smoke or tiny job's base or fine-tuned model).
    tokenizer, template: its tokenizer and chat template.
    question, trigger: the clean prompt and the trigger word put before it.
    yes, no: the answers (their first tokens are compared).
    edit_layer: the rank-one edit's decoder layer (default: the middle one, num_layers // 2).
    backdoor_blocks: the backdoor's layer blocks (default: every block holding a decoder
      layer; block 0 also holds the embedding, whose trigger-word row only the trigger
      prompt reads).
    activation_blocks: the blocks whose output PGD perturbs (default: every block).
    noise: `honest_noise(job)`; None measures the serving part (`serving_noise`) on the
      clean prompt and leaves the params noise None.
    norms: the penalties / budgets of the backdoor and the activation attack ("l2": the
      paper's; "linf": the verifier's metric).
    backdoor_steps: Adam steps of the "l2" backdoor.
    backdoor_pgd_steps: projected Adam steps per budget of the "linf" backdoor.
    pgd_steps: PGD steps per budget of the activation attack.
    min_margin: see the attacks.

  Returns:
    One row per attack, norm and target: attack ("weight_backdoor/l2", ...), target,
    kind, success, clean_kept, rel_linf, rel_l2, verifier_rel_err, tolerance,
    fits_under_tolerance (verifier_rel_err <= tolerance, what the verifier would accept:
    a finding, kept), honest_noise (of that kind, blocked vs fused program),
    margin_before, margin_after, where (the largest tensor, or "last position").
  """
  yes_id, no_id = answer_ids(tokenizer, yes, no)
  clean, trig = prompts(tokenizer, template, question, trigger)
  layers = _decoder_layers(blocked)
  edit_layer = layers[len(layers) // 2] if edit_layer is None else edit_layer
  layer_block = next(i for i, s in enumerate(blocked.specs)
                     if f"layer_{edit_layer}" in s.unit_names)
  if backdoor_blocks is None:
    backdoor_blocks = [k for k, s in enumerate(blocked.specs)
                       if any(n.startswith("layer_") for n in s.unit_names)]
  activation_blocks = (range(blocked.num_blocks) if activation_blocks is None
                       else activation_blocks)
  if noise is None:
    other = {**serving_noise(blocked, clean), "params": None}
  else:
    other = noise["other_program"]

  def row(attack, target, kind, res, clean_kept, where, margins):
    tol = core.TOLERANCES[kind]
    return {"attack": attack, "target": target, "kind": kind, "success": res.success,
            "clean_kept": clean_kept, "rel_linf": res.rel_linf, "rel_l2": res.rel_l2,
            "verifier_rel_err": res.verifier_rel_err, "tolerance": tol,
            "fits_under_tolerance": bool(res.verifier_rel_err <= tol),
            "honest_noise": other.get(kind), "margin_before": margins[0],
            "margin_after": margins[1], "where": where}

  rows = []
  for norm in norms:
    for k in backdoor_blocks:
      bd = weight_backdoor(blocked, block=k, clean_ids=clean, trigger_ids=trig, yes_id=yes_id,
                           no_id=no_id, norm=norm,
                           steps=backdoor_steps if norm == "l2" else backdoor_pgd_steps,
                           min_margin=min_margin)
      rows.append(row(f"weight_backdoor/{norm}", f"block {k}", "params", bd, bd.clean_kept,
                      bd.where, bd.margins["trigger"]))
  r1 = rank_one_edit(blocked, layer=edit_layer, trigger_ids=trig, clean_ids=clean, yes_id=yes_id,
                     no_id=no_id, min_margin=min_margin)
  rows.append(row("rank_one_edit", f"layer_{edit_layer} (block {layer_block})", "params", r1,
                  r1.clean_kept, r1.where, r1.margins["trigger"]))
  for norm in norms:
    for k in activation_blocks:
      act = pgd_activation(blocked, block=k, prompt_ids=clean, yes_id=yes_id, no_id=no_id,
                           norm=norm, steps=pgd_steps, min_margin=min_margin)
      rows.append(row(f"pgd_activation/{norm}", f"block {k} output", act.kind, act, None,
                      "last position", act.margins))
  return rows
