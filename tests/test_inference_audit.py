"""Dishonest serving against the real recorder, opening and verifier (aftune/inference_attacks.py).

One tiny model is trained once (module scope: 2 decoder layers, 5 units in 3 layer blocks
of B_L = 2: k=0 holds embed and layer_0, k=1 layer_1 and final_norm, k=2 lm_head). A batch
of 3 prompts (5, 13 and 16 tokens) is served for 6 steps, greedy with the eos stop token:
rows 0 and 1 stop at step 0 and emit padding afterwards, row 2 runs all 6 steps. Every
attack really generates with its deviation, is recorded and signed by `serving.serve`,
opened as that provider would open it, and every (block k, step t) cell of the 3 x 6 grid
is verified against the promised model (the training commitment's final model hash): the
cells the attack touches are rejected with the right check at the right first step, every
other cell passes. docs/inference.md has the table.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aftune.attacks import serving as A
from aftune.audit import bundle as bundle_lib
from aftune.audit import client as audit
from aftune.audit import core
from aftune.audit import infer_provider
from aftune.audit import infer_verifier
from aftune.audit import provider as provider_lib
from aftune.data import encoding
from aftune.data import records as records_lib
from aftune.infer import serving
from aftune.record import tensorfile
from aftune.train import trainer as train

ROOT = Path(__file__).resolve().parent.parent
K, T = 3, 6
ALL = [(k, t) for k in range(K) for t in range(T)]
QUESTIONS = ["hi", "what is the capital of france?", "tell me a joke please"]


@pytest.fixture(scope="module")
def trained(small_config, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  train.train(small_config(num_steps=4), workdir)
  return workdir


@pytest.fixture(scope="module")
def model(trained):
  return serving.load_from_training(trained)


@pytest.fixture(scope="module")
def promised(trained):
  """What the client was promised: the final model of the audited training job."""
  return json.loads((trained / "commitment.json").read_text())["final_model_hash"]


@pytest.fixture(scope="module")
def prompts(model):
  return [encoding.encode_prompt([records_lib.Message("user", q)], model.tokenizer, model.template)
          for q in QUESTIONS]


@pytest.fixture(scope="module")
def settings(model):
  """name -> ServeSettings: greedy, sampled, and sampled with I_A = 2."""
  greedy = serving.ServeSettings(max_new_tokens=T, stop_tokens=(model.tokenizer.eos_id,),
                                   pad_id=model.tokenizer.pad_id)
  sampled = dataclasses.replace(greedy, temperature=0.8, top_k=20, top_p=0.9, seed=3, batch_id=1)
  return {"greedy": greedy, "sampled": sampled,
          "sampled_sparse": dataclasses.replace(sampled, activation_interval=2),
          "greedy_sparse": dataclasses.replace(greedy, activation_interval=2),
          "greedy_nostop": dataclasses.replace(greedy, stop_tokens=())}


@pytest.fixture(scope="module")
def served(tmp_path_factory, model, prompts, settings):
  """served(name, attack, settings_name) -> record dir; each named record is served once."""
  base = tmp_path_factory.mktemp("served")
  cache = {}

  def get(name, attack=None, settings_name="greedy"):
    if name not in cache:
      A.serve(model, prompts, settings[settings_name], base / name, key_path=base / "key.pem",
              attack=attack)
      cache[name] = base / name
    return cache[name]

  return get


def commitment_of(record):
  return json.loads((record / "commitment.json").read_text())


def tokens_of(record):
  grid = serving.load_record(record)[2]
  stored = tensorfile.read(record / "tensors.safetensors.zst")
  return np.stack([stored[f"tokens/{t}"] for t in range(grid.num_steps)], axis=1)


def audit_cells(record, model, promised, attack=None, *, cells=ALL, mode="exact", **reveal):
  """Opens cells as the (dishonest) provider of record would and verifies each one."""
  provider = A.DishonestInferenceProvider(record, model, attack or A.Honest(), **reveal)
  commitment = commitment_of(record)
  return {cell: infer_verifier.verify_inference_bundle(
      provider.open_cell(*cell), commitment=commitment, expected_model_hash=promised, mode=mode)
          for cell in cells}


def assert_caught(reports, caught):
  """caught: cell -> (check, step[, where]). Exactly those cells fail, with that check/step."""
  for cell, rep in sorted(reports.items()):
    if cell in caught:
      assert not rep.passed, f"cell {cell}: the attack was not caught"
      want = caught[cell]
      got = (rep.check, rep.step, rep.where)[:len(want)]
      assert got == want, (cell, rep.check, rep.step, rep.where, rep.reason)
    else:
      assert rep.passed, f"untouched cell {cell} rejected: {rep.check}: {rep.reason}"


def from_step(k, t, *verdict, steps=T):
  """Cells (k, t'), t' >= t: each replays through step t, where the record leaves the rule."""
  return {(k, s): verdict for s in range(t, steps)}


# ---- honest serving ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["greedy", "sampled", "sampled_sparse"])
def test_honest_batch_passes_every_cell(served, model, promised, settings, name):
  record = served(f"honest_{name}", settings_name=name)
  tokens = tokens_of(record)
  assert tokens.shape == (3, T)
  if name == "greedy":  # rows 0 and 1 stopped at step 0 and emit padding: the verifier checks it
    assert (tokens[:2, 0] == model.tokenizer.eos_id).all()
    assert (tokens[:2, 1:] == model.tokenizer.pad_id).all()
  else:  # the sampling key matters: another seed samples other tokens
    assert not np.array_equal(tokens, tokens_of(served("honest_greedy")))
  if name == "sampled_sparse":  # block 1's outputs are not stored: the provider regenerates them
    stored = tensorfile.read(record / "tensors.safetensors.zst")
    assert "out/0/0" in stored and "out/0/2" in stored and "out/0/1" not in stored
  provider = infer_provider.InferenceProvider(record, model)
  commitment = commitment_of(record)
  for cell in ALL:
    rep = infer_verifier.verify_inference_bundle(provider.open_cell(*cell), commitment=commitment,
                                                  expected_model_hash=promised)
    assert rep.passed, (cell, rep.check, rep.reason)
  rep = infer_verifier.verify_inference_bundle(provider.open_cell(K - 1, T - 1),
                                                commitment=commitment, mode="tolerance")
  assert rep.passed and rep.max_rel_err["loss"] == 0.0


def test_challenge_over_the_inference_commitment(served, model, promised, tmp_path):
  record = served("honest_greedy")
  commitment = commitment_of(record)
  ch = audit.draw(commitment, "uniform", m=4, nonce=b"\x07" * 32)
  assert len(ch.cells) == 4 and all(0 <= k < K and 0 <= t < T for k, t in ch.cells)
  provider = infer_provider.InferenceProvider(record, model)
  paths = provider.open_challenge([tuple(c) for c in ch.cells], tmp_path / "bundles")
  verdict = audit.verify_openings(paths, commitment=commitment, challenge=ch, agreed=None,
                                  expected_model_hash=promised)
  assert verdict["passed"] and verdict["num_cells"] == 4 and verdict["kind"] == "inference"
  # A cell that was not challenged, or a challenge drawn from another root, is refused.
  other = next(c for c in ALL if c not in {tuple(x) for x in ch.cells})
  rep = infer_verifier.verify_inference_bundle(provider.open_cell(*other), commitment=commitment,
                                                challenge=ch)
  assert (rep.passed, rep.check) == (False, "challenge")
  stale = audit.draw(commitment_of(served("honest_sampled", settings_name="sampled")), "uniform",
                     m=4, nonce=b"\x07" * 32)
  rep = infer_verifier.verify_inference_bundle(provider.open_cell(*ch.cells[0]),
                                                commitment=commitment, challenge=stale)
  assert (rep.passed, rep.check) == (False, "challenge")


# ---- 1, 2: another model at serving time -----------------------------------------------------


def test_other_model_with_its_own_hash(served, model, promised):
  record = served("other_model", A.OtherModel())
  spec = json.loads((record / "spec.json").read_text())
  assert spec["model_hash"] != promised
  reports = audit_cells(record, model, promised, A.OtherModel(), digests="served")
  assert_caught(reports, {c: ("model", None, None) for c in ALL})
  assert "not the promised model" in reports[(0, 0)].reason
  # The record itself is self-consistent: only the promised model hash binds the model.
  assert all(r.passed for r in audit_cells(record, model, None, A.OtherModel(), digests="served",
                                           cells=[(0, 0), (2, T - 1)]).values())


def test_other_model_claiming_the_promised_hash(served, model, promised):
  attack = A.OtherModel(claim_promised=True)
  record = served("claimed_model", attack)
  assert json.loads((record / "spec.json").read_text())["model_hash"] == promised
  first = {0: "embed/embedding", 1: "final_norm/norm/scale", 2: "lm_head/kernel"}
  # Served weights under the promised model's digests: the first parameter of the block.
  reports = audit_cells(record, model, promised, attack)
  assert_caught(reports, {(k, t): ("model", None, [first[k]]) for k, t in ALL})
  # Served weights with their own digests: the digests do not hash to the claimed model.
  reports = audit_cells(record, model, promised, attack, digests="served", cells=[(1, 2)])
  assert_caught(reports, {(1, 2): ("model", None, None)})
  assert "digests do not hash" in reports[(1, 2)].reason


def test_edited_layer(served, model, promised):
  attack = A.EditedLayer(block=1, leaf="layer_1/mlp/down_proj/kernel")
  record = served("edited_layer", attack)
  reports = audit_cells(record, model, promised, attack)
  assert_caught(reports, {(1, t): ("model", None, ["layer_1/mlp/down_proj/kernel"])
                          for t in range(T)})
  # Revealing the promised weights instead: block 1's replay leaves the record at once.
  reports = audit_cells(record, model, promised, attack, weights="promised")
  assert_caught(reports, from_step(1, 0, "fwd_out", 0))


# ---- 3: a perturbed activation ---------------------------------------------------------------


@pytest.mark.parametrize("k,t", [(0, 2), (1, 2), (2, 2), (1, 0)])
def test_perturbed_activation(served, model, promised, k, t):
  """Block k's output at step t is perturbed and generation goes on from it: cells (k, t'),
  t' >= t, reject at step t (fwd_out; loss for the logits). Cell (k+1, t) passes: block
  k+1 replays from the committed (perturbed) input, as the provider ran it."""
  attack = A.PerturbedActivation(k, t)
  record = served(f"act_{k}_{t}", attack)
  reports = audit_cells(record, model, promised, attack)
  assert_caught(reports, from_step(k, t, "loss" if k == K - 1 else "fwd_out", t))


def test_perturbed_activation_regenerated(served, model, promised):
  """I_A = 2: block 1's outputs are not stored; the provider regenerates them by replaying
  its own deviation, and is still caught. The honest regeneration would not match."""
  attack = A.PerturbedActivation(1, 2)
  record = served("act_1_2_sparse", attack, "greedy_sparse")
  reports = audit_cells(record, model, promised, attack)
  assert_caught(reports, from_step(1, 2, "fwd_out", 2))
  with pytest.raises(provider_lib.OpeningError, match="output of block 1 at step 2"):
    infer_provider.InferenceProvider(record, model).open_cell(2, 2)


def test_perturbed_activation_in_tolerance_mode(served, model, promised):
  attack = A.PerturbedActivation(1, 2)
  reports = audit_cells(served("act_1_2", attack), model, promised, attack, mode="tolerance",
                        cells=[(1, 1), (1, 2), (2, 2)])
  assert_caught(reports, {(1, 2): ("fwd_out", 2)})
  assert reports[(1, 2)].max_rel_err["fwd_out"] > 1e-3


# ---- 4, 5: tokens and sampling keys ----------------------------------------------------------


def test_swapped_token(served, model, promised):
  """Row 2 emits another token at step 2 and goes on with it: the last block's cells from
  step 2 reject ("token"); block 0 consumes the committed token, so its cells replay."""
  attack = A.SwappedToken(step=2, row=2)
  record = served("swapped_token", attack)
  honest, swapped = tokens_of(served("honest_greedy")), tokens_of(record)
  assert swapped[2, 2] != honest[2, 2] and np.array_equal(swapped[:, :2], honest[:, :2])
  reports = audit_cells(record, model, promised, attack)
  assert_caught(reports, from_step(K - 1, 2, "token", 2, [2]))


def test_sampling_key_not_from_the_seed(served, model, promised):
  """A step-2 key not derived from (seed, batch_id, 2), recorded: every cell that reveals
  step 2 rejects at authentication ("sample_key")."""
  attack = A.OtherSamplingKey(step=2)
  record = served("other_key", attack, "sampled")
  honest = tokens_of(served("honest_sampled", settings_name="sampled"))
  assert not np.array_equal(tokens_of(record)[:, 2], honest[:, 2])
  reports = audit_cells(record, model, promised, attack)
  caught = {}
  for k in range(K):
    caught.update(from_step(k, 2, "sample_key", 2))
  assert_caught(reports, caught)


def test_sampling_with_another_key_under_the_agreed_one(served, model, promised):
  """The agreed key committed, another one used: the tokens do not follow ("token")."""
  attack = A.OtherSamplingKey(step=2, commit_agreed_key=True)
  record = served("other_key_agreed", attack, "sampled")
  honest = tokens_of(served("honest_sampled", settings_name="sampled"))
  rows = np.nonzero(tokens_of(record)[:, 2] != honest[:, 2])[0].tolist()
  assert rows
  reports = audit_cells(record, model, promised, attack)
  assert_caught(reports, from_step(K - 1, 2, "token", 2, rows))


def test_truncated_generation(served, model, promised):
  """Stopped after 3 of 6 steps with row 2 unfinished: only the last cell of the last block
  sees every row's state at the end ("token", step 2, the unfinished rows)."""
  attack = A.Truncated(3)
  record = served("truncated", attack)
  assert serving.load_record(record)[2].num_steps == 3
  cells = [(k, t) for k in range(K) for t in range(3)]
  reports = audit_cells(record, model, promised, attack, cells=cells)
  assert_caught(reports, {(K - 1, 2): ("token", 2, [2])})
  assert "stopped after step 2" in reports[(K - 1, 2)].reason


