"""Vision jobs (ViT, DINOv2, ResNet) through the same recorder, opening and verifier.

Each run trains the `configs/vision.py` smoke sheets once (8 steps in 4 step blocks of 2;
5 units in 3 layer blocks of 2; a checkpoint at every step block), and cells are opened
and verified exactly as for the language models: honest runs pass every cell (exact and
tolerance), attacks are rejected at the right check and step and nothing else is.
"""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from aftune import errors
from aftune.attacks import training as attacks
from aftune.audit import train_provider
from aftune.audit import train_verifier
from aftune.model import family
from aftune.model import vit
from aftune.record import jobspec
from aftune.train import job as job_lib
from aftune.train import trainer as train
from configs import vision as vision_sheets

ROOT = pathlib.Path(__file__).resolve().parent.parent
CFG = {"audit.checkpoint_interval": 1}
K, S = 3, 4
ALL = [(k, s) for k in range(K) for s in range(S)]


def sheet(variant="smoke", **overrides):
  c = vision_sheets.get_config(variant)
  for k, v in {**CFG, **overrides}.items():
    *path, last = k.split(".")
    node = c
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  cache = {}

  def get(name, variant="smoke", tamper=None, **overrides):
    if name not in cache:
      workdir = tmp_path_factory.mktemp(name)
      train.train(sheet(variant, **overrides), workdir, tamper=tamper)
      cache[name] = workdir
    return cache[name]

  return get


def commitment_of(workdir):
  return json.loads((workdir / "commitment.json").read_text())


def agreed_of(workdir):
  spec = json.loads((workdir / "trace" / "job_spec.json").read_text())
  return {f: spec[f] for f in train_verifier.AGREED_FIELDS}


def audit(workdir, agreed, tamper=None, cells=ALL, **kw):
  provider = train_provider.Provider(workdir, hooks=tamper)
  commitment = commitment_of(workdir)
  return {cell: train_verifier.verify_bundle(provider.open_cell(*cell), commitment=commitment,
                                             agreed=agreed, **kw) for cell in cells}


def assert_caught(reports, caught):
  for cell, rep in sorted(reports.items()):
    if cell in caught:
      assert not rep.passed, f"cell {cell}: the attack was not caught"
      assert (rep.check, rep.step) == caught[cell], (cell, rep.check, rep.step, rep.reason)
    else:
      assert rep.passed, f"untouched cell {cell} rejected: {rep.check}: {rep.reason}"


def every_block(s, check, step):
  return {(k, s): (check, step) for k in range(K)}


# ---- honest runs -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["smoke", "resnet_smoke"])
def test_honest_vision_run_passes_every_cell_exact_and_tolerance(run, variant):
  workdir = run(variant, variant)
  agreed = agreed_of(workdir)
  spec = json.loads((workdir / "trace" / "job_spec.json").read_text())
  assert spec["tokenizer_hash"] is None and "max_len" not in spec["hyperparameters"]
  # the preprocessing and augmentation are bound by the job spec (the model config)
  image = spec["hyperparameters"]["model"]["image"]
  assert image["preprocess"]["stored_size"] == 40 and image["flip"] is True
  provider = train_provider.Provider(workdir)
  commitment = commitment_of(workdir)
  for cell in ALL:
    b = provider.open_cell(*cell)
    if cell[0] == 0:  # the stored images (uint8) and labels are revealed with their proofs
      assert b.tensors["step/0/batch/image" if cell[1] == 0 else
                       f"step/{2 * cell[1]}/batch/image"].dtype == np.uint8
    for mode in ("exact", "tolerance"):
      rep = train_verifier.verify_bundle(b, commitment=commitment, agreed=agreed, mode=mode)
      assert rep.passed, (cell, mode, rep.check, rep.reason)


def test_dinov2_variant_trains_and_its_cells_verify(run):
  workdir = run("dinov2", "dinov2_smoke")
  agreed = agreed_of(workdir)
  model = agreed["hyperparameters"]["model"]
  assert (model["arch"], model["swiglu"], model["num_register_tokens"], model["head"]) == (
      "dinov2", True, 2, "cls_mean")
  reports = audit(workdir, agreed, cells=[(0, 0), (1, 2), (2, 3)])
  assert all(r.passed for r in reports.values()), {c: (r.check, r.reason) for c, r in reports.items()}


def test_resnet_batchnorm_statistics_train_and_are_committed(run):
  workdir = run("resnet_smoke", "resnet_smoke")
  job = job_lib.build_job(sheet("resnet_smoke"))
  mean0 = job.blocked.trainable[0]["embed"]["embedder"]["norm"]["mean"]
  assert np.all(np.asarray(mean0) == 0)  # initial running mean
  provider = train_provider.Provider(workdir)
  b = provider.open_cell(0, S - 1)
  mean_end = b.tensors["state/end/params/embed/embedder/norm/mean"]
  var_end = b.tensors["state/end/params/embed/embedder/norm/var"]
  assert np.abs(mean_end).max() > 1e-3 and not np.allclose(var_end, 1.0)  # they moved
  # the final model hash covers them: change one statistic and the hash changes
  blocked = job.blocked
  h0 = jobspec.model_hash(blocked)
  edited = [dict(t) for t in blocked.trainable]
  embed = jax.tree.map(lambda x: x, edited[0]["embed"])
  embed["embedder"]["norm"]["var"] = embed["embedder"]["norm"]["var"] + 1e-3
  edited[0]["embed"] = embed
  assert jobspec.model_hash(blocked, edited) != h0


