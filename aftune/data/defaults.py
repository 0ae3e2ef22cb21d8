"""The built-in synthetic dataset under data/default (see its README.md).

`load_default()` returns its records, tokenizer and chat template; the
DEFAULT_* paths are the config defaults for training on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from aftune.data.chat import ChatTemplate
from aftune.data.chat import get_template
from aftune.data.records import Conversation
from aftune.data.records import load_jsonl
from aftune.data.tokenizer import TextTokenizer
from aftune.data.tokenizer import load_tokenizer

# The repository root's data/default (this file is aftune/data/defaults.py).
DEFAULT_DATA_DIR: Path = Path(__file__).resolve().parents[2] / "data" / "default"
DEFAULT_TRAIN_PATH: Path = DEFAULT_DATA_DIR / "train.jsonl"
DEFAULT_TOKENIZER_PATH: Path = DEFAULT_DATA_DIR / "tokenizer.json"
DEFAULT_TEMPLATE: str = "aftune"


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
