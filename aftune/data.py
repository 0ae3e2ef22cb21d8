"""Instruction data: loading, tokenization, loss masking and batch order.

Pipeline:
  load_jsonl(path)            -> list[Conversation]   (Alpaca or chat records)
  load_tokenizer(path)        -> TextTokenizer        (HF `tokenizers` json)
  encode_dataset(records, tokenizer, template, max_len)
                              -> {"tokens", "targets", "loss_mask", "attn_mask"}
                                 numpy arrays of shape [N, T=max_len]
  example_indices_for_step(seed, N, batch_size, step) -> int64 [B]
  make_batch(encoded, indices) -> same four keys, shape [B, T]

Everything is numpy and deterministic: the batch at a given step is a pure
function of (seed, N, batch_size, step), so a run can be audited or resumed
without saving data-loader state.

Any problem with input files raises `DataError` (a ValueError) whose message
starts with "<file>:<line>: " (or "<file>: " when no line applies).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Tokenizer

from aftune.chat import ROLES, ChatTemplate, get_template

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR: Path = Path(__file__).resolve().parent.parent / "data" / "default"
DEFAULT_TRAIN_PATH: Path = DEFAULT_DATA_DIR / "train.jsonl"
DEFAULT_TOKENIZER_PATH: Path = DEFAULT_DATA_DIR / "tokenizer.json"
DEFAULT_TEMPLATE: str = "aftune"

BATCH_KEYS: tuple[str, ...] = ("tokens", "targets", "loss_mask", "attn_mask")


class DataError(ValueError):
  """Bad input data or tokenizer; the message names the file and line."""


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

# tokenizer.json does not say which token is bos/eos/pad (that lives in
# tokenizer_config.json), so we try well-known names in this order.
_BOS_CANDIDATES = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>")
_EOS_CANDIDATES = ("<|end|>", "<|eot_id|>", "<|im_end|>", "</s>", "<eos>", "<|endoftext|>")
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "<|finetune_right_pad_id|>", "<|endoftext|>")


class TextTokenizer:
  """Thin wrapper over a `tokenizers.Tokenizer` with the ids we need.

  Attributes:
    path: The tokenizer.json it was loaded from.
    vocab_size: Number of ids, added/special tokens included.
    pad_id: Id used to fill padding (never trained on).
    eos_id: End-of-sequence / end-of-turn id (stops generation).
    bos_id: Beginning-of-sequence id, or None if the tokenizer has none.
  """

  def __init__(
    self,
    tokenizer: Tokenizer,
    path: Path,
    bos_token: str | None,
    eos_token: str | None,
    pad_token: str | None,
  ) -> None:
    self._tok = tokenizer
    # A second instance that treats special-token strings as plain text:
    # used for user-supplied content so a record containing "<|end|>"
    # cannot forge turn boundaries.
    self._tok_literal = Tokenizer.from_str(tokenizer.to_str())
    self._tok_literal.encode_special_tokens = True
    self.path = path
    self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._resolve(bos_token, _BOS_CANDIDATES, "bos", required=False)
    eos_id = self._resolve(eos_token, _EOS_CANDIDATES, "eos", required=True)
    assert eos_id is not None
    self.eos_id: int = eos_id
    pad_id = self._resolve(pad_token, _PAD_CANDIDATES, "pad", required=False)
    # Padding is masked out everywhere, so any id works; eos is the
    # conventional fallback.
    self.pad_id: int = self.eos_id if pad_id is None else pad_id

  def _resolve(
    self, explicit: str | None, candidates: Sequence[str], what: str, required: bool
  ) -> int | None:
    if explicit is not None:
      tid = self._tok.token_to_id(explicit)
      if tid is None:
        raise DataError(f"{self.path}: {what} token {explicit!r} is not in the vocabulary")
      return tid
    for name in candidates:
      tid = self._tok.token_to_id(name)
      if tid is not None:
        return tid
    if required:
      raise DataError(
        f"{self.path}: no {what} token found (tried {list(candidates)}); "
        f"pass {what}_token= explicitly"
      )
    return None

  def encode(self, text: str) -> list[int]:
    """Tokenizes text; special-token strings in it become special ids.

    No bos/eos is added automatically.

    Args:
      text: Any string.

    Returns:
      Token ids.
    """
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_literal(self, text: str) -> list[int]:
    """Tokenizes text, treating special-token strings as ordinary text.

    Args:
      text: Untrusted content (e.g. a user message).

    Returns:
      Token ids; none of them is a special token.
    """
    return self._tok_literal.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Turns ids back into text.

    Args:
      ids: Token ids (list or 1-D integer array).
      skip_special_tokens: Drop special tokens from the output.

    Returns:
      The text.
    """
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    """Returns the id of a vocabulary entry, or None if absent.

    Args:
      token: The token string, e.g. "<|end|>".

    Returns:
      Its id or None.
    """
    return self._tok.token_to_id(token)

  def __repr__(self) -> str:
    return (
      f"TextTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, "
      f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
    )


