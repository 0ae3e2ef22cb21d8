"""Encoding conversations into fixed-length next-token-prediction arrays.

  encode_dataset(records, tokenizer, template, max_len)
      -> {"tokens", "targets", "loss_mask", "attn_mask"}
         numpy arrays of shape [N, T=max_len]
  encode_prompt(messages, tokenizer, template) -> ids for generation

Only assistant response tokens are trained on (loss_mask == 1.0). Everything
is numpy and deterministic.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from aftune.data.chat import ChatTemplate
from aftune.data.chat import get_template
from aftune.data.records import Conversation
from aftune.data.records import DataError
from aftune.data.records import Message
from aftune.data.records import parse_record
from aftune.data.tokenizer import TextTokenizer
from aftune.data.tokenizer import check_template

logger = logging.getLogger(__name__)


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
