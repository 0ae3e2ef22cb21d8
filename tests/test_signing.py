"""Tests for aftune.signing: Ed25519 over canonical JSON, and its CLI."""

import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest

from aftune.crypto import signing as S
from aftune.crypto.hashing import canonical_json_bytes

REPO = pathlib.Path(__file__).resolve().parents[1]


def commitment():
  return {
    "job_id": "ab" * 32,
    "root": "cd" * 32,
    "size": 1234,
    "counts": {"steps": 10, "blocks": 4},
    "lr": 1e-05,
    "note": "héllo",
  }


def test_generate_and_load(tmp_path):
  path = tmp_path / "key.pem"
  pub = S.generate_key(path)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  key = S.load_private_key(path)
  assert S.public_key_hex(key) == S.public_key_hex(pub)
  assert len(S.public_key_hex(pub)) == 64
  with pytest.raises(FileExistsError):
    S.generate_key(path)  # never clobber a key by accident
  pub2 = S.generate_key(path, overwrite=True)
  assert S.public_key_hex(pub2) != S.public_key_hex(pub)
  (tmp_path / "junk.pem").write_text("not a key")
  with pytest.raises(ValueError, match="junk.pem"):
    S.load_private_key(tmp_path / "junk.pem")


def test_sign_verify_and_edits(tmp_path):
  key = S.load_private_key(_keyfile(tmp_path))
  doc = commitment()
  signed = S.sign_document(doc, key)
  assert doc == commitment()  # input untouched
  block = signed["signature"]
  assert block["alg"] == "ed25519" and block["public_key"] == S.public_key_hex(key)
  assert len(bytes.fromhex(block["sig"])) == 64
  assert S.signed_message(signed) == canonical_json_bytes(doc)
  S.verify_document(signed)
  S.verify_document(signed, S.public_key_hex(key))
  S.verify_document(signed, S.public_key_hex(key).upper())
  # Key order and JSON formatting do not matter; content does.
  S.verify_document(json.loads(json.dumps(signed, indent=3)))
  S.verify_document(dict(reversed(list(signed.items()))))
  edits = [
    lambda d: d.__setitem__("size", 1235),
    lambda d: d.__setitem__("lr", 1.00001e-05),
    lambda d: d["counts"].__setitem__("steps", 9),
    lambda d: d.__setitem__("extra", None),
    lambda d: d.pop("note"),
    lambda d: d.__setitem__("size", 1234.0),
  ]
  for edit in edits:
    d = json.loads(json.dumps(signed))
    edit(d)
    with pytest.raises(S.SignatureError, match="bad signature"):
      S.verify_document(d)
  # Re-signing replaces the old block.
  again = S.sign_document(signed, key)
  S.verify_document(again)
  assert set(again) == set(signed)


def test_failures_are_named(tmp_path):
  key = S.load_private_key(_keyfile(tmp_path, "a.pem"))
  other = S.load_private_key(_keyfile(tmp_path, "b.pem"))
  signed = S.sign_document(commitment(), key)
  with pytest.raises(S.SignatureError, match="no 'signature'"):
    S.verify_document(commitment())
  with pytest.raises(S.SignatureError, match="wrong key"):
    S.verify_document(signed, S.public_key_hex(other))
  # Swapping in another key's name without its signature fails verification.
  forged = {**signed, "signature": {**signed["signature"], "public_key": S.public_key_hex(other)}}
  with pytest.raises(S.SignatureError, match="bad signature"):
    S.verify_document(forged, S.public_key_hex(other))
  by_other = S.sign_document(commitment(), other)
  with pytest.raises(S.SignatureError, match="wrong key"):
    S.verify_document(by_other, S.public_key_hex(key))
  sig = signed["signature"]
  for bad, msg in [
    ({**sig, "alg": "rsa"}, "algorithm"),
    ({**sig, "sig": "zz"}, "not hex"),
    ({**sig, "sig": sig["sig"][:-2]}, "64 bytes"),
    ({k: v for k, v in sig.items() if k != "public_key"}, "public_key"),
    ({**sig, "x": 1}, "unexpected"),
    ("abc", "not an object"),
  ]:
    with pytest.raises(S.SignatureError, match=msg):
      S.verify_document({**signed, "signature": bad})
  with pytest.raises(S.SignatureError):
    S.verify_document([1, 2])
  assert issubclass(S.SignatureError, ValueError)


def _keyfile(tmp_path, name="key.pem"):
  path = tmp_path / name
  S.generate_key(path)
  return path


def _cli(*args):
  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run(
    [sys.executable, "-m", "experiments.sign", *map(str, args)],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )


def test_cli_exit_codes(tmp_path):
  key = S.load_private_key(_keyfile(tmp_path))
  other = S.load_private_key(_keyfile(tmp_path, "other.pem"))
  good = tmp_path / "commitment.json"
  good.write_text(json.dumps(S.sign_document(commitment(), key)))
  ok = _cli("verify", good, "--public-key", S.public_key_hex(key))
  assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stderr
  assert _cli("verify", good).returncode == 0
  wrong = _cli("verify", good, "--public-key", S.public_key_hex(other))
  assert wrong.returncode == 1 and "wrong key" in wrong.stderr
  tampered = tmp_path / "tampered.json"
  doc = json.loads(good.read_text())
  doc["size"] += 1
  tampered.write_text(json.dumps(doc))
  bad = _cli("verify", tampered)
  assert bad.returncode == 1 and "bad signature" in bad.stderr
  dup = tmp_path / "dup.json"
  dup.write_text(good.read_text()[:-1] + ', "size": 1}')
  res = _cli("verify", dup)
  assert res.returncode == 2 and "duplicate" in res.stderr
  assert _cli("verify", tmp_path / "missing.json").returncode == 2
  # keygen + sign round trip through the CLI.
  unsigned = tmp_path / "doc.json"
  unsigned.write_text(json.dumps(commitment()))
  kg = _cli("keygen", tmp_path / "cli.pem")
  assert kg.returncode == 0
  assert _cli("sign", unsigned, tmp_path / "cli.pem").returncode == 0
  res = _cli("verify", unsigned, "--public-key", kg.stdout.strip())
  assert res.returncode == 0, res.stderr