def load_tokenizer(
  path: str | Path,
  *,
  bos_token: str | None = None,
  eos_token: str | None = None,
  pad_token: str | None = None,
) -> TextTokenizer:
  """Loads a Hugging Face `tokenizer.json`.

  bos/eos/pad default to the first well-known name present in the
  vocabulary (see _BOS_CANDIDATES etc.); pad falls back to eos.

  Args:
    path: A tokenizer.json file, or a directory containing one.
    bos_token: Override the bos token string.
    eos_token: Override the eos token string.
    pad_token: Override the pad token string.

  Returns:
    The TextTokenizer.

  Raises:
    DataError: missing or malformed file, or a named token is absent.
  """
  path = Path(path)
  if path.is_dir():
    path = path / "tokenizer.json"
  if not path.is_file():
    raise DataError(f"{path}: tokenizer file not found")
  try:
    tok = Tokenizer.from_file(str(path))
  except Exception as e:  # the Rust side raises a bare Exception
    raise DataError(f"{path}: malformed tokenizer file: {e}") from None
  return TextTokenizer(tok, path, bos_token, eos_token, pad_token)


def check_template(tokenizer: TextTokenizer, template: ChatTemplate) -> None:
  """Checks that the template's bos/end markers are single tokens.

  Catches pairing a template with the wrong tokenizer (e.g. "llama3" with
  the built-in tokenizer), which would otherwise silently train on markers
  split into many ordinary tokens.

  Args:
    tokenizer: The tokenizer.
    template: The chat template.

  Raises:
    DataError: a marker is not a single vocabulary token.
  """
  for marker in template.special_markers():
    if tokenizer.token_to_id(marker) is None:
      raise DataError(
        f"{tokenizer.path}: chat template {template.name!r} needs token {marker!r}, "
        "which this tokenizer does not have (wrong template for this tokenizer?)"
      )


# ---------------------------------------------------------------------------
# Conversation -> token ids + loss flags
# ---------------------------------------------------------------------------


def encode_conversation(
  conv: Conversation, tokenizer: TextTokenizer, template: ChatTemplate | str
) -> tuple[list[int], list[bool]]:
  """Renders a conversation with the template, tokenizing turn by turn.

  Tokenizing each piece separately (instead of the rendered string) is what
  tells us exactly which ids belong to assistant responses. Pieces are cut
  at special markers and at the start of content, which is also how a
  prompt is tokenized at inference, so nothing is lost.

  Args:
    conv: The conversation.
    tokenizer: The tokenizer.
    template: A ChatTemplate or preset name.

  Returns:
    (ids, is_response): the full sequence (bos included if the template has
    one) and, per id, whether it is an assistant response token (content or
    the end-of-turn marker right after it). Only those are trained on.
  """
  template = get_template(template)
  ids: list[int] = []
  is_response: list[bool] = []

  def add(new_ids: list[int], trained: bool) -> None:
    ids.extend(new_ids)
    is_response.extend([trained] * len(new_ids))

  if template.bos:
    add(tokenizer.encode(template.bos), False)
  for msg in conv.messages:
    trained = msg.role == "assistant"
    add(tokenizer.encode(template.header(msg.role)), False)
    add(tokenizer.encode_literal(msg.content), trained)
    add(tokenizer.encode(template.end_of_turn), trained)
    if template.turn_separator:
      add(tokenizer.encode(template.turn_separator), False)
  return ids, is_response


