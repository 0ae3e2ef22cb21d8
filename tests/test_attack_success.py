"""The edits of `aftune/attacks/edits.py` really flip the answer, and their sizes are real.

Every check recomputes from scratch what the attack claims: the margins through the real
server loop (`generate.generate`, the perturbation added by a `ServeHooks.block_out` hook),
the sizes with `core.rel_err` on the edited and original tensors, and "smallest" by
halving the edit (half of it must not flip the answer). The model is the smoke run
sheet's random init (`job.build_job(small_config())`).
"""

import dataclasses
import math

import jax
import numpy as np
import pytest

from aftune.attacks import edits
from aftune.audit import core
from aftune.infer import generate as gen_lib
from aftune.model import blocks as grid_lib
from aftune.model import llama
from aftune.train import job as job_lib


@pytest.fixture(scope="module")
def setup(small_config):
  job = job_lib.build_job(small_config())
  yes, no = edits.answer_ids(job.tokenizer)
  clean, trig = edits.prompts(job.tokenizer, job.template)
  return job, yes, no, clean, trig


@dataclasses.dataclass
class AddAtLast(gen_lib.Honest):
  """Adds delta to block `block`'s output at the last position of generation step 0."""
  block: int
  delta: np.ndarray

  def block_out(self, t, k, x):
    if (t, k) == (0, self.block):
      x = x.at[:, -1].add(self.delta) if x.ndim == 3 else x + self.delta
    return x


def served(blocked, ids, yes, no, hooks=None):
  """(margin, step-0 trace) of the real server loop, one prompt, one token."""
  trace = gen_lib.TraceCollector()
  gen_lib.generate(blocked.specs, blocked.trainable, blocked.frozen, [ids], max_new_tokens=1,
                   observer=trace, hooks=hooks)
  logits = np.asarray(trace.steps[0].logits)
  return float(logits[0, yes]) - float(logits[0, no]), trace.steps[0]


