"""A generated battery of malformed and hostile inputs, and a fuzz test, for every file a
provider hands the client: training and inference bundles, commitments, challenges,
history files, received roots, and the client's own request and response.

Each case is judged the way the entry points judge it (`judge`: an `errors.InputError`
is exit 2, a verdict that fails is exit 1, a pass is 0) and must give exit 2: one error
naming the file; a sample runs through the real CLI, which must write nothing and leave
every input file as it was. Mutations are generated, not listed:
  - JSON documents and bundle manifests: every field (to depth 4) deleted, given a value
    of another JSON type, and every object given an unknown field; deep nesting;
  - files truncated at every section boundary (JSON: every top-level field; bundles:
    the zstd frame header and blocks, the safetensors header, every tensor's data);
  - bit flips, a frame declaring 1 TiB, a header declaring a 1 TiB tensor, path-like
    and non-ASCII tensor names, an extra tensor.
Free-form declared content that the job id or inference id hashes (the model and
optimizer configs, the environment, the program fingerprint) is not schema-checked: a
change there is a failed cell (exit 1), tested once below.
"""

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import hypothesis
import numpy as np
import pytest
import zstandard
from hypothesis import strategies as st

from aftune import errors
from aftune import jsonio
from aftune.audit import bundle as bundle_lib
from aftune.audit import challenge_doc
from aftune.audit import client as audit
from aftune.audit import infer_provider
from aftune.audit import train_provider
from aftune.infer import serving
from aftune.record import history as history_lib
from aftune.record import schemas
from aftune.train import job as job_lib
from aftune.train import trainer as train

ROOT = Path(__file__).resolve().parent.parent
# Hash-bound, free-form: not walked by the generator (a change is a failed cell, exit 1).
FREE = {"hyperparameters", "environment", "program_fingerprint", "model", "source",
        "example_proofs"}
WRONG = {str: 12345, int: "12", float: "x", bool: "yes", list: {"a": 1}, dict: [1], type(None): 7}


@pytest.fixture(scope="module")
def files(small_config, tmp_path_factory):
  """Every kind of file of one audited run and one served batch, honest."""
  base = tmp_path_factory.mktemp("hostile")
  config = small_config(num_steps=4)
  train.train(config, base / "run")
  (base / "agreed.json").write_text(json.dumps(audit.agreed_fields(job_lib.build_job(config))))
  commitment = json.loads((base / "run" / "commitment.json").read_text())
  challenge_doc.save_challenge(audit.draw(commitment, "uniform", m=2), base / "challenge.json")
  provider = train_provider.Provider(base / "run")
  bundle_lib.write_bundle(base / "train.bundle", provider.open_cell(1, 1))
  model = serving.load_from_training(base / "run")
  serving.serve(model, [[1, 2, 3], [4, 5]], serving.ServeSettings(max_new_tokens=2),
                base / "served", key_path=base / "run" / "provider_key.pem")
  opener = infer_provider.InferenceProvider(base / "served", model,
                                            training_binding=provider.training_binding())
  bundle_lib.write_bundle(base / "infer.bundle", opener.open_cell(1, 1))
  jsonio.write_json(base / "history.json", history_lib.prove_history(base / "run"))
  return base


def judge(fn) -> int:
  """The exit code an entry point gives: 2 for malformed input, else the verdict's."""
  try:
    verdict = fn()
  except errors.InputError:
    return 2
  return 0 if verdict is None or verdict.get("passed", True) else 1


def _doc(path):
  return json.loads(Path(path).read_text())


# ---- the loaders, as the entry points call them -----------------------------------------


def load_training_bundle(files, path):
  return audit.verify_openings([path], commitment=_doc(files / "run" / "commitment.json"),
                               challenge=None, agreed=_doc(files / "agreed.json"))


def load_inference_bundle(files, path):
  return audit.verify_openings(
      [path], commitment=_doc(files / "served" / "commitment.json"), challenge=None,
      agreed=_doc(files / "agreed.json"), training_commitment=_doc(files / "run" / "commitment.json"),
      response=_doc(files / "served" / "response.json"))


def load_history(files, path):
  commitment = audit.load_commitment(files / "run" / "commitment.json")
  history = schemas.check(audit.load_json(path), schemas.HISTORY, path)
  problems = history_lib.verify_history(history, commitment, None)
  return {"passed": not problems}


def load_root(files, path):
  root = schemas.check(audit.load_json(path), schemas.ROOT, path)
  commitment = audit.load_commitment(files / "run" / "commitment.json")
  problems = history_lib.verify_history(history_lib.prove_history(files / "run"), commitment, [root])
  return {"passed": not problems}