def encode_prompt(
  messages: Sequence[Message], tokenizer: TextTokenizer, template: ChatTemplate | str
) -> list[int]:
  """Token ids of a prompt for generation: the turns plus an assistant header.

  Args:
    messages: The turns so far (typically ending with a user turn).
    tokenizer: The tokenizer.
    template: A ChatTemplate or preset name.

  Returns:
    Ids to feed the model; it should continue with the assistant's reply
    and then emit the template's end_of_turn token.
  """
  template = get_template(template)
  conv = Conversation(messages=tuple(messages), source="<prompt>", fmt="chat")
  ids, _ = encode_conversation(conv, tokenizer, template)
  return ids + tokenizer.encode(template.assistant_header)


# ---------------------------------------------------------------------------
# Fixed-length examples
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncodedExample:
  """One example as fixed-length next-token-prediction arrays.

  Attributes:
    tokens_T: int32 [T] model inputs s[:-1], right-padded with pad_id.
    targets_T: int32 [T] next tokens s[1:], right-padded with pad_id.
    loss_mask_T: float32 [T] 1.0 where targets_T[t] is an assistant token.
    attn_mask_T: bool [T] True at real (non-pad) positions.
    num_tokens: Length of the full sequence s before truncation.
    truncated: Whether s was cut to fit (len(s) > T + 1).
  """

  tokens_T: np.ndarray
  targets_T: np.ndarray
  loss_mask_T: np.ndarray
  attn_mask_T: np.ndarray
  num_tokens: int
  truncated: bool


def encode_example(
  ids: Sequence[int], is_response: Sequence[bool], max_len: int, pad_id: int
) -> EncodedExample:
  """Shifts, truncates (at the right) and pads one token sequence.

  A sequence s of up to max_len + 1 ids fits without truncation, since the
  inputs are s[:-1] and the targets s[1:]. Position t predicts s[t + 1], so
  the loss mask at t is is_response[t + 1].

  Args:
    ids: The full sequence s (at least 2 ids).
    is_response: Per id of s, whether it is trained on.
    max_len: T, the output length.
    pad_id: Filler id for padded positions.

  Returns:
    The EncodedExample.
  """
  if len(ids) != len(is_response):
    raise ValueError(f"len(ids)={len(ids)} != len(is_response)={len(is_response)}")
  if len(ids) < 2:
    raise ValueError("need at least 2 tokens to make a next-token example")
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  s_S = np.asarray(ids[: max_len + 1], dtype=np.int32)
  resp_S = np.asarray(is_response[: max_len + 1], dtype=bool)
  n = len(s_S) - 1  # number of real positions

  tokens_T = np.full((max_len,), pad_id, dtype=np.int32)
  targets_T = np.full((max_len,), pad_id, dtype=np.int32)
  loss_mask_T = np.zeros((max_len,), dtype=np.float32)
  attn_mask_T = np.zeros((max_len,), dtype=bool)
  tokens_T[:n] = s_S[:-1]
  targets_T[:n] = s_S[1:]
  loss_mask_T[:n] = resp_S[1:]
  attn_mask_T[:n] = True
  return EncodedExample(
    tokens_T=tokens_T,
    targets_T=targets_T,
    loss_mask_T=loss_mask_T,
    attn_mask_T=attn_mask_T,
    num_tokens=len(ids),
    truncated=len(ids) > max_len + 1,
  )


@dataclasses.dataclass(frozen=True)
class EncodeStats:
  """Summary of an encode_dataset call (log it with the run).

  Attributes:
    num_examples: N.
    max_len: T.
    num_truncated: Examples whose sequence was cut at T + 1 tokens.
    num_no_loss: Truncated examples that lost every response token (they
      are kept, with an all-zero loss mask, so indices stay stable).
    num_loss_tokens: Total 1.0 entries in the loss mask.
    mean_tokens: Mean untruncated sequence length (bos included).
    max_tokens: Longest untruncated sequence.
  """

  num_examples: int
  max_len: int
  num_truncated: int
  num_no_loss: int
  num_loss_tokens: int
  mean_tokens: float
  max_tokens: int


