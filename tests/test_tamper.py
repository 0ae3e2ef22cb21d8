"""Dishonest providers against the real recorder, opening and verifier.

Every attack trains once (module-scoped, tiny config: 8 steps in 4 step blocks of 2, 3
layer blocks, a checkpoint at every step block), its cells are opened the way that
provider would open them, and every cell of the 3x4 grid is verified: the cells the
attack touches must be rejected with the right check at the right first step, and
every other cell must pass (the verifier does not just fail everything).
"""

import json
import shutil

import numpy as np
import pytest

from aftune.attacks import forgery
from aftune.attacks import training as attacks
from aftune.audit import bundle as bundle_lib
from aftune.audit import challenge as challenge_lib
from aftune.audit import core
from aftune.audit import provider as provider_lib
from aftune.audit import train_provider
from aftune.audit import train_verifier
from aftune.crypto import hashing
from aftune.record import commitment as commitment_lib
from aftune.record import integrity
from aftune.record import layout as trace
from aftune.record import recorder
from aftune.record import tensorfile
from aftune.train import trainer as train

CFG = {"num_steps": 8, "audit.steps_per_block": 2, "audit.checkpoint_interval": 1}
SPARSE = {**CFG, "audit.checkpoint_interval": 2, "audit.activation_interval": 2}
K, S = 3, 4  # 5 units (embed, layer_0, layer_1, final_norm, lm_head) in blocks of 2; 8 / 2
ALL = [(k, s) for k in range(K) for s in range(S)]


@pytest.fixture(scope="module")
def run(small_config, tmp_path_factory):
  """run(name, tamper, **config overrides) -> workdir; each named run trains once."""
  cache = {}

  def get(name, tamper=None, **overrides):
    if name not in cache:
      workdir = tmp_path_factory.mktemp(name)
      train.train(small_config(**{**CFG, **overrides}), workdir, tamper=tamper)
      cache[name] = workdir
    return cache[name]

  return get


@pytest.fixture(scope="module")
def honest(run):
  return run("honest")


@pytest.fixture(scope="module")
def agreed(honest):
  """What the client agreed to: the honest job spec's agreed fields."""
  spec = json.loads((honest / "trace" / "job_spec.json").read_text())
  return {f: spec[f] for f in train_verifier.AGREED_FIELDS}


@pytest.fixture(scope="module")
def honest_bundles(honest):
  provider = train_provider.Provider(honest)
  return {cell: provider.open_cell(*cell) for cell in ALL}


def commitment_of(workdir):
  return json.loads((workdir / "commitment.json").read_text())


def agreed_of(workdir):
  spec = json.loads((workdir / "trace" / "job_spec.json").read_text())
  return {f: spec[f] for f in train_verifier.AGREED_FIELDS}


def audit(workdir, agreed, tamper=None, *, strict=True, cells=ALL, **kw):
  """Opens cells as the (dishonest) provider of workdir would and verifies each one."""
  provider = train_provider.Provider(workdir, hooks=tamper, strict=strict)
  commitment = commitment_of(workdir)
  return {cell: train_verifier.verify_bundle(provider.open_cell(*cell), commitment=commitment,
                                       agreed=agreed, **kw) for cell in cells}


def assert_caught(reports, caught):
  """caught: cell -> (check, step). Exactly those cells fail, each with that check/step."""
  for cell, rep in sorted(reports.items()):
    if cell in caught:
      assert not rep.passed, f"cell {cell}: the attack was not caught"
      assert (rep.check, rep.step) == caught[cell], (cell, rep.check, rep.step, rep.reason)
    else:
      assert rep.passed, f"untouched cell {cell} rejected: {rep.check}: {rep.reason}"


def every_block(s, check, step):
  return {(k, s): (check, step) for k in range(K)}


# ---- honest runs -----------------------------------------------------------------------


def test_honest_run_passes_every_cell_and_many_challenges(honest, honest_bundles, agreed):
  commitment = commitment_of(honest)
  for cell, b in honest_bundles.items():
    assert not b.manifest["regenerated"]
    for mode in ("exact", "tolerance"):
      rep = train_verifier.verify_bundle(b, commitment=commitment, agreed=agreed, mode=mode)
      assert rep.passed, (cell, mode, rep.check, rep.reason)
  job_id, root = (hashing.from_hex(commitment[f]) for f in ("job_id", "merkle_root"))
  seen = set()
  for i in range(30):
    strategy, m = ("stratified", None) if i % 2 else ("uniform", 3)
    ch = challenge_lib.draw_challenge(job_id=job_id, root=root, num_layer_blocks=K,
                                      num_step_blocks=S, strategy=strategy, m=m,
                                      nonce=i.to_bytes(4, "little") * 8)
    for cell in ch.cells:
      rep = train_verifier.verify_bundle(honest_bundles[tuple(cell)], commitment=commitment,
                                   agreed=agreed, challenge=ch)
      assert rep.passed, (i, cell, rep.check, rep.reason)  # never a false rejection
      seen.add(tuple(cell))
  assert seen == set(ALL)