JSON_LOADERS = {
    "run/commitment.json": lambda files, p: audit.load_commitment(p) and None,
    "served/commitment.json": lambda files, p: audit.load_commitment(p) and None,
    "challenge.json": lambda files, p: challenge_doc.load_challenge(p) and None,
    "history.json": load_history,
    "run/trace/roots/00000004.json": load_root,
    "served/request.json": lambda files, p: audit.load_request(p) and None,
    "served/response.json": lambda files, p: audit.load_response(p) and None,
    "agreed.json": lambda files, p: audit.load_agreed(p) and None,
}


# ---- generators ---------------------------------------------------------------------------


def field_mutations(doc, path=(), depth=4):
  """(label, mutated copy) for every field: deleted, of another type; objects: one more field."""
  if depth == 0:
    return
  node = _get(doc, path)
  if isinstance(node, dict):
    yield "/".join(map(str, path)) + "+unexpected_field", _set(doc, path, {**node, "zz_unexpected": 1})
  keys = list(node) if isinstance(node, dict) else ([0] if isinstance(node, list) and node else [])
  for key in keys:
    if key in FREE:
      continue
    sub = (*path, key)
    value = _get(doc, sub)
    if isinstance(node, dict):
      yield "/".join(map(str, sub)) + ":missing", _delete(doc, sub)
    yield "/".join(map(str, sub)) + ":wrong_type", _set(doc, sub, WRONG[type(value)])
    if isinstance(value, (dict, list)):
      for label, mutated in field_mutations(doc, sub, depth - 1):
        yield label, mutated


def _get(doc, path):
  for p in path:
    doc = doc[p]
  return doc


def _set(doc, path, value):
  out = copy.deepcopy(doc)
  if not path:
    return value
  _get(out, path[:-1])[path[-1]] = value
  return out


def _delete(doc, path):
  out = copy.deepcopy(doc)
  del _get(out, path[:-1])[path[-1]]
  return out


def json_boundaries(text: str) -> list[int]:
  """Offsets where each top-level field of an indented JSON document starts, and the ends."""
  cuts = [0, 1, len(text.rstrip()) - 1]
  cuts += [i + 1 for i in range(len(text)) if text.startswith('\n  "', i)]
  return sorted(set(c for c in cuts if 0 <= c < len(text.rstrip())))


def frame(raw: bytes, declared: int | None = None) -> bytes:
  """A zstd frame of raw blocks holding `raw` that declares `declared` bytes (default: true)."""
  declared = len(raw) if declared is None else declared
  out = bytearray(b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + declared.to_bytes(8, "little"))
  blocks = [raw[i:i + (1 << 17)] for i in range(0, len(raw), 1 << 17)] or [b""]
  for i, block in enumerate(blocks):
    out += ((len(block) << 3) | int(i == len(blocks) - 1)).to_bytes(3, "little") + block
  return bytes(out)