def _as_conversations(records: Iterable[Conversation | Mapping[str, Any]]) -> list[Conversation]:
  convs = []
  for i, rec in enumerate(records):
    convs.append(rec if isinstance(rec, Conversation) else parse_record(rec, f"<records>[{i}]"))
  return convs


def encode_dataset_with_stats(
  records: Iterable[Conversation | Mapping[str, Any]],
  tokenizer: TextTokenizer,
  template: ChatTemplate | str,
  max_len: int,
) -> tuple[dict[str, np.ndarray], EncodeStats]:
  """Like encode_dataset, also returning an EncodeStats.

  Args:
    records: Conversations (from load_jsonl) or raw record dicts.
    tokenizer: The tokenizer.
    template: A ChatTemplate or preset name.
    max_len: T.

  Returns:
    (arrays, stats); see encode_dataset for the arrays.
  """
  template = get_template(template)
  check_template(tokenizer, template)
  convs = _as_conversations(records)
  if not convs:
    raise DataError("<records>: empty dataset (no records to encode)")
  examples = []
  for conv in convs:
    ids, is_response = encode_conversation(conv, tokenizer, template)
    examples.append(encode_example(ids, is_response, max_len, tokenizer.pad_id))

  arrays = {
    "tokens": np.stack([e.tokens_T for e in examples]),
    "targets": np.stack([e.targets_T for e in examples]),
    "loss_mask": np.stack([e.loss_mask_T for e in examples]),
    "attn_mask": np.stack([e.attn_mask_T for e in examples]),
  }
  lengths_N = np.array([e.num_tokens for e in examples])
  loss_per_example_N = arrays["loss_mask"].sum(axis=1)
  stats = EncodeStats(
    num_examples=len(examples),
    max_len=max_len,
    num_truncated=sum(e.truncated for e in examples),
    num_no_loss=int((loss_per_example_N == 0).sum()),
    num_loss_tokens=int(loss_per_example_N.sum()),
    mean_tokens=float(lengths_N.mean()),
    max_tokens=int(lengths_N.max()),
  )
  if stats.num_truncated:
    logger.warning(
      "%d of %d examples truncated to max_len=%d (longest has %d tokens)",
      stats.num_truncated,
      stats.num_examples,
      max_len,
      stats.max_tokens,
    )
  if stats.num_no_loss:
    no_loss = [c.source for c, m in zip(convs, loss_per_example_N) if m == 0]
    logger.warning(
      "%d examples have no response tokens left after truncation (all-zero loss mask), e.g. %s",
      stats.num_no_loss,
      ", ".join(no_loss[:5]),
    )
  return arrays, stats


def encode_dataset(
  records: Iterable[Conversation | Mapping[str, Any]],
  tokenizer: TextTokenizer,
  template: ChatTemplate | str,
  max_len: int,
) -> dict[str, np.ndarray]:
  """Encodes records into fixed-length next-token-prediction arrays.

  Truncated examples are logged (warning) and kept, even if no response
  token survives, so example indices always match record order.

  Args:
    records: Conversations (from load_jsonl) or raw record dicts.
    tokenizer: The tokenizer.
    template: A ChatTemplate or preset name.
    max_len: T, the sequence length.

  Returns:
    {"tokens": int32 [N, T], "targets": int32 [N, T],
     "loss_mask": float32 [N, T], "attn_mask": bool [N, T]}
    with right padding; targets[n, t] is the token after tokens[n, t].
  """
  arrays, _ = encode_dataset_with_stats(records, tokenizer, template, max_len)
  return arrays