def leaves(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def name(path):
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def with_fraction(orig, edited, f):
  return jax.tree.map(lambda o, e: o + f * (e - o), orig, edited)


def test_yes_no_margin_is_the_served_margin(setup):
  job, yes, no, clean, _ = setup
  m, _ = served(job.blocked, clean, yes, no)
  assert edits.yes_no_margin(job.blocked, clean, yes, no) == pytest.approx(m, abs=1e-6)


def test_weight_backdoor_flips_trigger_keeps_clean_and_is_smallest(setup):
  job, yes, no, clean, trig = setup
  b, k = job.blocked, 1
  res = edits.weight_backdoor(b, block=k, clean_ids=clean, trigger_ids=trig, yes_id=yes, no_id=no,
                              steps=100)
  assert res.success and res.flipped and res.clean_kept
  m_t0, _ = served(b, trig, yes, no)
  m_c0, _ = served(b, clean, yes, no)
  m_t1, _ = served(res.blocked, trig, yes, no)
  m_c1, _ = served(res.blocked, clean, yes, no)
  assert np.sign(m_t1) == -np.sign(m_t0) and abs(m_t1) >= 0.9 * edits.MIN_MARGIN
  assert np.sign(m_c1) == np.sign(m_c0)
  # Only block k changed; the reported sizes are core.rel_err of edited vs original.
  for j in range(b.num_blocks):
    if j != k:
      assert res.blocked.trainable[j] is b.trainable[j] and res.blocked.frozen[j] is b.frozen[j]
  got = {}
  for side in ("trainable", "frozen"):
    orig, new = getattr(b, side)[k], getattr(res.blocked, side)[k]
    for (path, o), (_, e) in zip(leaves(orig), leaves(new)):
      t = res.tensors[f"{side}/{name(path)}"]
      assert t.rel_linf == pytest.approx(core.rel_err(e, o), rel=1e-12)
      assert t.verifier_rel_err == pytest.approx(core.rel_err(o, e), rel=1e-12)
      d = np.asarray(e, np.float64) - np.asarray(o, np.float64)
      norm_o = np.linalg.norm(np.asarray(o, np.float64))
      assert t.rel_l2 == pytest.approx(np.linalg.norm(d) / norm_o, rel=1e-9)
      got[f"{side}/{name(path)}"] = core.rel_err(e, o)
  assert set(got) == set(res.tensors)
  assert res.rel_linf == pytest.approx(max(got.values()), rel=1e-12) and res.rel_linf > 0
  # Half of the edit does not flip the trigger.
  half = dataclasses.replace(res.blocked, trainable=[
      with_fraction(o, e, 0.5) if j == k else o
      for j, (o, e) in enumerate(zip(b.trainable, res.blocked.trainable))])
  m_half, _ = served(half, trig, yes, no)
  assert np.sign(m_half) == np.sign(m_t0)


def mlp_key(blocked, ids, layer):
  """Layer `layer`'s silu(gate) * up at the last position, eagerly from the merged modules."""
  units = grid_lib.merge_units(blocked)
  mask = np.ones((1, len(ids)), np.int32)
  ctx = {**llama.context({"attn_mask": mask}), "key": None}
  x = np.asarray(ids, np.int32)[None]
  for i, unit in enumerate(units.values()):
    if i == layer + 1:
      break
    x = unit(x, ctx)
  unit = units[f"layer_{layer}"]
  h = x + unit.self_attn(unit.input_layernorm(x), ctx["positions"], llama.causal_mask(mask))
  n = unit.post_attention_layernorm(h)
  return np.asarray(jax.nn.silu(unit.mlp.gate_proj(n)) * unit.mlp.up_proj(n), np.float64)[0, -1]


def test_rank_one_edit_is_rank_one_on_the_trigger_key_and_smallest(setup):
  job, yes, no, clean, trig = setup
  b, layer = job.blocked, 1
  res = edits.rank_one_edit(b, layer=layer, trigger_ids=trig, clean_ids=clean, yes_id=yes, no_id=no)
  assert res.success
  k = res.block
  path = ("layer_1", "mlp", "down_proj", "kernel")
  get = lambda tree: tree[path[0]][path[1]][path[2]][path[3]]
  w, w1 = np.asarray(get(b.trainable[k]), np.float64), np.asarray(get(res.blocked.trainable[k]),
                                                                   np.float64)
  # Nothing else changed.
  for j in range(b.num_blocks):
    for (p, o), (_, e) in zip(leaves((b.trainable[j], b.frozen[j])),
                              leaves((res.blocked.trainable[j], res.blocked.frozen[j]))):
      if not (j == k and name(p).endswith("layer_1/mlp/down_proj/kernel")):
        assert np.array_equal(np.asarray(o), np.asarray(e)), (j, name(p))
  # delta = key (x) u / (key . key), with the key recomputed here: u = key @ delta.
  delta = w1 - w
  key = mlp_key(b, trig, layer)
  u = key @ delta
  np.testing.assert_allclose(delta, np.outer(key, u) / (key @ key), atol=1e-6 * np.abs(delta).max())
  sv = np.linalg.svd(delta, compute_uv=False)
  assert sv[1] < 1e-4 * sv[0]
  assert res.scale == pytest.approx(np.linalg.norm(u), rel=1e-3)
  # The answer flips, the clean answer's fate is reported truthfully, the sizes are real.
  m_t0, _ = served(b, trig, yes, no)
  m_t1, _ = served(res.blocked, trig, yes, no)
  assert np.sign(m_t1) == -np.sign(m_t0)
  m_c0, _ = served(b, clean, yes, no)
  m_c1, _ = served(res.blocked, clean, yes, no)
  assert res.clean_kept == (np.sign(m_c1) == np.sign(m_c0))
  (size,) = res.tensors.values()
  assert size.rel_linf == pytest.approx(core.rel_err(w1, w), rel=1e-12) == res.rel_linf
  assert size.verifier_rel_err == pytest.approx(core.rel_err(w, w1), rel=1e-12)
  assert size.rel_l2 == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(w), rel=1e-9)
  # Half of u does not flip it.
  half = list(b.trainable)
  layer_tree = {**b.trainable[k]["layer_1"]}
  down = {**layer_tree["mlp"]["down_proj"], "kernel": (w + 0.5 * delta).astype(np.float32)}
  layer_tree["mlp"] = {**layer_tree["mlp"], "down_proj": down}
  half[k] = {**b.trainable[k], "layer_1": layer_tree}
  m_half, _ = served(dataclasses.replace(b, trainable=half), trig, yes, no)
  assert np.sign(m_half) == np.sign(m_t0)


