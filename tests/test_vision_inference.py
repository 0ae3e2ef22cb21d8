"""Audited image classification: a batch of images classified by a fine-tuned vision model,
its outputs and predictions committed per (layer block, batch), opened and verified.

One ViT and one ResNet (BatchNorm in inference mode) are trained once with the smoke
sheets; every served batch is checked cell by cell, honest and dishonest.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from aftune import errors
from aftune.attacks import training as attacks
from aftune.audit import classify_verifier
from aftune.audit import infer_provider
from aftune.audit import infer_verifier
from aftune.audit import train_provider
from aftune.crypto import hashing
from aftune.data import tiny_images
from aftune.infer import classify
from aftune.infer import serving
from aftune.model import vit
from aftune.record import jobspec
from aftune.train import trainer as train
from configs import vision as vision_sheets

ROOT = pathlib.Path(__file__).resolve().parent.parent


def sheet(variant):
  c = vision_sheets.get_config(variant)
  c.audit.checkpoint_interval = 1
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  cache = {}

  def get(variant):
    if variant not in cache:
      workdir = tmp_path_factory.mktemp(variant)
      train.train(sheet(variant), workdir)
      cache[variant] = workdir
    return cache[variant]

  return get


@pytest.fixture(scope="module")
def images():
  """Two images of each class of the tiny set, prepared as the smoke sheets' preprocessing."""
  files = [tiny_images.DEFAULT_IMAGES_PATH / c / f"{i:04d}.png"
           for c in tiny_images.CLASS_NAMES for i in (0, 1)]
  model_cfg = vit.config_from_sheet(sheet("smoke"))
  return files, classify.load_images(files, model_cfg.image.preprocess)


class FlippedPrediction(classify.Honest):
  """Commits (and returns) another class for row 0 than the model predicts."""

  def predictions(self, preds):
    preds = preds.copy()
    preds[0] = (preds[0] + 1) % 4
    return preds


@dataclasses.dataclass
class ForgedOutput(classify.Honest):
  block: int

  def block_out(self, k, x):
    return x + 1e-3 if k == self.block else x


@dataclasses.dataclass
class OtherModel(classify.Honest):
  """Serves a perturbed model but declares the promised one's hash."""

  def served(self, model):
    trainable = list(model.blocked.trainable)
    trainable[1] = attacks.perturb(trainable[1], 1e-2)
    return dataclasses.replace(model, blocked=dataclasses.replace(model.blocked, trainable=trainable))


def serve(workdir, images, out, hooks=None, **kw):
  model = serving.load_from_training(workdir)
  return model, classify.serve_images(model, images, out, key_path=workdir / "provider_key.pem",
                                      hooks=hooks, **kw)


def verify_all(workdir, record, hooks=None, **kw):
  model = serving.load_from_training(workdir)
  binding = train_provider.Provider(workdir).training_binding()
  provider = infer_provider.ClassificationProvider(record, model, hooks=hooks, training_binding=binding)
  commitment = json.loads((record / "commitment.json").read_text())
  training = json.loads((workdir / "commitment.json").read_text())
  request = json.loads((record / "request.json").read_text())
  response = json.loads((record / "response.json").read_text())
  return {k: infer_verifier.verify_inference_bundle(
      provider.open_cell(k, 0), commitment=commitment, training_commitment=training,
      expected_request=request, response=response, **kw)
      for k in range(provider.grid.num_layer_blocks)}


@pytest.mark.parametrize("variant", ["smoke", "resnet_smoke"])
def test_honest_classification_passes_every_cell(trained, images, tmp_path, variant):
  workdir = trained(variant)
  files, imgs = images
  model, out = serve(workdir, imgs, tmp_path / "b0")
  # the predictions are the argmax of the whole model's logits, in inference mode
  outs, preds = classify.run_blocks(model.blocked, imgs)
  assert np.array_equal(out["predictions"], np.asarray(preds))
  response = json.loads((tmp_path / "b0" / "response.json").read_text())
  assert [r[0] for r in response["tokens"]] == out["predictions"].tolist()
  for mode in ("exact", "tolerance"):
    reports = verify_all(workdir, tmp_path / "b0", mode=mode)
    assert all(r.passed for r in reports.values()), {k: (r.check, r.reason) for k, r in reports.items()}
  assert len(reports) == 3


def test_resnet_serves_with_running_statistics(trained, images):
  model = serving.load_from_training(trained("resnet_smoke"))
  stats = model.blocked.trainable[0]["embed"]["embedder"]["norm"]
  assert np.abs(np.asarray(stats["mean"])).max() > 0  # trained running statistics
  _, imgs = images
  before, _ = classify.run_blocks(model.blocked, imgs)
  t = [jax.tree.map(lambda x: x, b) for b in model.blocked.trainable]
  t[0]["embed"]["embedder"]["norm"]["mean"] = stats["mean"] + 1.0
  after, _ = classify.run_blocks(dataclasses.replace(model.blocked, trainable=t), imgs)
  assert not np.array_equal(np.asarray(before[0]), np.asarray(after[0]))  # eval mode reads them


