"""JSON in and out, in one place: strict parsing of what others send, atomic writes of ours.

Everything a provider sends is parsed with `strict_loads` (no duplicate keys, no
NaN/Infinity, bounded nesting), so that two parsers can never see two documents.
Everything aftune writes goes through `write_json`: a temporary file, then a rename,
so a reader (or a crash) never sees half a document.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aftune import errors

MAX_DEPTH = 64  # no document of aftune nests deeper; deeper input is hostile


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  # Duplicate keys would let two JSON parsers see two different documents.
  out: dict[str, Any] = {}
  for k, v in pairs:
    if k in out:
      raise ValueError(f"duplicate JSON key {k!r}")
    out[k] = v
  return out


def _reject_constant(name: str) -> Any:
  raise ValueError(f"{name} is not valid JSON")


def _check_depth(text: str) -> None:
  """Refuses nesting deeper than MAX_DEPTH before parsing (the parser would recurse)."""
  depth, in_str, escaped = 0, False, False
  for ch in text:
    if in_str:
      if escaped:
        escaped = False
      elif ch == "\\":
        escaped = True
      elif ch == '"':
        in_str = False
    elif ch == '"':
      in_str = True
    elif ch in "[{":
      depth += 1
      if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    elif ch in "]}":
      depth -= 1


def strict_loads(text: str | bytes) -> Any:
  """Parses strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, nesting <= MAX_DEPTH.

  Raises:
    ValueError: otherwise (UnicodeDecodeError and json.JSONDecodeError are ValueErrors).
  """
  if isinstance(text, bytes):
    text = text.decode("utf-8")
  _check_depth(text)
  return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)


def load_json(path: str | os.PathLike[str], error: type[Exception] = errors.InputError,
              what: str = "") -> Any:
  """Loads strict JSON from a file; any problem raises `error` naming the file.

  Args:
    path: the JSON file.
    error: the exception class to raise (an `errors.InputError` subclass).
    what: what the file is, for the message (e.g. "commitment").
  """
  label = f"{os.fspath(path)}" + (f" ({what})" if what else "")
  try:
    with open(path, "rb") as f:
      return strict_loads(f.read())
  except FileNotFoundError:
    raise error(f"{label}: missing") from None
  except (OSError, ValueError) as e:
    raise error(f"{label}: not valid JSON ({e})") from None


def write_json(path: str | os.PathLike[str], doc: Any) -> None:
  """Writes a JSON file atomically (tmp file, then rename): readers never see half of it."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
  tmp.replace(path)