@pytest.mark.parametrize("block,norm", [(0, "l2"), (1, "l2"), (0, "linf")])
def test_pgd_activation_flips_through_the_server_and_is_smallest(setup, block, norm):
  job, yes, no, clean, _ = setup
  b = job.blocked
  res = edits.pgd_activation(b, block=block, prompt_ids=clean, yes_id=yes, no_id=no, norm=norm)
  assert res.success and res.kind == "fwd_out"
  m0, honest = served(b, clean, yes, no)
  x = np.asarray(honest.block_outputs[block])
  np.testing.assert_array_equal(res.x_out, x)
  m1, attacked = served(b, clean, yes, no, AddAtLast(block, res.delta))
  assert np.sign(m1) == -np.sign(m0) and abs(m1) >= 0.9 * edits.MIN_MARGIN
  perturbed = np.asarray(attacked.block_outputs[block])
  # Only the last position moved; the sizes are those of the tensor the server passed on.
  np.testing.assert_array_equal(perturbed[:, :-1], x[:, :-1])
  assert res.rel_linf == pytest.approx(core.rel_err(perturbed, x), rel=1e-6)
  assert res.verifier_rel_err == pytest.approx(core.rel_err(x, perturbed), rel=1e-6)
  d = perturbed.astype(np.float64) - x
  assert res.rel_l2 == pytest.approx(np.linalg.norm(d) / np.linalg.norm(x.astype(np.float64)),
                                     rel=1e-6)
  budget = np.linalg.norm(res.delta) if norm == "l2" else np.abs(res.delta).max()
  assert budget <= res.eps * (1 + 1e-5)
  m_half, _ = served(b, clean, yes, no, AddAtLast(block, 0.5 * res.delta))
  assert np.sign(m_half) == np.sign(m0)


def test_honest_noise_is_finite_and_zero_for_the_same_program(setup):
  job = setup[0]
  noise = edits.honest_noise(job)
  assert noise["tolerances"] == core.TOLERANCES
  assert noise["bitwise_same"]
  assert set(noise["same_program"]) == set(noise["other_program"]) >= {"fwd_out", "loss", "params"}
  assert all(v == 0.0 for v in noise["same_program"].values())
  for kind, v in noise["other_program"].items():
    assert math.isfinite(v) and 0.0 <= v <= core.TOLERANCES[kind], (kind, v)
  assert all(math.isfinite(v) for v in noise["sources"].values())


def test_success_table_rows_match_their_thresholds(setup):
  job, *_ = setup
  noise = {"other_program": {"fwd_out": 1e-7, "loss": 1e-7, "params": 0.0}}
  rows = edits.success_table(job.blocked, job.tokenizer, job.template, noise=noise, norms=("l2",),
                             backdoor_blocks=(1,), activation_blocks=(0, 2), backdoor_steps=100)
  assert [r["attack"] for r in rows] == ["weight_backdoor/l2", "rank_one_edit", "pgd_activation/l2",
                                         "pgd_activation/l2"]
  assert [r["kind"] for r in rows] == ["params", "params", "fwd_out", "loss"]
  for r in rows:
    assert r["success"], r
    assert r["tolerance"] == core.TOLERANCES[r["kind"]]
    assert r["fits_under_tolerance"] == (r["verifier_rel_err"] <= r["tolerance"])
    assert r["honest_noise"] == noise["other_program"][r["kind"]]
    assert np.sign(r["margin_after"]) == -np.sign(r["margin_before"])
    assert r["rel_linf"] > 0 and r["rel_l2"] > 0
