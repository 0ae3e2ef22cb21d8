"""Instruction-data records: JSONL loading and validation.

  load_jsonl(path) -> list[Conversation]   (Alpaca or chat records)

Any problem with input files raises `DataError` (a ValueError) whose message
starts with "<file>:<line>: " (or "<file>: " when no line applies). The other
`aftune.data` modules raise the same `DataError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aftune import errors
from aftune.data.chat import ROLES


class DataError(errors.InputError):
  """Bad input data or tokenizer; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Message:
  """One chat turn.

  Attributes:
    role: "system", "user" or "assistant".
    content: The turn's text, without any template markers.
  """

  role: str
  content: str


@dataclasses.dataclass(frozen=True)
class Conversation:
  """A training example, normalized to a list of turns.

  Attributes:
    messages: The turns in order. Alpaca records become (user, assistant).
    source: "<file>:<line>" the record came from, for error messages/audit.
    fmt: "alpaca" or "chat": the record's original format.
  """

  messages: tuple[Message, ...]
  source: str
  fmt: str

  def prompt_and_response(self) -> tuple[tuple[Message, ...], str]:
    """Splits off the final assistant turn, e.g. for sampling-based eval.

    Returns:
      (all turns before the last assistant turn, that turn's content).
    """
    last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
    return self.messages[:last], self.messages[last].content


def _fail(source: str, problem: str) -> DataError:
  return DataError(f"{source}: {problem}")


def _get_str(obj: Mapping[str, Any], key: str, source: str, where: str = "") -> str:
  """Returns obj[key] if it is a string, else raises a DataError."""
  if key not in obj:
    raise _fail(source, f"missing field '{where}{key}'")
  value = obj[key]
  if not isinstance(value, str):
    raise _fail(
      source,
      f"field '{where}{key}' must be a string, got {type(value).__name__}",
    )
  return value


def parse_record(obj: Any, source: str) -> Conversation:
  """Validates one decoded JSON record and normalizes it.

  Alpaca: {"instruction": str, "input": str (optional, may be null/""),
  "output": str} becomes a user turn (instruction, plus "\\n\\n" + input when
  input is non-empty) and an assistant turn (output).
  Chat: {"messages": [{"role": ..., "content": ...}, ...]} with roles
  system/user/assistant; system only as the first turn; at least one
  assistant turn (otherwise nothing would be trained on).
  Other keys (ids, metadata) are ignored.

  Args:
    obj: The decoded JSON value.
    source: "<file>:<line>", used as the error-message prefix.

  Returns:
    The Conversation.

  Raises:
    DataError: the record is malformed.
  """
  if not isinstance(obj, dict):
    raise _fail(source, f"record must be a JSON object, got {type(obj).__name__}")
  has_chat, has_alpaca = "messages" in obj, "instruction" in obj
  if has_chat and has_alpaca:
    raise _fail(source, "record has both 'messages' (chat) and 'instruction' (Alpaca)")
  if has_chat:
    return _parse_chat(obj["messages"], source)
  if has_alpaca:
    return _parse_alpaca(obj, source)
  raise _fail(
    source,
    "missing field: record has neither 'instruction' (Alpaca) nor 'messages' (chat); "
    f"keys are {sorted(obj)}",
  )


def _parse_alpaca(obj: Mapping[str, Any], source: str) -> Conversation:
  instruction = _get_str(obj, "instruction", source)
  if not instruction.strip():
    raise _fail(source, "field 'instruction' is empty")
  output = _get_str(obj, "output", source)
  extra = obj.get("input")
  if extra is None:
    extra = ""
  elif not isinstance(extra, str):
    raise _fail(source, f"field 'input' must be a string, got {type(extra).__name__}")
  user = f"{instruction}\n\n{extra}" if extra else instruction
  messages = (Message("user", user), Message("assistant", output))
  return Conversation(messages=messages, source=source, fmt="alpaca")


def _parse_chat(raw: Any, source: str) -> Conversation:
  if not isinstance(raw, list):
    raise _fail(source, f"field 'messages' must be a list, got {type(raw).__name__}")
  if not raw:
    raise _fail(source, "field 'messages' is empty")
  messages = []
  for i, msg in enumerate(raw):
    where = f"messages[{i}]."
    if not isinstance(msg, dict):
      raise _fail(source, f"messages[{i}] must be an object, got {type(msg).__name__}")
    role = _get_str(msg, "role", source, where)
    if role not in ROLES:
      raise _fail(source, f"{where}role: unknown role {role!r}; expected one of {list(ROLES)}")
    if role == "system" and i != 0:
      raise _fail(source, f"{where}role: a 'system' message may only be the first message")
    content = _get_str(msg, "content", source, where)
    messages.append(Message(role, content))
  if not any(m.role == "assistant" for m in messages):
    raise _fail(source, "no 'assistant' message: nothing to train on")
  return Conversation(messages=tuple(messages), source=source, fmt="chat")


def load_jsonl(path: str | Path) -> list[Conversation]:
  """Loads Alpaca and/or chat records from a JSONL file (formats may mix).

  Blank lines are skipped. Line numbers in errors are 1-based.

  Args:
    path: The .jsonl file.

  Returns:
    The records, in file order.

  Raises:
    DataError: missing/unreadable file, bad UTF-8 or JSON, malformed record,
      or no records at all.
  """
  path = Path(path)
  try:
    raw_bytes = path.read_bytes()
  except FileNotFoundError:
    raise DataError(f"{path}: file not found") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read file: {e}") from None
  records = []
  # Split on b"\n" ourselves (not str.splitlines) so that line numbers match
  # what editors and `sed -n Np` show, even if a field contains \u2028 etc.
  for lineno, line_bytes in enumerate(raw_bytes.split(b"\n"), start=1):
    source = f"{path}:{lineno}"
    try:
      line = line_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _fail(source, f"invalid UTF-8: {e}") from None
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise _fail(source, f"invalid JSON: {e.msg} (column {e.colno})") from None
    records.append(parse_record(obj, source))
  if not records:
    raise DataError(f"{path}: empty dataset (no records)")
  return records


def file_sha256(path: str | Path) -> str:
  """Returns the hex sha256 of a file, for recording data provenance.

  Args:
    path: Any file.

  Returns:
    64 hex characters.
  """
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()