def test_sparse_outputs_are_regenerated(trained, images, tmp_path):
  workdir = trained("smoke")
  serve(workdir, images[1], tmp_path / "b0", activation_interval=2)
  reports = verify_all(workdir, tmp_path / "b0")
  assert all(r.passed for r in reports.values())


def test_a_forged_prediction_is_caught_by_rederiving_the_class(trained, images, tmp_path):
  workdir = trained("smoke")
  serve(workdir, images[1], tmp_path / "b0", hooks=FlippedPrediction())
  reports = verify_all(workdir, tmp_path / "b0")
  assert [r.passed for r in reports.values()] == [True, True, False]
  assert reports[2].check == "token" and reports[2].where == [0]


def test_a_forged_block_output_is_caught(trained, images, tmp_path):
  workdir = trained("smoke")
  serve(workdir, images[1], tmp_path / "b0", hooks=ForgedOutput(block=1))
  reports = verify_all(workdir, tmp_path / "b0", hooks=ForgedOutput(block=1))
  assert [r.passed for r in reports.values()] == [True, False, True]
  assert reports[1].check == "fwd_out"


def test_another_model_is_caught(trained, images, tmp_path):
  workdir = trained("smoke")
  model = serving.load_from_training(workdir)
  served = OtherModel().served(model)
  served = dataclasses.replace(served, model_hash=hashing.hexdigest(jobspec.model_hash(served.blocked)))
  classify.serve_images(served, images[1], tmp_path / "b0", key_path=workdir / "provider_key.pem")
  provider = infer_provider.ClassificationProvider(tmp_path / "b0", served)
  rep = infer_verifier.verify_inference_bundle(
      provider.open_cell(1, 0), commitment=json.loads((tmp_path / "b0" / "commitment.json").read_text()),
      expected_model_hash=model.model_hash)
  assert (rep.passed, rep.check) == (False, "model")


def test_other_images_and_another_response_are_caught(trained, images, tmp_path):
  workdir = trained("smoke")
  serve(workdir, images[1], tmp_path / "b0")
  record = tmp_path / "b0"
  model = serving.load_from_training(workdir)
  provider = infer_provider.ClassificationProvider(record, model)
  commitment = json.loads((record / "commitment.json").read_text())
  b0 = provider.open_cell(0, 0)
  other = {"images_hash": classify.images_hash(images[1][::-1].copy())}
  rep = infer_verifier.verify_inference_bundle(b0, commitment=commitment, expected_request=other)
  assert (rep.passed, rep.check) == (False, "spec")
  response = json.loads((record / "response.json").read_text())
  response["tokens"][3] = [(response["tokens"][3][0] + 1) % 4]
  rep = infer_verifier.verify_inference_bundle(b0, commitment=commitment, response=response)
  assert (rep.passed, rep.check) == (False, "response")
  # substituted images in the opening itself: their hash is not the spec's
  b0.tensors[classify.IMAGES] = b0.tensors[classify.IMAGES][::-1].copy()
  rep = infer_verifier.verify_inference_bundle(b0, commitment=commitment)
  assert (rep.passed, rep.check) == (False, "data")


def test_tensor_schema_comes_from_the_spec(trained, images, tmp_path):
  workdir = trained("smoke")
  serve(workdir, images[1], tmp_path / "b0")
  model = serving.load_from_training(workdir)
  provider = infer_provider.ClassificationProvider(tmp_path / "b0", model)
  commitment = json.loads((tmp_path / "b0" / "commitment.json").read_text())
  for k in range(3):
    b = provider.open_cell(k, 0)
    schema = classify_verifier.tensor_schema(b.manifest, commitment)
    assert set(schema) == set(b.tensors), k
    for name, (dtype, shape) in schema.items():
      assert (str(b.tensors[name].dtype), tuple(b.tensors[name].shape)) == (dtype, tuple(shape)), name


def test_wrong_images_are_refused(trained, tmp_path):
  model = serving.load_from_training(trained("smoke"))
  with pytest.raises(errors.InputError, match="stored images"):
    classify.serve_images(model, np.zeros((2, 32, 32, 3), np.uint8), tmp_path / "x",
                          key_path=tmp_path / "k.pem")
  assert not (tmp_path / "x").exists()
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  with pytest.raises(errors.InputError, match="bad.png"):
    classify.load_images([bad], model.model_cfg.image.preprocess)


def test_cli_classifies_and_exits_2_on_a_corrupt_image(trained, tmp_path):
  workdir = trained("smoke")
  src = tmp_path / "imgs"
  src.mkdir()
  for c in ("circle", "cross"):
    (src / f"{c}.png").write_bytes((tiny_images.DEFAULT_IMAGES_PATH / c / "0005.png").read_bytes())
  cmd = [sys.executable, "-m", "experiments.infer", "--workdir", str(workdir), "--images", str(src)]
  r = subprocess.run(cmd + ["--out", str(tmp_path / "b0")], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert "circle.png: " in r.stdout and (tmp_path / "b0" / "commitment.json").exists()
  (src / "zz.png").write_bytes(b"garbage")
  r = subprocess.run(cmd + ["--out", str(tmp_path / "b1")], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 2 and "zz.png" in r.stderr and not (tmp_path / "b1").exists()