# ---- 6: batch composition --------------------------------------------------------------------


def later_blocks_caught(reports):
  """For blocks k >= 1, where a batch-composition attack is caught depends on the CPU's
  kernels (a block's replay of fewer rows may or may not leave the record: block 1 did on
  one machine and not on another); what holds everywhere is the shape of a detection: a
  cell fails exactly when its replay reaches the first step where its block leaves the
  record. Returns those cells (cell -> (check, step))."""
  caught = {}
  for k in range(1, K):
    failed = sorted(t for (j, t), r in reports.items() if j == k and not r.passed)
    if failed:
      first = reports[(k, failed[0])].step
      caught.update(from_step(k, first, "fwd_out", first))
  return caught


def test_extra_prompt_in_the_batch(served, model, promised, prompts):
  """Run with a 4th prompt, the agreed 3 rows committed: block 0's activations differ from
  the agreed batch's from the prefill on (kernels are not batch-invariant); later blocks:
  see `later_blocks_caught`."""
  attack = A.OtherComposition("extra", (tuple(prompts[1]),))
  reports = audit_cells(served("extra_prompt", attack), model, promised, attack)
  assert_caught(reports, {**from_step(0, 0, "fwd_out", 0), **later_blocks_caught(reports)})


def test_each_prompt_run_alone(served, model, promised):
  """Each prompt run alone, assembled into the agreed batch: block 0's prefill output lacks
  the padding columns (zeros); later blocks: see `later_blocks_caught`. (No stop token:
  each run alone must last as many steps as the batch.)"""
  attack = A.OtherComposition("solo")
  reports = audit_cells(served("solo", attack, "greedy_nostop"), model, promised, attack)
  assert_caught(reports, {**from_step(0, 0, "fwd_out", 0), **later_blocks_caught(reports)})