def test_honest_sparse_storage_is_regenerated_and_passes(run, agreed):
  workdir = run("honest_sparse", **SPARSE)  # checkpoints at 0, 4, 8; boundaries of blocks 0, 2
  provider = train_provider.Provider(workdir)
  commitment = commitment_of(workdir)
  for k, s in [(0, 0), (1, 1), (2, 2), (0, 3), (1, 2), (2, 1)]:  # every row and column
    b = provider.open_cell(k, s)
    # every step block has a start or end state (2 or 6) between checkpoints
    assert b.manifest["regenerated"], (k, s)
    rep = train_verifier.verify_bundle(b, commitment=commitment)
    assert rep.passed, ((k, s), rep.check, rep.reason)


# ---- training-time deviations ----------------------------------------------------------


def test_dishonest_runs_have_the_agreed_job_spec(run, honest):
  """The job spec cannot reveal the cheating: only the replay can."""
  skipped = run("skip_end", attacks.SkippedStep(3))
  assert commitment_of(skipped)["job_id"] == commitment_of(honest)["job_id"]
  assert commitment_of(skipped)["merkle_root"] != commitment_of(honest)["merkle_root"]


def test_skipped_step_is_caught_by_its_step_block(run, agreed):
  workdir = run("skip_end", attacks.SkippedStep(3))  # last step of step block 1
  assert_caught(audit(workdir, agreed), every_block(1, "params", 3))


def test_skipped_step_in_mid_block_is_caught_at_the_next_step(run, agreed):
  # The dropped update of step 2 shows at step 3, whose forward ran on the old state.
  workdir = run("skip_mid", attacks.SkippedStep(2))
  assert_caught(audit(workdir, agreed),
                {(0, 1): ("fwd_out", 3), (1, 1): ("fwd_out", 3), (2, 1): ("loss", 3)})


def test_a_unit_edited_mid_block_is_located_to_that_unit(run, agreed):
  # Step 2 is the first step of step block 1; the edit after it shows at step 3. In
  # block 0 = [embed, layer_0], embed's output still matches; layer_0's is the block's
  # output. With B_L=3, block 0 = [embed, layer_0, layer_1] and layer_0 is inside it.
  workdir = run("unit_mid", attacks.EditedUnitMidRun(step=2, unit="layer_0"),
                **{"audit.units_per_block": 3})
  spec = json.loads((workdir / "trace" / "job_spec.json").read_text())
  agreed3 = {f: spec[f] for f in train_verifier.AGREED_FIELDS}
  reports = audit(workdir, agreed3, cells=[(0, 1), (1, 1), (0, 0), (0, 2)])
  assert not reports[(0, 1)].passed
  assert (reports[(0, 1)].check, reports[(0, 1)].step, reports[(0, 1)].where) == (
      "fwd_out", 3, ["layer_0"])
  assert "unit layer_0" in reports[(0, 1)].reason
  assert reports[(0, 0)].passed


def test_skipped_step_is_caught_when_the_provider_regenerates(run):
  tamper = attacks.SkippedStep(3)
  workdir = run("skip_sparse", tamper, **{"audit.checkpoint_interval": 2})  # ckpts 0, 4, 8
  with pytest.raises(provider_lib.OpeningError, match="does not match its committed hash"):
    train_provider.Provider(workdir).open_cell(0, 1)  # an honest replay cannot reproduce it
  provider = train_provider.Provider(workdir, hooks=tamper)  # replays its own deviation
  commitment, agreed = commitment_of(workdir), agreed_of(workdir)
  reports = {}
  for cell in [(0, 1), (2, 1), (1, 0), (1, 3)]:
    b = provider.open_cell(*cell)
    assert b.manifest["regenerated"]
    reports[cell] = train_verifier.verify_bundle(b, commitment=commitment, agreed=agreed)
  assert_caught(reports, {(0, 1): ("params", 3), (2, 1): ("params", 3)})


def test_duplicated_step_is_caught(run, agreed):
  workdir = run("dup", attacks.DuplicatedStep(3))
  assert_caught(audit(workdir, agreed), every_block(1, "params", 3))