def raw_sections(raw: bytes) -> list[int]:
  """Section boundaries of a safetensors payload: the length, the header, every tensor."""
  n = struct.unpack("<Q", raw[:8])[0]
  header = json.loads(raw[8:8 + n])
  cuts = {0, 4, 8, 8 + n // 2, 8 + n}
  for name, e in header.items():
    if name != "__metadata__":
      a, b = e["data_offsets"]
      cuts |= {8 + n + a, 8 + n + (a + b) // 2}
  return sorted(c for c in cuts if c < len(raw))


def with_header(raw: bytes, edit) -> bytes:
  """The payload with its safetensors header edited (edit(header) -> header)."""
  n = struct.unpack("<Q", raw[:8])[0]
  header = edit(json.loads(raw[8:8 + n]))
  text = json.dumps(header).encode()
  return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def bundle_cases(path: Path):
  """(label, file bytes) of hostile variants of a bundle."""
  data = path.read_bytes()
  raw = zstandard.ZstdDecompressor().decompress(data)
  n = struct.unpack("<Q", raw[:8])[0]
  header = json.loads(raw[8:8 + n])
  manifest = json.loads(header["__metadata__"]["aftune_bundle"])
  first = next(k for k in header if k != "__metadata__")

  def with_manifest(m):
    return frame(with_header(raw, lambda h: {**h, "__metadata__": {
        **h["__metadata__"], "aftune_bundle": json.dumps(m) if not isinstance(m, str) else m}}))

  for label, mutated in field_mutations(manifest):
    yield f"manifest {label}", with_manifest(mutated)
  yield "manifest nested 100000 deep", with_manifest(
      json.dumps(manifest)[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}")
  yield "manifest not JSON", with_manifest('{"format": "aftune-bundle/v1",')
  yield "manifest duplicate key", with_manifest('{"format": 1, "format": 2}')
  yield "no manifest", frame(with_header(raw, lambda h: {**h, "__metadata__": {}}))
  for cut in raw_sections(raw):
    yield f"payload truncated at {cut}", frame(raw[:cut])
  for cut in [0, 3, 5, 13, 16, len(data) // 2, len(data) - 4, len(data) - 1]:
    yield f"file truncated at {cut}", data[:cut]
  for i in range(12):
    pos = 13 + (len(data) - 13) * i // 12
    flipped = bytearray(data)
    flipped[pos] ^= 1 << (i % 8)
    yield f"bit flip at {pos}", bytes(flipped)
  yield "frame declares 1 TiB", frame(raw, declared=1 << 40)
  yield "frame without content size", zstandard.ZstdCompressor(write_content_size=False).compress(raw)
  yield "two frames", data + data
  yield "trailing garbage", data + b"\0" * 7
  yield "header length 2^60", frame(struct.pack("<Q", 1 << 60) + raw[8:])
  yield "a tensor declaring 1 TiB", frame(with_header(raw, lambda h: {**h, first: {
      **h[first], "shape": [1 << 38], "dtype": "F32",
      "data_offsets": [h[first]["data_offsets"][0], h[first]["data_offsets"][0] + (1 << 40)]}}))
  for name in ["../../x", "/abs", "a//b", "step/./x", "caf\u00e9", "x\\y", ""]:
    yield f"tensor named {name!r}", frame(with_header(raw, lambda h, name=name: {
        **{k: v for k, v in h.items() if k != first}, name: h[first]}))
  extra = np.zeros(4, np.float32).tobytes()

  def add_extra(h):
    end = max(e["data_offsets"][1] for k, e in h.items() if k != "__metadata__")
    return {**h, "zz/extra": {"dtype": "F32", "shape": [4], "data_offsets": [end, end + 16]}}

  yield "an unlisted tensor", frame(with_header(raw, add_extra) + extra)
  yield "a tensor of another shape", frame(with_header(raw, lambda h: {
      **h, first: {**h[first], "shape": [int(np.prod(h[first]["shape"])) or 1]
                   if h[first]["shape"] else [1]}}))


# Fields a document may leave out by design (the request: any subset of the settings).
OPTIONAL = {"request.json": ("settings",)}


def json_cases(path: Path):
  text = path.read_text()
  doc = json.loads(text)
  optional = OPTIONAL.get(path.name, ())
  for label, mutated in field_mutations(doc):
    if label.endswith(":missing") and label.startswith(optional or ("\0",)):
      continue
    yield label, json.dumps(mutated, indent=2).encode()
  for cut in json_boundaries(text):
    yield f"truncated at {cut}", text[:cut].encode()
  yield "nested 100000 deep", ("[" * 100000 + "]" * 100000).encode()
  yield "not an object", b"[]"
  yield "NaN", text.replace('"', "NaN", 1).encode() if "{" in text else b"NaN"
  yield "duplicate key", ('{"a": 1, "a": 2, ' + text.lstrip()[1:]).encode()
  yield "not UTF-8", b"\xff\xfe" + text.encode()


# ---- the battery ----------------------------------------------------------------------------


def _battery(files, tmp_path, cases, loader, name):
  """Runs every case; returns (labels, failures): a failure is a case not judged exit 2."""
  target = tmp_path / name
  target.parent.mkdir(parents=True, exist_ok=True)
  labels, failures = [], []
  for label, data in cases:
    target.write_bytes(data)
    labels.append(label)
    try:
      code = judge(lambda: loader(files, target))
    except Exception as e:  # noqa: BLE001 - the point: nothing but InputError may escape
      failures.append(f"{label}: raised {type(e).__name__}: {e}")
      continue
    if code != 2:
      failures.append(f"{label}: exit {code}")
  return labels, failures


@pytest.mark.parametrize("kind", ["train", "infer"])
def test_hostile_bundles_are_malformed_input(files, tmp_path, kind):
  loader = load_training_bundle if kind == "train" else load_inference_bundle
  labels, failures = _battery(files, tmp_path, bundle_cases(files / f"{kind}.bundle"), loader,
                              f"{kind}.bundle")
  assert len(labels) > 150, len(labels)
  assert not failures, "\n".join(failures)
  assert judge(lambda: loader(files, files / f"{kind}.bundle")) == 0  # the honest one passes


@pytest.mark.parametrize("name", sorted(JSON_LOADERS))
def test_hostile_json_documents_are_malformed_input(files, tmp_path, name):
  labels, failures = _battery(files, tmp_path, json_cases(files / name), JSON_LOADERS[name],
                              Path(name).name)
  assert len(labels) >= 10
  assert not failures, "\n".join(failures)
  assert judge(lambda: JSON_LOADERS[name](files, files / name)) == 0


def test_a_changed_hash_bound_config_is_a_failed_cell_not_malformed(files, tmp_path):
  b = bundle_lib.read_bundle(files / "train.bundle")
  b.manifest["job_spec"]["hyperparameters"]["optimizer"]["learning_rate"] = 1.0
  bundle_lib.write_bundle(tmp_path / "x.bundle", b)
  verdict = load_training_bundle(files, tmp_path / "x.bundle")
  assert not verdict["passed"] and verdict["cells"][0]["check"] == "job_spec"


def _snapshot(base):
  return {p: p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["manifest leaves/0/proof:missing", "frame declares 1 TiB",
                                  "tensor named '../../x'", "an unlisted tensor"])
def test_the_cli_exits_2_names_the_file_and_writes_nothing(files, tmp_path, case):
  data = dict(bundle_cases(files / "train.bundle"))[case]
  bundles = tmp_path / "bundles"
  bundles.mkdir()
  (bundles / "cell_L001_S00001.bundle").write_bytes(data)
  before = _snapshot(files) | _snapshot(bundles)
  r = subprocess.run([sys.executable, "-m", "experiments.verify", "--commitment",
                      str(files / "run" / "commitment.json"), "--bundles", str(bundles),
                      "--agreed", str(files / "agreed.json"), "--allow_unbound",
                      "--out", str(tmp_path / "v.json")], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 2, r.stdout + r.stderr
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "cell_L001_S00001.bundle" in lines[0], r.stderr
  assert not (tmp_path / "v.json").exists() and not (tmp_path / "v.md").exists()
  assert _snapshot(files) | _snapshot(bundles) == before


@pytest.mark.parametrize("name", ["challenge.json", "history.json", "served/response.json"])
def test_json_cli_inputs_exit_2(files, tmp_path, name):
  path = tmp_path / Path(name).name
  path.write_text('{"format": ')
  commands = {
      "challenge.json": ["experiments.challenge", "show", str(path)],
      "history.json": ["experiments.history", "check", "--commitment",
                       str(files / "run" / "commitment.json"), "--history", str(path),
                       "--none_received"],
      "served/response.json": ["experiments.verify", "--commitment",
                               str(files / "served" / "commitment.json"), "--bundles", str(files),
                               "--response", str(path), "--allow_unbound", "--mode", "tolerance",
                               "--out", str(tmp_path / "v.json")],
  }
  shutil.copy(files / "infer.bundle", files / "cell_L001_S00001.bundle")
  try:
    r = subprocess.run([sys.executable, "-m", *commands[name]], cwd=ROOT, capture_output=True,
                       text=True)
  finally:
    os.remove(files / "cell_L001_S00001.bundle")
  assert r.returncode == 2 and path.name in r.stderr, r.stdout + r.stderr
  assert not (tmp_path / "v.json").exists()


# ---- fuzz -----------------------------------------------------------------------------------


@hypothesis.settings(max_examples=150, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(data=st.data())
def test_fuzz_the_bundle_reader(files, tmp_path, data):
  """Arbitrary edits of a real bundle: read with the verifier's schema, or InputError."""
  original = (files / "train.bundle").read_bytes()
  raw = zstandard.ZstdDecompressor().decompress(original)
  edits = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)),
                             min_size=1, max_size=8))
  mutated = bytearray(raw)
  for pos, value in edits:
    mutated[pos] = value
  cut = data.draw(st.integers(0, len(raw)))
  blob = frame(bytes(mutated[:cut]) if data.draw(st.booleans()) else bytes(mutated))
  path = tmp_path / "fuzz.bundle"
  path.write_bytes(blob)
  commitment = _doc(files / "run" / "commitment.json")
  from aftune.audit import train_verifier  # pylint: disable=g-import-not-at-top
  try:
    b = bundle_lib.read_bundle(path, schema=lambda m: train_verifier.tensor_schema(m, commitment))
  except errors.InputError:
    return
  assert b.manifest["format"] == bundle_lib.FORMAT


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=30)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(doc=JSON, raw=st.binary(max_size=200))
def test_fuzz_the_json_loaders(doc, raw):
  """Arbitrary JSON values and bytes: every document schema and the strict parser either
  accept or raise InputError, never anything else."""
  for text in (json.dumps(doc).encode(), raw):
    try:
      parsed = jsonio.strict_loads(text)
    except ValueError:
      continue
    for schema in (schemas.TRAINING_COMMITMENT, schemas.INFERENCE_COMMITMENT, schemas.ROOT,
                   schemas.HISTORY, schemas.REQUEST, schemas.RESPONSE,
                   bundle_lib.TRAINING_MANIFEST, bundle_lib.INFERENCE_MANIFEST):
      try:
        schemas.check(parsed, schema, "fuzz.json")
      except errors.InputError:
        pass
    try:
      challenge_doc.Challenge.from_json(text)
    except errors.InputError:
      pass