def test_reordered_batch_is_the_same_record(served, model, promised):
  """The prompts run in reverse order, rows put back: on this backend every row's result
  is bitwise independent of its position, so the record IS the agreed batch's record
  (same root): nothing deviates, and every cell passes."""
  attack = A.OtherComposition("reversed")
  record = served("reversed", attack)
  assert commitment_of(record)["merkle_root"] == commitment_of(served("honest_greedy"))["merkle_root"]
  assert all(r.passed for r in audit_cells(record, model, promised, attack).values())


# ---- known gap: the served architecture is not bound to the promised model ------------------


def test_promised_weights_under_another_architecture(served, model, promised, trained):
  """The promised weights served in bf16 instead of fp32, declared in the spec (the same
  holds for another rms_norm_eps or rope_theta)."""
  attack = A.OtherArchitecture((("dtype", "bfloat16"),))
  record = served("arch_bf16", attack)
  spec = json.loads((record / "spec.json").read_text())
  assert spec["model_hash"] == promised and spec["model"]["dtype"] == "bfloat16"
  logits = lambda r: tensorfile.read(r / "tensors.safetensors.zst")["out/0/2"]
  assert not np.array_equal(logits(record), logits(served("honest_greedy")))  # it deviates
  # The weights alone pass; the promised architecture (the agreed job spec's model) does not.
  reports = audit_cells(record, model, promised, attack, cells=[(0, 0), (1, 2), (2, T - 1)])
  assert all(r.passed for r in reports.values())
  provider = A.DishonestInferenceProvider(record, model, attack)
  agreed_model = json.loads((trained / "trace" / "job_spec.json").read_text())[
      "hyperparameters"]["model"]
  for cell in [(0, 0), (1, 2), (2, T - 1)]:
    rep = infer_verifier.verify_inference_bundle(
        provider.open_cell(*cell), commitment=commitment_of(record), expected_model_hash=promised,
        expected_model_config=agreed_model)
    assert (rep.passed, rep.check, rep.where) == (False, "model", ["dtype"])


