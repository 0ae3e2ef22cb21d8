"""Ed25519 signatures over canonical JSON documents (e.g. commitment.json).

A signed document is the original JSON object plus one top-level field

    "signature": {"alg": "ed25519", "public_key": <hex 32 B>, "sig": <hex 64 B>}

where ``sig`` signs ``canonical_json_bytes(doc without "signature")``. Anyone
can check it with the public key alone:

    python -m experiments.sign verify commitment.json --public-key <hex>

Without ``--public-key`` only integrity is checked (the document was signed by
the key it names); who owns that key must be established out of band.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aftune import errors
from aftune.crypto.hashing import canonical_json_bytes

SIGNATURE_FIELD = "signature"
ALG = "ed25519"


class SignatureError(errors.InputError):
  """A document's signature is missing, malformed, from another key, or wrong."""


def generate_key(path: str | os.PathLike[str], *, overwrite: bool = False) -> Ed25519PublicKey:
  """Creates an Ed25519 key and writes it as unencrypted PKCS#8 PEM (mode 0600).

  Args:
    path: where to write the private key.
    overwrite: replace an existing file (default: refuse, so a key is never
      lost by accident).

  Returns:
    The public key.
  """
  key = Ed25519PrivateKey.generate()
  pem = key.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption(),
  )
  flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
  # Create with 0600 directly: writing first and chmod-ing later would leave
  # the key readable by others for a moment.
  fd = os.open(path, flags, 0o600)
  try:
    os.fchmod(fd, 0o600)  # O_TRUNC keeps the old mode of an existing file
    os.write(fd, pem)
  finally:
    os.close(fd)
  return key.public_key()


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
  """Loads a PEM Ed25519 private key written by ``generate_key``.

  Args:
    path: PEM file.

  Returns:
    The private key.

  Raises:
    ValueError: the file is not an unencrypted Ed25519 PEM key.
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    key = serialization.load_pem_private_key(data, password=None)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{os.fspath(path)}: not an unencrypted PEM private key: {e}") from e
  if not isinstance(key, Ed25519PrivateKey):
    raise ValueError(f"{os.fspath(path)}: not an Ed25519 key ({type(key).__name__})")
  return key


def public_key_hex(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
  """Raw 32-byte public key as lower-case hex.

  Args:
    key: public key, or a private key (its public half is used).

  Returns:
    64 hex characters.
  """
  if isinstance(key, Ed25519PrivateKey):
    key = key.public_key()
  raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
  return raw.hex()


def signed_message(doc: Mapping[str, Any]) -> bytes:
  """The bytes a signature covers: canonical JSON of doc minus "signature"."""
  body = {k: v for k, v in doc.items() if k != SIGNATURE_FIELD}
  return canonical_json_bytes(body)


def sign_document(doc: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
  """Returns a copy of ``doc`` with a ``signature`` block (replacing any old one).

  Args:
    doc: JSON object (str keys, canonical-JSON-encodable values).
    private_key: Ed25519 signing key.

  Returns:
    New dict: doc's fields plus ``{"signature": {"alg", "public_key", "sig"}}``.
  """
  if not isinstance(doc, Mapping):
    raise TypeError(f"can only sign a JSON object, got {type(doc).__name__}")
  out = {k: copy.deepcopy(v) for k, v in doc.items() if k != SIGNATURE_FIELD}
  sig = private_key.sign(canonical_json_bytes(out))
  out[SIGNATURE_FIELD] = {
    "alg": ALG,
    "public_key": public_key_hex(private_key),
    "sig": sig.hex(),
  }
  return out


def _hex_field(block: Mapping[str, Any], name: str, nbytes: int) -> bytes:
  value = block.get(name)
  if not isinstance(value, str):
    raise SignatureError(f"malformed signature: field {name!r} missing or not a string")
  try:
    raw = bytes.fromhex(value)
  except ValueError:
    raise SignatureError(f"malformed signature: field {name!r} is not hex") from None
  if len(raw) != nbytes:
    raise SignatureError(
      f"malformed signature: field {name!r} must be {nbytes} bytes, got {len(raw)}"
    )
  return raw


def verify_document(doc: Mapping[str, Any], expected_public_key_hex: str | None = None) -> None:
  """Checks a signed document.

  Args:
    doc: signed JSON object (as loaded from its file).
    expected_public_key_hex: the signer's public key; None only checks that
      the document matches the key it names.

  Raises:
    SignatureError: missing/malformed signature, wrong key, or bad signature.
  """
  if not isinstance(doc, Mapping):
    raise SignatureError(f"document is not a JSON object ({type(doc).__name__})")
  block = doc.get(SIGNATURE_FIELD)
  if block is None:
    raise SignatureError("document has no 'signature' block")
  if not isinstance(block, Mapping):
    raise SignatureError("malformed signature: 'signature' is not an object")
  if block.get("alg") != ALG:
    raise SignatureError(f"unsupported signature algorithm {block.get('alg')!r}")
  extra = set(block) - {"alg", "public_key", "sig"}
  if extra:
    raise SignatureError(f"malformed signature: unexpected fields {sorted(extra)}")
  pub_raw = _hex_field(block, "public_key", 32)
  sig = _hex_field(block, "sig", 64)
  if expected_public_key_hex is not None:
    try:
      expected = bytes.fromhex(expected_public_key_hex)
    except ValueError:
      raise SignatureError("expected public key is not hex") from None
    if expected != pub_raw:
      raise SignatureError(f"wrong key: signed by {pub_raw.hex()}, expected {expected.hex()}")
  try:
    message = signed_message(doc)
  except (TypeError, ValueError) as e:
    raise SignatureError(f"document has no canonical JSON form: {e}") from None
  try:
    Ed25519PublicKey.from_public_bytes(pub_raw).verify(sig, message)
  except InvalidSignature:
    raise SignatureError(
      "bad signature: the document was changed after signing, or signed by another key"
    ) from None
