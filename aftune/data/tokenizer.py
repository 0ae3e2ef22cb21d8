"""Tokenizer loading: a thin wrapper over Hugging Face `tokenizers` json files.

  load_tokenizer(path) -> TextTokenizer   (HF `tokenizers` json)
  check_template(tokenizer, template)     (the template's markers are tokens)

Problems raise `records.DataError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from aftune.data.chat import ChatTemplate
from aftune.data.records import DataError

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
  except Exception as e:  # noqa: BLE001 (the Rust side raises a bare Exception)
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
