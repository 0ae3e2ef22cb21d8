"""The client's side against a dishonest provider: the seven classes of issue 9.

One 8-step run of the smoke sheet (3 layer blocks x 4 step blocks) and one served batch
of it; each test plays one provider trick and checks that it is refused with the right
exit code (1: a failed check, 2: input the verifier cannot judge) and message:
  1. an unbound PASS (no agreed job) 5. malformed manifests
  2. history without received roots  6. a final model that is not the trace's end state
  3. unlisted / path-like tensors     7. a response other than the committed tokens
  4. decompression bombs
"""

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from aftune.attacks import forgery
from aftune.audit import bundle as bundle_lib
from aftune.audit import client as audit
from aftune.audit import core
from aftune.audit import infer_provider
from aftune.audit import infer_verifier
from aftune.audit import train_provider
from aftune.audit import train_verifier
from aftune.crypto import hashing
from aftune.crypto import signing
from aftune.infer import serving
from aftune.record import history as history_lib
from aftune.record import jobspec
from aftune.record import layout as trace
from aftune.record import tensorfile
from aftune.train import checkpoint as ckpt_lib
from aftune.train import job as job_lib
from aftune.train import loop
from aftune.train import trainer as train

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[1, 2, 3, 4], [5, 6, 7]]


def _run(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def run(small_config, tmp_path_factory):
  """An honest 8-step run, the client's agreed fields, and bundles of a few cells."""
  base = tmp_path_factory.mktemp("hardening")
  config = small_config(num_steps=8)
  train.train(config, base / "run")
  (base / "agreed.json").write_text(json.dumps(audit.agreed_fields(job_lib.build_job(config))))
  provider = train_provider.Provider(base / "run")
  (base / "bundles").mkdir()
  for k, s in [(0, 3), (1, 0), (2, 3)]:
    bundle_lib.write_bundle(base / "bundles" / bundle_lib.bundle_name(k, s), provider.open_cell(k, s))
  return base, provider


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def served(run):
  """A served batch of the run's final model, and the client's request and response."""
  base, provider = run
  model = serving.load_from_training(base / "run")
  settings = serving.ServeSettings(max_new_tokens=4, stop_tokens=(9,))
  serving.serve(model, PROMPTS, settings, base / "served", key_path=base / "run" / "provider_key.pem")
  opener = infer_provider.InferenceProvider(base / "served", model,
                                            training_binding=provider.training_binding())
  (base / "ibundles").mkdir()
  for k, t in [(0, 1), (2, 3)]:
    bundle_lib.write_bundle(base / "ibundles" / bundle_lib.bundle_name(k, t), opener.open_cell(k, t))
  return base / "served", opener


def _commitment(path):
  return json.loads(Path(path).read_text())


def _bundles(base, sub="bundles"):
  return sorted((base / sub).glob("*.bundle"))


def _snapshot(*dirs):
  return {p: p.read_bytes() for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


# ---- 1. a PASS that binds nothing ---------------------------------------------------------


def test_a_job_the_client_did_not_agree_to_fails_and_an_unbound_verdict_says_so(
    run, small_config, tmp_path):
  base, _ = run
  short = tmp_path / "short"  # the provider's own spec: 4 steps instead of the agreed 8
  train.train(small_config(num_steps=4), short)
  provider = train_provider.Provider(short)
  out = tmp_path / "b"
  out.mkdir()
  bundle_lib.write_bundle(out / bundle_lib.bundle_name(1, 1), provider.open_cell(1, 1))
  commitment = _commitment(short / "commitment.json")
  agreed = json.loads((base / "agreed.json").read_text())
  bound = audit.verify_openings(_bundles(tmp_path, "b"), commitment=commitment, challenge=None,
                                agreed=agreed)
  assert not bound["passed"] and bound["cells"][0]["check"] == "job_spec"
  assert "hyperparameters" in bound["cells"][0]["reason"]
  loose = audit.verify_openings(_bundles(tmp_path, "b"), commitment=commitment, challenge=None,
                                agreed=None)
  assert loose["passed"]  # the cells replay honestly against the provider's own job...
  assert any(u.startswith("the agreed job") for u in loose["unchecked"])  # ...and it says so
  assert "UNBOUND" in audit.render_markdown(loose)
  assert "the agreed job" in audit.render_markdown(loose)
  assert bound["unchecked"] == [
      u for u in bound["unchecked"] if u.startswith("the challenge")]  # only the challenge


def test_verify_cli_refuses_an_unbound_verdict_unless_asked(run, tmp_path):
  base, _ = run
  args = ("experiments.verify", "--commitment", str(base / "run" / "commitment.json"),
          "--bundles", str(base / "bundles"), "--out", str(tmp_path / "v.json"))
  r = _run(*args)
  assert r.returncode == 2 and "the agreed job" in r.stderr and "the challenge" in r.stderr
  assert not (tmp_path / "v.json").exists()
  r = _run(*args, "--allow_unbound")
  assert r.returncode == 0, r.stderr
  verdict = json.loads((tmp_path / "v.json").read_text())
  assert verdict["passed"] and len(verdict["unchecked"]) == 2
  assert "UNBOUND" in (tmp_path / "v.md").read_text()
  # The client's own config binds it as well as agreed.json (computed here from it).
  r = _run(*args, "--allow_unbound", "--config", "configs/finetune.py:smoke", "--config.num_steps=8")
  assert r.returncode == 0, r.stderr
  verdict = json.loads((tmp_path / "v.json").read_text())
  assert [u.split(" (")[0] for u in verdict["unchecked"]] == ["the challenge"]
  r = _run(*args, "--allow_unbound", "--config", "configs/finetune.py:smoke", "--config.num_steps=4")
  assert r.returncode == 1 and "job_spec" in (tmp_path / "v.md").read_text()


def test_a_bundle_of_the_other_kind_is_refused(run, served):
  base, _ = run
  with pytest.raises(core.AuditInputError, match="an inference bundle, but the commitment is a "
                     "training commitment"):
    audit.verify_openings(_bundles(base, "ibundles")[:1],
                          commitment=_commitment(base / "run" / "commitment.json"),
                          challenge=None, agreed=None)


# ---- 2. history without what the client received ---------------------------------------


def test_a_root_claiming_a_later_step_than_it_covers_is_refused(run, tmp_path):
  base, _ = run
  workdir = base / "run"
  commitment = _commitment(workdir / "commitment.json")
  history = history_lib.prove_history(workdir)
  assert history_lib.verify_history(history, commitment, None) == []
  grid = trace.Grid.from_dict(commitment["grid"])
  # The root signed at step 4 re-signed as "step 6": the leaves of steps 4 and 5 would be
  # outside every signed root, open to rewriting after signing.
  entry = next(e for e in history["roots"] if e["root_doc"]["step"] == 4)
  doc = {k: v for k, v in entry["root_doc"].items() if k != "signature"}
  doc["step"] = 6
  key = signing.load_private_key(workdir / "provider_key.pem")
  entry["root_doc"] = signing.sign_document(doc, key)
  problems = history_lib.verify_history(history, commitment, None)
  assert len(problems) == 1 and "claims a later step" in problems[0]
  assert f"{grid.offset(4)} leaves" in problems[0] and f"puts {grid.offset(6)}" in problems[0]


def test_history_cli_requires_the_received_roots_or_says_it_had_none(run, tmp_path):
  base, _ = run
  workdir = base / "run"
  assert _run("experiments.history", "prove", "--workdir", str(workdir), "--out",
              str(tmp_path / "h.json")).returncode == 0
  check = ("experiments.history", "check", "--commitment", str(workdir / "commitment.json"),
           "--history", str(tmp_path / "h.json"))
  r = _run(*check)
  assert r.returncode == 2 and "--received" in r.stderr
  r = _run(*check, "--none_received")
  assert r.returncode == 0 and "NOTE: no received roots" in r.stdout
  r = _run(*check, "--received", str(workdir / "trace" / "roots"))
  assert r.returncode == 0 and "all 3 roots the client received" in r.stdout


# ---- 3. content the manifest does not list -----------------------------------------------


def _rewrite(path, out, *, tensors=None, manifest=None):
  b = bundle_lib.read_bundle(path)
  if tensors is not None:
    tensors(b.tensors)
  if manifest is not None:
    manifest(b.manifest)
  bundle_lib.write_bundle(out, b)
  return out


def _verify_one(run, path, **kw):
  base, _ = run
  return audit.verify_openings([path], commitment=_commitment(base / "run" / "commitment.json"),
                               challenge=None, agreed=json.loads((base / "agreed.json").read_text()),
                               **kw)


@pytest.mark.parametrize("name", ["extra/huge", "../../x", "/etc/passwd", "step/0/../../x"])
def test_an_unlisted_or_path_like_tensor_is_malformed_input(run, tmp_path, name):
  base, _ = run
  src = _bundles(base)[0]

  def add(t):
    t[name] = np.zeros((16,), np.float32)

  try:
    path = _rewrite(src, tmp_path / src.name, tensors=add)
  except tensorfile.TensorFileError:
    return  # the writer refused the name already
  with pytest.raises(bundle_lib.BundleError, match=src.name):
    _verify_one(run, path)


def test_a_tensor_of_another_shape_or_dtype_is_malformed_input(run, tmp_path):
  base, _ = run
  src = _bundles(base)[0]
  name = next(n for n in bundle_lib.read_bundle(src).tensors if n.startswith("state/start/params/"))
  for i, f in enumerate([lambda a: a[:1], lambda a: a.astype(np.float16)]):
    path = _rewrite(src, tmp_path / f"{i}.bundle",
                    tensors=lambda t, f=f: t.__setitem__(name, f(t[name])))
    with pytest.raises(bundle_lib.BundleError, match=name.replace("/", ".")):
      _verify_one(run, path)


# ---- 4. decompression and allocation bombs -----------------------------------------------


def raw_frame(raw: bytes, declared: int) -> bytes:
  """A zstd frame of raw blocks holding `raw` whose header declares `declared` bytes
  (single segment, 8-byte content size, no checksum): what a hostile provider can send."""
  out = bytearray(b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + declared.to_bytes(8, "little"))
  blocks = [raw[i:i + (1 << 17)] for i in range(0, len(raw), 1 << 17)] or [b""]
  for i, block in enumerate(blocks):
    header = (len(block) << 3) | int(i == len(blocks) - 1)  # type 0: raw block
    out += header.to_bytes(3, "little") + block
  return bytes(out)


def test_a_frame_declaring_a_terabyte_is_malformed_input_not_a_failed_cell(run, tmp_path):
  base, _ = run
  bombs = tmp_path / "bombs"
  shutil.copytree(base / "bundles", bombs)
  path = _bundles(tmp_path, "bombs")[0]
  raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
  path.write_bytes(raw_frame(raw, declared=1 << 40))  # the real bundle, declaring 1 TiB
  assert zstandard.get_frame_parameters(path.read_bytes()).content_size == 1 << 40
  r = _run("experiments.verify", "--commitment", str(base / "run" / "commitment.json"),
           "--bundles", str(bombs), "--agreed", str(base / "agreed.json"), "--allow_unbound",
           "--out", str(tmp_path / "v.json"))
  assert r.returncode == 2 and path.name in r.stderr, r.stderr
  assert not (tmp_path / "v.json").exists()


# ---- 5. malformed manifests ----------------------------------------------------------------


@pytest.mark.parametrize("edit,field", [
    (lambda m: m["leaves"][3].pop("proof"), "leaves/3: 'proof' is a required property"),
    (lambda m: m["cell"].pop("layer_block"), "cell: 'layer_block' is a required property"),
    (lambda m: m["leaves"][0].__setitem__("step", "0"), "leaves/0/step"),
    (lambda m: m.__setitem__("example_proofs", {"x": []}), "example_proofs"),
])
def test_a_malformed_manifest_is_one_clear_input_error(run, tmp_path, edit, field):
  base, _ = run
  src = _bundles(base)[0]
  path = _rewrite(src, tmp_path / src.name, manifest=edit)
  with pytest.raises(bundle_lib.BundleError) as e:
    _verify_one(run, path)
  assert src.name in str(e.value) and field in str(e.value)


def test_a_deeply_nested_manifest_is_refused_before_parsing(run, tmp_path):
  base, _ = run
  b = bundle_lib.read_bundle(_bundles(base)[0])
  meta = {"aftune_bundle": json.dumps(b.manifest)[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}"}
  path = tmp_path / "deep.bundle"
  tensorfile.write(path, b.tensors, metadata=meta)
  with pytest.raises(bundle_lib.BundleError, match="nested deeper"):
    _verify_one(run, path)


# ---- 6. the final model is bound to the trace --------------------------------------------


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def hybrid(run, tmp_path_factory):
  """A workdir whose commitment names a hybrid as final: the trained model with block 1
  from the step-4 checkpoint; the hybrid's digests and the hybrid model itself."""
  base, _ = run
  workdir = tmp_path_factory.mktemp("hybrid") / "run"
  shutil.copytree(base / "run", workdir)
  job = train_provider.Provider(workdir).job
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", create=False)
  final, _ = loop.restore_state(ckpt, 8, job)
  early, _ = loop.restore_state(ckpt, 4, job)
  ckpt.close()
  params = list(final)
  params[1] = early[1]
  blocked = dataclasses.replace(job.blocked, trainable=params)
  h = hashing.hexdigest(jobspec.model_hash(blocked))
  forgery.resign(workdir, final_model_hash=h)
  digests = [[list(c), d.hex()] for c, d in hashing.pytree_leaf_hashes(jobspec.unit_tree(blocked))]
  source = {"job_id": _commitment(workdir / "commitment.json")["job_id"], "final_model_hash": h}
  model = serving.ServedModel(blocked, job.model_cfg, h, source)
  return workdir, digests, model


def test_a_commitment_naming_another_final_model_fails_every_cell(hybrid):
  workdir, digests, _ = hybrid
  commitment = _commitment(workdir / "commitment.json")

  class Passing(train_provider.Provider):  # claims the hybrid's digests as the final model
    def final_model_digests(self):
      return digests

  for provider in (train_provider.Provider(workdir), Passing(workdir)):
    for cell in [(0, 0), (2, 3)]:  # neither cell holds block 1 nor is it the last step block
      report = train_verifier.verify_bundle(provider.open_cell(*cell), commitment=commitment)
      assert not report.passed and report.check == "final_model", report.reason
  report = train_verifier.verify_bundle(Passing(workdir).open_cell(0, 0), commitment=commitment)
  assert "block 1 of the model named final" in report.reason


def test_the_hybrid_served_under_that_hash_fails_its_inference_audit(hybrid, tmp_path):
  workdir, _, model = hybrid
  serving.serve(model, PROMPTS, serving.ServeSettings(max_new_tokens=2), tmp_path / "s",
                key_path=workdir / "provider_key.pem")
  opener = infer_provider.InferenceProvider(
      tmp_path / "s", model, training_binding=train_provider.Provider(workdir).training_binding())
  training = _commitment(workdir / "commitment.json")
  for cell in [(0, 0), (2, 1)]:
    report = infer_verifier.verify_inference_bundle(
        opener.open_cell(*cell), commitment=_commitment(tmp_path / "s" / "commitment.json"),
        training_commitment=training)
    assert not report.passed and report.check == "final_model", report.reason
  # Without the training commitment only the hash is compared, and the hybrid passes it:
  report = infer_verifier.verify_inference_bundle(
      opener.open_cell(0, 0), commitment=_commitment(tmp_path / "s" / "commitment.json"),
      expected_model_hash=training["final_model_hash"])
  assert report.passed


def test_the_honest_final_model_passes_the_binding(run, served):
  base, _ = run
  record, _ = served
  verdict = audit.verify_openings(
      _bundles(base, "ibundles"), commitment=_commitment(record / "commitment.json"),
      challenge=None, agreed=json.loads((base / "agreed.json").read_text()),
      training_commitment=_commitment(base / "run" / "commitment.json"),
      request=json.loads((record / "request.json").read_text()),
      response=json.loads((record / "response.json").read_text()))
  assert verdict["passed"], verdict["cells"]
  assert [u.split(" (")[0] for u in verdict["unchecked"]] == ["the challenge"]


# ---- 7. the tokens the client received -----------------------------------------------------


@pytest.mark.parametrize("edit", ["change", "truncate", "extend", "other_batch"])
def test_a_response_other_than_the_committed_tokens_fails(run, served, edit):
  base, _ = run
  record, _ = served
  response = json.loads((record / "response.json").read_text())
  forged = copy.deepcopy(response)
  if edit == "change":
    forged["tokens"][1][-1] = (forged["tokens"][1][-1] + 1) % 1024
  elif edit == "truncate":
    forged["tokens"][0] = forged["tokens"][0][:-1]
  elif edit == "extend":
    forged["tokens"][0] = forged["tokens"][0] + [5]
  else:
    forged["inference_id"] = "00" * 32
  verdict = audit.verify_openings(
      _bundles(base, "ibundles"), commitment=_commitment(record / "commitment.json"),
      challenge=None, agreed=None, training_commitment=_commitment(base / "run" / "commitment.json"),
      response=forged)
  assert not verdict["passed"]
  assert {c["check"] for c in verdict["cells"]} == {"response"}, verdict["cells"]


def test_inference_cli_checks_the_response_and_refuses_without_it(run, served, tmp_path):
  base, _ = run
  record, _ = served
  response = json.loads((record / "response.json").read_text())
  response["tokens"][0][0] = (response["tokens"][0][0] + 7) % 1024
  (tmp_path / "resp.json").write_text(json.dumps(response))
  args = ["experiments.verify", "--commitment", str(record / "commitment.json"),
          "--bundles", str(base / "ibundles"), "--agreed", str(base / "agreed.json"),
          "--training_commitment", str(base / "run" / "commitment.json"),
          "--request", str(record / "request.json"), "--allow_unbound",
          "--out", str(tmp_path / "v.json")]
  before = _snapshot(base / "ibundles", record)
  r = _run(*args, "--response", str(tmp_path / "resp.json"))
  assert r.returncode == 1, r.stderr
  assert "tokens the client received are not the committed ones" in (tmp_path / "v.md").read_text()
  r = _run(*args)
  assert r.returncode == 0 and "the response (no --response)" in (tmp_path / "v.md").read_text()
  assert _snapshot(base / "ibundles", record) == before