# ---- 8: bad input ----------------------------------------------------------------------------


def test_bundle_of_another_batch_and_cells_outside_the_grid(served, model):
  record = served("honest_greedy")
  provider = infer_provider.InferenceProvider(record, model)
  other = infer_provider.InferenceProvider(served("honest_sampled", settings_name="sampled"), model)
  with pytest.raises(core.AuditInputError, match="another served batch"):
    infer_verifier.verify_inference_bundle(other.open_cell(0, 1), commitment=provider.commitment)
  for k, t in [(K, 0), (0, T), (-1, 0)]:
    with pytest.raises(provider_lib.OpeningError, match="outside"):
      provider.open_cell(k, t)
  b = provider.open_cell(1, 1)
  b.manifest["cell"] = {"layer_block": 1, "step_block": T}
  with pytest.raises(core.AuditInputError, match="outside"):
    infer_verifier.verify_inference_bundle(b, commitment=provider.commitment)
  with pytest.raises(core.AuditInputError, match="mode"):
    infer_verifier.verify_inference_bundle(provider.open_cell(0, 0),
                                            commitment=provider.commitment, mode="lenient")


@pytest.mark.parametrize("edit,check,step", [
    ("out/1/0", "opening", 1),  # a revealed activation that is not the committed one
    ("tokens/2", "opening", 2),  # revealed tokens that are not the committed ones
    ("proof", "inclusion", 1),  # a leaf with another leaf's proof
    ("commitment", "commitment", None),  # the bundle carries a rewritten commitment
])
def test_forged_opening(served, model, edit, check, step):
  record = served("honest_greedy")
  provider = infer_provider.InferenceProvider(record, model)
  b = provider.open_cell(1, 3)
  if edit == "proof":
    entries = [e for e in b.manifest["leaves"] if e["kind"] == "inf_out" and e["step"] == 1]
    entries[0]["proof"], entries[1]["proof"] = entries[1]["proof"], entries[0]["proof"]
  elif edit == "commitment":
    b.manifest["commitment"] = {**b.manifest["commitment"], "merkle_root": "00" * 32}
  else:
    b.tensors[edit] = b.tensors[edit] + (1 if b.tensors[edit].dtype.kind == "i" else 1e-3)
  rep = infer_verifier.verify_inference_bundle(b, commitment=provider.commitment)
  assert (rep.passed, rep.check, rep.step) == (False, check, step), rep.reason