def test_step_with_another_learning_rate_is_caught(run, agreed):
  workdir = run("lr", attacks.LearningRate(5, factor=10.0))
  assert_caught(audit(workdir, agreed), every_block(2, "params", 5))


def test_substituted_batch_with_agreed_indices_is_caught(run, agreed):
  tamper = attacks.SubstitutedBatch(2)
  workdir = run("subst", tamper)
  with pytest.raises(provider_lib.OpeningError, match="batch"):
    train_provider.Provider(workdir).open_cell(0, 1)  # the agreed batch is not what was committed
  reports = audit(workdir, agreed, tamper)  # reveals the examples it really trained on
  assert_caught(reports, every_block(1, "data", 2))
  assert "is not example" in reports[(0, 1)].reason


def test_substituted_batch_with_its_real_indices_is_caught(run, agreed):
  tamper = attacks.SubstitutedBatch(2, commit_real_indices=True)
  reports = audit(run("subst_real", tamper), agreed, tamper)
  assert_caught(reports, every_block(1, "data", 2))
  assert "batch order" in reports[(2, 1)].reason


def test_poisoned_batch_is_caught(run, agreed):
  tamper = attacks.PoisonedBatch(5)
  reports = audit(run("poison", tamper), agreed, tamper)
  assert_caught(reports, every_block(2, "data", 5))


def test_reordered_batches_are_caught_in_both_step_blocks(run, agreed):
  tamper = attacks.ReorderedBatches(3)  # steps 3 and 4 swap: step blocks 1 and 2
  reports = audit(run("reorder", tamper), agreed, tamper)
  assert_caught(reports, {**every_block(1, "data", 3), **every_block(2, "data", 4)})


def test_different_base_model_is_caught_by_the_first_step_block(run, agreed):
  leaf = "layer_1/mlp/up_proj/kernel"
  reports = audit(run("base", attacks.PerturbedBaseModel(block=1, leaf=leaf)), agreed)
  assert_caught(reports, {(1, 0): ("base_model", None)})
  assert reports[(1, 0)].where == [leaf]


def test_edited_final_layer_is_caught_by_the_last_step_block(run, agreed):
  leaf = "layer_1/self_attn/q_proj/kernel"
  reports = audit(run("final_edit", attacks.EditedFinalModel(block=1, leaf=leaf)), agreed)
  assert_caught(reports, {(1, 3): ("params", 7)})
  assert reports[(1, 3)].where == [leaf]


def test_swapped_final_layers_are_caught(run, agreed):
  reports = audit(run("swap", attacks.SwappedFinalLayers("layer_0", "layer_1")), agreed)
  assert_caught(reports, {(0, 3): ("params", 7), (1, 3): ("params", 7)})
  for k, unit in ((0, "layer_0"), (1, "layer_1")):
    where = reports[(k, 3)].where
    assert where and all(p.startswith(unit + "/") for p in where), where


@pytest.mark.parametrize("block,caught", [
    (0, {(0, 2): ("fwd_out", 5), (1, 2): ("fwd_out", 5)}),  # the first block's output
    (1, {(1, 2): ("fwd_out", 5), (2, 2): ("loss", 5)}),  # the middle block's output
    (2, {(2, 2): ("loss", 5)}),  # the loss itself
])
def test_forged_forward_boundary_is_caught(run, agreed, block, caught):
  workdir = run(f"fwd{block}", attacks.ForgedForward(step=5, block=block))
  assert_caught(audit(workdir, agreed), caught)


@pytest.mark.parametrize("block,caught", [
    (1, {(1, 2): ("bwd_in", 5), (2, 2): ("bwd_in", 5)}),  # the cotangent into the middle block
    (2, {(2, 2): ("bwd_in", 5)}),  # the loss cotangent (must be 1)
])
def test_forged_backward_boundary_is_caught(run, agreed, block, caught):
  workdir = run(f"bwd{block}", attacks.ForgedBackward(step=5, block=block))
  assert_caught(audit(workdir, agreed), caught)


TOLERANCE_CASES = {
    "skip_end": (attacks.SkippedStep(3), every_block(1, "params", 3)),
    "lr": (attacks.LearningRate(5, factor=10.0), every_block(2, "params", 5)),
    "fwd1": (attacks.ForgedForward(step=5, block=1), {(1, 2): ("fwd_out", 5), (2, 2): ("loss", 5)}),
    "bwd1": (attacks.ForgedBackward(step=5, block=1), {(1, 2): ("bwd_in", 5), (2, 2): ("bwd_in", 5)}),
}