# ---------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, num_examples: int, epoch: int) -> np.ndarray:
  for name, value in (("seed", seed), ("epoch", epoch)):
    if not 0 <= value < 2**64:
      raise ValueError(f"{name} must be in [0, 2**64), got {value}")
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}")
  # Philox is keyed directly (no SeedSequence hashing) by the 128-bit key
  # (seed, epoch), so every (seed, epoch) gets an independent stream.
  # Only raw bits are used: numpy guarantees the bit generator's stream is
  # stable across versions, but not Generator methods like permutation().
  bitgen = np.random.Philox(key=np.array([seed, epoch], dtype=np.uint64))
  keys_N = bitgen.random_raw(num_examples)
  # Sorting i.i.d. uniform 64-bit keys gives a uniform random permutation;
  # the stable sort settles (astronomically unlikely) ties by index.
  perm_N = np.argsort(keys_N, kind="stable").astype(np.int64)
  perm_N.flags.writeable = False
  return perm_N


def batch_order(seed: int, num_examples: int, epoch: int) -> np.ndarray:
  """The order in which examples are visited in one epoch.

  Defined as argsort(Philox(key=[seed, epoch]).random_raw(num_examples)),
  which depends only on numpy's bit-stable Philox stream, so it is the same
  across processes, machines and numpy versions.

  Args:
    seed: Data seed, in [0, 2**64).
    num_examples: N.
    epoch: Epoch number, in [0, 2**64).

  Returns:
    int64 [N], a permutation of range(N).
  """
  return _permutation(seed, num_examples, epoch).copy()


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Number of full batches per epoch (the last partial batch is dropped).

  Args:
    num_examples: N.
    batch_size: B.

  Returns:
    N // B.

  Raises:
    ValueError: B < 1 or B > N (no full batch at all).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if batch_size > num_examples:
    raise ValueError(f"batch_size={batch_size} exceeds the number of examples ({num_examples})")
  return num_examples // batch_size


def example_indices_for_step(
  seed: int, num_examples: int, batch_size: int, step: int
) -> np.ndarray:
  """Which examples form the batch of a training step (a pure function).

  epoch = step // steps_per_epoch; the batch is the (step % steps_per_epoch)
  -th slice of batch_order(seed, num_examples, epoch).

  Args:
    seed: Data seed.
    num_examples: N.
    batch_size: B.
    step: Global step, >= 0.

  Returns:
    int64 [B] example indices.
  """
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  spe = steps_per_epoch(num_examples, batch_size)
  epoch, k = divmod(step, spe)
  return _permutation(seed, num_examples, epoch)[k * batch_size : (k + 1) * batch_size].copy()


def make_batch(encoded: Mapping[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
  """Gathers a batch from encode_dataset's arrays.

  Args:
    encoded: encode_dataset output ([N, T] arrays).
    indices: int [B] example indices.

  Returns:
    {"tokens", "targets", "loss_mask", "attn_mask"}, each [B, T].
  """
  idx_B = np.asarray(indices, dtype=np.int64)
  return {k: encoded[k][idx_B] for k in BATCH_KEYS}


def num_epochs_for_steps(num_examples: int, batch_size: int, num_steps: int) -> float:
  """How many epochs num_steps steps cover (for logging).

  Args:
    num_examples: N.
    batch_size: B.
    num_steps: Training steps.

  Returns:
    num_steps / steps_per_epoch.
  """
  return num_steps / steps_per_epoch(num_examples, batch_size)


# ---------------------------------------------------------------------------
# Built-in default data
# ---------------------------------------------------------------------------


class DefaultData(NamedTuple):
  """The built-in synthetic dataset (see data/default/README.md)."""

  records: list[Conversation]
  tokenizer: TextTokenizer
  template: ChatTemplate


def load_default(data_dir: str | Path = DEFAULT_DATA_DIR) -> DefaultData:
  """Loads the built-in dataset, its tokenizer and the "aftune" template.

  Args:
    data_dir: Directory with train.jsonl and tokenizer.json.

  Returns:
    DefaultData(records, tokenizer, template).
  """
  data_dir = Path(data_dir)
  return DefaultData(
    records=load_jsonl(data_dir / "train.jsonl"),
    tokenizer=load_tokenizer(data_dir / "tokenizer.json"),
    template=get_template(DEFAULT_TEMPLATE),
  )