# ---- 9: the command line ---------------------------------------------------------------------


def _run(*args):
  return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True,
                        text=True, check=False)


def test_cli_serve_challenge_open_verify(trained, tmp_path):
  (tmp_path / "prompts.txt").write_text("\n".join(QUESTIONS[1:]) + "\n")
  record = tmp_path / "served"
  r = _run("experiments.infer", "--workdir", trained, "--prompts", tmp_path / "prompts.txt",
           "--out", record, "--serve.max_new_tokens=4")
  assert r.returncode == 0, r.stderr[-3000:]
  r = _run("experiments.challenge", "--commitment", record / "commitment.json", "--strategy",
           "uniform", "--m", 3, "--out", tmp_path / "challenge.json")
  assert r.returncode == 0, r.stderr[-3000:]
  r = _run("experiments.open", "--workdir", trained, "--record", record, "--challenge",
           tmp_path / "challenge.json", "--out", tmp_path / "bundles")
  assert r.returncode == 0, r.stderr[-3000:]
  bundles = sorted((tmp_path / "bundles").glob("*.bundle"))
  assert len(bundles) == 3
  # The tampered copy: one parameter of the first bundle's block edited.
  shutil.copytree(tmp_path / "bundles", tmp_path / "tampered")
  path = tmp_path / "tampered" / bundles[0].name
  b = bundle_lib.read_bundle(path)
  name = min(n for n in b.tensors if n.startswith("params/"))
  b.tensors[name] = b.tensors[name] + np.float32(1e-3)
  path.unlink()
  bundle_lib.write_bundle(path, b)
  verdicts = {}
  for which in ("bundles", "tampered"):
    r = _run("experiments.verify", "--commitment", record / "commitment.json", "--challenge",
             tmp_path / "challenge.json", "--bundles", tmp_path / which, "--training_commitment",
             trained / "commitment.json", "--request", record / "request.json", "--response",
             record / "response.json", "--allow_unbound", "--out", tmp_path / f"{which}.json")
    verdicts[which] = (r.returncode, json.loads((tmp_path / f"{which}.json").read_text()), r)
  code, verdict, r = verdicts["bundles"]
  assert code == 0 and verdict["passed"] and verdict["num_cells"] == 3, r.stdout + r.stderr[-3000:]
  assert verdict["expected_model_hash"] == json.loads(
      (trained / "commitment.json").read_text())["final_model_hash"]
  assert [u.split(" (")[0] for u in verdict["unchecked"]] == ["the promised architecture"]
  code, verdict, r = verdicts["tampered"]
  assert code == 1, r.stdout + r.stderr[-3000:]
  failed = [c for c in verdict["cells"] if not c["passed"]]
  assert len(failed) == 1 and failed[0]["check"] == "model"
  assert failed[0]["where"] == [name[len("params/"):]]


def test_the_served_request_must_be_the_clients(served, model, promised, prompts):
  """A provider that honestly commits what it ran is still held to what the client sent."""
  record = served("honest_greedy")
  provider = infer_provider.InferenceProvider(record, model)
  b = provider.open_cell(0, 0)
  ok = {"prompts": prompts, "settings": {"max_new_tokens": T, "temperature": 0.0}}
  verify = lambda request: infer_verifier.verify_inference_bundle(
      b, commitment=commitment_of(record), expected_model_hash=promised, expected_request=request)
  assert verify(ok).passed
  rep = verify({**ok, "prompts": prompts[:-1]})
  assert (rep.passed, rep.check) == (False, "spec")
  rep = verify({**ok, "settings": {"temperature": 0.7}})
  assert (rep.passed, rep.check) == (False, "spec") and "temperature" in rep.reason