@pytest.mark.parametrize("name", sorted(TOLERANCE_CASES))
def test_attacks_are_caught_in_tolerance_mode_too(run, agreed, name):
  tamper, caught = TOLERANCE_CASES[name]
  cells = sorted(set(caught) | {(0, 0), (1, 1), (2, 3)})
  reports = audit(run(name, tamper), agreed, tamper, cells=cells, mode="tolerance")
  assert_caught(reports, caught)
  for cell in caught:
    kind = reports[cell].check
    assert reports[cell].max_rel_err[kind] > core.TOLERANCES[kind]


# ---- forged records and openings -------------------------------------------------------


@pytest.mark.parametrize("leaf,caught", [
    (("params", 4, 1), {(1, 1): ("opening", 4), (1, 2): ("opening", 4)}),
    (("loss", 5, -1), every_block(2, "opening", 5)),
])
def test_forged_hash_in_a_resigned_commitment_is_caught(honest, agreed, tmp_path, leaf, caught):
  forged = tmp_path / "forged"
  shutil.copytree(honest, forged)
  new = forgery.forge_leaf(forged, *leaf)
  assert new["merkle_root"] != commitment_of(honest)["merkle_root"]
  assert commitment_lib.load(forged / "commitment.json") == new  # validly signed
  with pytest.raises(provider_lib.OpeningError):
    train_provider.Provider(forged).open_cell(*next(iter(caught)))
  with pytest.raises(trace.TraceError, match="rewritten"):
    integrity.check_workdir(forged, tensors=False)  # the periodic signed roots disagree
  assert_caught(audit(forged, agreed, strict=False), caught)


def test_inclusion_proof_of_another_leaf_is_caught(honest, honest_bundles, agreed):
  commitment = commitment_of(honest)
  b = honest_bundles[(1, 1)]
  for a, c, step in [(("loss", 2, -1), ("loss", 3, -1), 2),
                     (("fwd_out", 3, 1), ("bwd_in", 3, 1), 3),
                     (("params", 2, 1), ("opt_state", 4, 1), 2)]:
    rep = train_verifier.verify_bundle(forgery.swap_proofs(b, a, c), commitment=commitment, agreed=agreed)
    assert (rep.passed, rep.check, rep.step) == (False, "inclusion", step), (a, c, rep.reason)
  assert train_verifier.verify_bundle(b, commitment=commitment, agreed=agreed).passed  # b untouched


@pytest.mark.parametrize("edit,check,step", [
    (lambda b: forgery.edit_tensor(b, "step/3/fwd_out/1"), "opening", 3),
    (lambda b: forgery.edit_tensor(b, "step/2/loss"), "opening", 2),
    (lambda b: forgery.edit_tensor(b, "state/end/params/layer_1/mlp/up_proj/kernel"), "opening", 4),
    (lambda b: forgery.edit_tensor(b, "state/start/opt_state/0/mu/final_norm/norm/scale"),
     "opening", 2),
    (lambda b: forgery.drop_leaf(b, ("bwd_in", 3, 1)), "opening", 3),
    (lambda b: forgery.edit_tensor(b, "step/2/batch/tokens", delta=1), "data", 2),
])
def test_opening_that_does_not_match_its_commitment_is_caught(honest, honest_bundles, agreed,
                                                             edit, check, step):
  rep = train_verifier.verify_bundle(edit(honest_bundles[(1, 1)]), commitment=commitment_of(honest),
                               agreed=agreed)
  assert (rep.passed, rep.check, rep.step) == (False, check, step), rep.reason


def test_commitment_resigned_after_the_challenge_is_caught(honest, agreed, tmp_path):
  original = commitment_of(honest)
  ch = challenge_lib.draw_challenge(
      job_id=hashing.from_hex(original["job_id"]), root=hashing.from_hex(original["merkle_root"]),
      num_layer_blocks=K, num_step_blocks=S, strategy="stratified", nonce=b"client nonce")
  rewritten = tmp_path / "rewritten"
  shutil.copytree(honest, rewritten)
  new = forgery.forge_leaf(rewritten, "loss", 7, -1)  # history rewritten, then re-signed
  provider = train_provider.Provider(rewritten, strict=False)
  for cell in ch.cells:
    b = provider.open_cell(*cell)
    assert b.manifest["commitment"] == new
    rep = train_verifier.verify_bundle(b, commitment=original, agreed=agreed, challenge=ch)
    assert (rep.passed, rep.check) == (False, "commitment"), rep.reason
    rep = train_verifier.verify_bundle(b, commitment=new, agreed=agreed, challenge=ch)
    assert (rep.passed, rep.check) == (False, "challenge"), rep.reason