def test_sparse_storage_is_regenerated_and_passes(run):
  workdir = run("resnet_sparse", "resnet_smoke", **{"audit.checkpoint_interval": 2,
                                                     "audit.activation_interval": 2})
  provider = train_provider.Provider(workdir)
  commitment, agreed = commitment_of(workdir), agreed_of(workdir)
  for k, s in [(0, 0), (1, 1), (2, 2), (1, 3)]:
    b = provider.open_cell(k, s)
    assert b.manifest["regenerated"], (k, s)
    rep = train_verifier.verify_bundle(b, commitment=commitment, agreed=agreed)
    assert rep.passed, ((k, s), rep.check, rep.reason)


# ---- attacks ---------------------------------------------------------------------------


def test_a_layer_edited_mid_block_is_located_to_that_unit(run):
  workdir = run("unit_mid", tamper=attacks.EditedUnitMidRun(step=2, unit="layer_0"),
                **{"audit.units_per_block": 3})
  reports = audit(workdir, agreed_of(workdir), cells=[(0, 1), (0, 0), (0, 2)])
  assert (reports[(0, 1)].passed, reports[(0, 1)].check, reports[(0, 1)].step,
          reports[(0, 1)].where) == (False, "fwd_out", 3, ["layer_0"])
  assert reports[(0, 0)].passed


def test_forged_boundary_is_caught(run):
  workdir = run("fwd1", tamper=attacks.ForgedForward(step=5, block=1))
  assert_caught(audit(workdir, agreed_of(workdir)),
                {(1, 2): ("fwd_out", 5), (2, 2): ("loss", 5)})


def test_substituted_images_are_caught(run):
  honest = run("smoke", "smoke")
  tamper = attacks.SubstitutedBatch(2)
  reports = audit(run("subst", tamper=tamper), agreed_of(honest), tamper)
  assert_caught(reports, every_block(1, "data", 2))
  assert "is not example" in reports[(0, 1)].reason


def test_flipped_label_is_caught(run):
  honest = run("smoke", "smoke")
  job = job_lib.build_job(sheet())
  label = int(job.encoded["label"][job.example_indices(5)[0]])
  tamper = attacks.PoisonedBatch(5, row=0, token=(label + 1) % 4, field="label")
  reports = audit(run("label", tamper=tamper), agreed_of(honest), tamper)
  assert_caught(reports, every_block(2, "data", 5))


def test_skipped_step_is_caught(run):
  workdir = run("skip", tamper=attacks.SkippedStep(3))
  assert commitment_of(workdir)["job_id"] == commitment_of(run("smoke", "smoke"))["job_id"]
  assert_caught(audit(workdir, agreed_of(workdir)), every_block(1, "params", 3))


def test_changed_batchnorm_statistics_are_caught(run):
  # Step 2 opens step block 1; the shifted statistics of stage1_layer0 (layer block 1) are
  # never read by a training forward, but the next committed state carries them.
  workdir = run("bn", "resnet_smoke", tamper=attacks.EditedBatchStats(step=2, unit="stage1_layer0"))
  reports = audit(workdir, agreed_of(workdir))
  assert_caught(reports, {(1, 1): ("params", 3)})
  assert reports[(1, 1)].where and all(
      w.startswith("stage1_layer0/") and w.rsplit("/", 1)[-1] in ("mean", "var")
      for w in reports[(1, 1)].where), reports[(1, 1)].where


# ---- bad configuration -----------------------------------------------------------------


def test_an_image_size_the_patches_do_not_divide_is_refused():
  with pytest.raises(errors.ConfigError, match="not a multiple of the patch size"):
    job_lib.build_job(sheet(**{"data.preprocess.image_size": 30}))


def test_vision_families_are_registered_behind_the_contract():
  for arch, mod in (("vit", "vit"), ("dinov2", "vit"), ("resnet", "resnet")):
    fam = family.get(arch)
    assert fam.__name__ == f"aftune.model.{mod}" and fam.MODALITY == "image"
    assert fam.INPUT_KEY == "image" and fam.BATCH_KEYS == ("image", "label")
  cfg = vit.config_from_sheet(sheet())
  assert family.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("case", ["corrupt", "label", "arch"])
def test_bad_input_exits_2_naming_the_file_and_writes_nothing(tmp_path, case):
  from aftune.data import tiny_images  # pylint: disable=g-import-not-at-top
  data = tmp_path / "data"
  classes = ["a", "b", "c", "d", "e"] if case == "label" else ["a", "b"]
  for i, c in enumerate(classes):
    (data / c).mkdir(parents=True)
    src = tiny_images.DEFAULT_IMAGES_PATH / tiny_images.CLASS_NAMES[i % 4]
    for j in range(4):
      (data / c / f"{j}.png").write_bytes((src / f"{j:04d}.png").read_bytes())
  args = [f"--config.data.train_path={data}", "--config.batch_size=4"]
  if case == "corrupt":
    (data / "b" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    want = str(data / "b" / "9.png")
  elif case == "label":
    want = "e"  # the fifth class folder: label 4 does not fit a 4-class head
  else:  # a ResNet checkpoint where the sheet says ViT
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["ResNetForImageClassification"],
                                                  "model_type": "resnet"}))
    args.append(f"--config.model.hf_path={ckpt}")
    want = str(ckpt / "config.json")
  workdir = tmp_path / "w"
  r = subprocess.run([sys.executable, "-m", "experiments.finetune", "--config",
                      "configs/vision.py:smoke", "--workdir", str(workdir), *args],
                     cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 2, r.stderr[-2000:]
  err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and want in err[0], r.stderr[-2000:]
  assert not workdir.exists()
