"""The challenge modules' error type and the argument checks they share.

Every invalid count, probability, id or nonce given to ``detection``,
``challenge_params``, ``challenge_doc`` or ``challenge`` raises
``ChallengeError`` with a message that names the argument (or the document
field).
"""

from __future__ import annotations

from typing import Any

from aftune import errors

MAX_NONCE_BYTES = 1024


class ChallengeError(errors.InputError):
  """A challenge that cannot be drawn, parsed or re-derived."""


def check_count(name: str, value: Any, lo: int, hi: int | None = None) -> int:
  """An int (not a bool) in [lo, hi] (hi None: unbounded); returns it."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise ChallengeError(f"{name} must be an integer, got {value!r}")
  if value < lo or (hi is not None and value > hi):
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    raise ChallengeError(f"{name} must be {rng}, got {value}")
  return value


def check_prob(p: Any) -> float:
  """A number in (0, 1]; returns it as a float."""
  if isinstance(p, bool) or not isinstance(p, (int, float)):
    raise ChallengeError(f"p must be a number, got {p!r}")
  p = float(p)
  if not (0.0 < p <= 1.0):
    raise ChallengeError(f"p must be in (0, 1], got {p}")
  return p


def check_bytes(name: str, value: Any, length: int) -> bytes:
  """Bytes of exactly ``length``; returns them as bytes."""
  if not isinstance(value, (bytes, bytearray)):
    raise ChallengeError(f"{name} must be bytes, got {type(value).__name__}")
  if len(value) != length:
    raise ChallengeError(f"{name} must be {length} bytes, got {len(value)}")
  return bytes(value)


def check_nonce(nonce: Any) -> bytes:
  """Bytes of at most ``MAX_NONCE_BYTES``; returns them as bytes."""
  if not isinstance(nonce, (bytes, bytearray)):
    raise ChallengeError(f"nonce must be bytes, got {type(nonce).__name__}")
  if len(nonce) > MAX_NONCE_BYTES:
    raise ChallengeError(f"nonce is {len(nonce)} bytes; at most {MAX_NONCE_BYTES}")
  return bytes(nonce)


def check_hex(name: str, value: Any, length: int | None) -> str:
  """Lower-case hex of ``length`` bytes (None: any length up to the nonce limit)."""
  if not isinstance(value, str):
    raise ChallengeError(f"{name} must be a hex string, got {type(value).__name__}")
  if value != value.lower() or value.strip() != value:
    raise ChallengeError(f"{name} must be lower-case hex without spaces: {value[:80]!r}")
  try:
    raw = bytes.fromhex(value)
  except ValueError:
    raise ChallengeError(f"{name} is not hex: {value[:80]!r}") from None
  if length is not None and len(raw) != length:
    raise ChallengeError(f"{name} must be {length}-byte hex, got {len(raw)} bytes")
  if length is None and len(raw) > MAX_NONCE_BYTES:
    raise ChallengeError(f"{name} is {len(raw)} bytes; at most {MAX_NONCE_BYTES}")
  return value