def _without_entries(b, names=(), prefixes=()):
  b = forgery.copy_bundle(b)
  b.manifest["tensors"] = [e for e in b.manifest["tensors"] if e["name"] not in names]
  b.manifest["trees"] = [e for e in b.manifest["trees"] if e["prefix"] not in prefixes]
  return b


@pytest.mark.parametrize("how", ["unlisted", "relabeled"])
def test_input_activation_must_match_its_commitment(run, honest, agreed, how):
  """Block 1 consumed an input that is not the committed fwd_out[0] (here: the committed one
  is forged). Revealing the real input without listing it (or listed as another leaf)
  must not let cell (1, 2) pass."""
  workdir = run("fwd0", attacks.ForgedForward(step=5, block=0))
  b = train_provider.Provider(workdir).open_cell(1, 2)
  name = "step/5/fwd_out/0"
  if how == "unlisted":
    real = tensorfile.read(recorder.step_file(honest, 5, "fwd"))["fwd_out/0"]
    cheat = _without_entries(b, names=[name])
  else:  # listed as the (honest, committed) step-4 activation: a valid leaf, wrong place
    cheat = forgery.copy_bundle(b)
    real = cheat.tensors["step/4/fwd_out/0"]
    entry = next(e for e in cheat.manifest["tensors"] if e["name"] == name)
    entry["step"] = 4
  cheat.tensors[name] = np.array(real)
  rep = train_verifier.verify_bundle(cheat, commitment=commitment_of(workdir), agreed=agreed)
  assert (rep.passed, rep.check, rep.step) == (False, "opening", 5), (rep.check, rep.reason)


@pytest.mark.parametrize("mode", ["exact", "tolerance"])
def test_unlisted_end_state_cannot_hide_an_update(run, honest_bundles, agreed, mode):
  """LR x10 at step 5: the provider reveals the honest end state of cell (1, 2) instead of
  the committed one, and drops the end-state entries from the manifest."""
  workdir = run("lr", attacks.LearningRate(5, factor=10.0))
  cheat = _without_entries(train_provider.Provider(workdir).open_cell(1, 2),
                           prefixes=["state/end/params", "state/end/opt_state"])
  for name, arr in honest_bundles[(1, 2)].tensors.items():
    if name.startswith("state/end/"):
      cheat.tensors[name] = arr
  rep = train_verifier.verify_bundle(cheat, commitment=commitment_of(workdir), agreed=agreed, mode=mode)
  assert (rep.passed, rep.check, rep.step) == (False, "opening", 6), (rep.check, rep.reason)


# ---- bad input -------------------------------------------------------------------------


def test_bundle_of_another_job_or_outside_the_grid_is_bad_input(run, honest, honest_bundles):
  other = commitment_of(run("honest_sparse", **SPARSE))
  assert other["job_id"] != commitment_of(honest)["job_id"]
  with pytest.raises(core.AuditInputError, match="job"):
    train_verifier.verify_bundle(honest_bundles[(0, 0)], commitment=other)
  for cell in ({"layer_block": K, "step_block": 0}, {"layer_block": 0, "step_block": S},
               {"layer_block": -1, "step_block": 0}):
    b = bundle_lib.Bundle({**honest_bundles[(0, 0)].manifest, "cell": cell},
                          honest_bundles[(0, 0)].tensors)
    with pytest.raises(core.AuditInputError, match="outside"):
      train_verifier.verify_bundle(b, commitment=commitment_of(honest))


def test_damaged_bundle_files_raise_bundle_error(honest, honest_bundles, agreed, tmp_path):
  path = tmp_path / bundle_lib.bundle_name(1, 1)
  bundle_lib.write_bundle(path, honest_bundles[(1, 1)])
  back = bundle_lib.read_bundle(path)
  assert back.cell == (1, 1)
  assert train_verifier.verify_bundle(back, commitment=commitment_of(honest), agreed=agreed).passed
  data = path.read_bytes()
  with pytest.raises(bundle_lib.BundleError):
    bundle_lib.read_bundle(tmp_path / "missing.bundle")
  for damaged in (data[: len(data) // 2], data[:-1],
                  data[:len(data) // 3] + bytes([data[len(data) // 3] ^ 0x01]) + data[len(data) // 3 + 1:]):
    path.write_bytes(damaged)
    with pytest.raises(bundle_lib.BundleError, match=path.name):
      bundle_lib.read_bundle(path)
