#!/usr/bin/env python
"""Generates the built-in default dataset and tokenizer (data/default/).

Deterministic and offline: rerunning it rewrites byte-identical
train.jsonl and tokenizer.json (checked by tests/test_data.py).

  .venv/bin/python scripts/make_default_data.py            # -> data/default
  .venv/bin/python scripts/make_default_data.py --out-dir /tmp/x

The examples are short synthetic instruction tasks a tiny model can visibly
learn in a few hundred steps (see data/default/README.md for the list).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from aftune.data.chat import AFTUNE_SPECIAL_TOKENS  # noqa: E402

SEED = 20240601
NUM_EXAMPLES = 2400
CHAT_FRACTION = 0.1
VOCAB_SIZE = 1024

WORDS = (
  "cat dog sun moon tree fish bird star rain book cup hat red blue green "
  "apple lamp door road milk salt wind fire snow rock leaf ship king frog "
  "bread chair cloud river stone grape lemon tiger horse mouse plant water"
).split()

PHRASES = (
  "hello",
  "hi there",
  "good night",
  "yes",
  "thank you",
  "go team",
  "well done",
  "see you",
  "ok",
  "hooray",
)

# (country, capital): a small fixed table.
CAPITALS = (
  ("France", "Paris"),
  ("Germany", "Berlin"),
  ("Italy", "Rome"),
  ("Spain", "Madrid"),
  ("Portugal", "Lisbon"),
  ("Japan", "Tokyo"),
  ("China", "Beijing"),
  ("India", "New Delhi"),
  ("Russia", "Moscow"),
  ("Canada", "Ottawa"),
  ("Mexico", "Mexico City"),
  ("Brazil", "Brasilia"),
  ("Argentina", "Buenos Aires"),
  ("Chile", "Santiago"),
  ("Peru", "Lima"),
  ("Egypt", "Cairo"),
  ("Kenya", "Nairobi"),
  ("Nigeria", "Abuja"),
  ("Ghana", "Accra"),
  ("Morocco", "Rabat"),
  ("Australia", "Canberra"),
  ("Ireland", "Dublin"),
  ("Norway", "Oslo"),
  ("Sweden", "Stockholm"),
  ("Finland", "Helsinki"),
  ("Denmark", "Copenhagen"),
  ("Poland", "Warsaw"),
  ("Austria", "Vienna"),
  ("Greece", "Athens"),
  ("Turkey", "Ankara"),
  ("Iran", "Tehran"),
  ("Iraq", "Baghdad"),
  ("Thailand", "Bangkok"),
  ("Vietnam", "Hanoi"),
  ("Indonesia", "Jakarta"),
  ("Cuba", "Havana"),
  ("Hungary", "Budapest"),
  ("Belgium", "Brussels"),
  ("Nepal", "Kathmandu"),
  ("Colombia", "Bogota"),
)

SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.", "Be exact.")


class Gen:
  """Draws from a fixed-seed numpy Generator (PCG64, bit-stable stream)."""

  def __init__(self, seed: int) -> None:
    self.rng = np.random.Generator(np.random.PCG64(seed))

  def int(self, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(self.rng.integers(lo, hi + 1))

  def pick(self, seq):
    """Uniform element of a sequence."""
    return seq[self.int(0, len(seq) - 1)]

  def words(self, lo: int, hi: int) -> list[str]:
    """lo..hi distinct random words."""
    n = self.int(lo, hi)
    idx = self.rng.choice(len(WORDS), size=n, replace=False)
    return [WORDS[int(i)] for i in idx]


# Each task returns (instruction, input, output); input may be "".
Task = Callable[[Gen], tuple[str, str, str]]


def task_reverse(g: Gen) -> tuple[str, str, str]:
  ws = g.words(3, 5)
  out = " ".join(reversed(ws))
  if g.int(0, 1):
    return g.pick(("Reverse the order of these words.", "Reverse this list.")), " ".join(ws), out
  return f"Reverse: {' '.join(ws)}", "", out


def task_sort(g: Gen) -> tuple[str, str, str]:
  nums = [g.int(0, 99) for _ in range(g.int(3, 5))]
  text = " ".join(map(str, nums))
  if g.int(0, 3) == 0:
    return (
      "Sort these numbers from largest to smallest.",
      text,
      " ".join(map(str, sorted(nums, reverse=True))),
    )
  instr = g.pick(("Sort these numbers from smallest to largest.", "Sort in ascending order."))
  return instr, text, " ".join(map(str, sorted(nums)))


def task_add(g: Gen) -> tuple[str, str, str]:
  a, b = g.int(10, 99), g.int(10, 99)
  form = g.int(0, 2)
  if form == 0:
    return f"What is {a} + {b}?", "", str(a + b)
  if form == 1:
    return f"Add {a} and {b}.", "", f"{a} + {b} = {a + b}"
  return "Add these two numbers.", f"{a} {b}", str(a + b)


def task_upper(g: Gen) -> tuple[str, str, str]:
  w = g.pick(WORDS)
  if g.int(0, 1):
    return f"Write '{w}' in uppercase.", "", w.upper()
  return "Convert to uppercase.", w, w.upper()


def task_capital(g: Gen) -> tuple[str, str, str]:
  country, capital = g.pick(CAPITALS)
  form = g.int(0, 2)
  if form == 0:
    return f"What is the capital of {country}?", "", f"The capital of {country} is {capital}."
  if form == 1:
    return f"Name the capital of {country}.", "", capital
  return "What is the capital of this country?", country, capital


def task_repeat(g: Gen) -> tuple[str, str, str]:
  phrase, n = g.pick(PHRASES), g.int(2, 4)
  return f"Repeat '{phrase}' {n} times.", "", " ".join([phrase] * n)


def task_count(g: Gen) -> tuple[str, str, str]:
  w = g.pick(WORDS)
  if g.int(0, 1):
    return f"How many letters are in the word '{w}'?", "", str(len(w))
  letter = g.pick(sorted(set(w)))
  return f"How many times does '{letter}' appear in '{w}'?", "", str(w.count(letter))


def task_first_last(g: Gen) -> tuple[str, str, str]:
  ws = g.words(3, 5)
  if g.int(0, 1):
    return "What is the first word?", " ".join(ws), ws[0]
  return "What is the last word?", " ".join(ws), ws[-1]


TASKS: dict[str, Task] = {
  "reverse": task_reverse,
  "sort": task_sort,
  "add": task_add,
  "upper": task_upper,
  "capital": task_capital,
  "repeat": task_repeat,
  "count": task_count,
  "first_last": task_first_last,
}


def user_text(instruction: str, inp: str) -> str:
  """Same rendering as aftune.data.records for Alpaca records."""
  return f"{instruction}\n\n{inp}" if inp else instruction


def make_records(seed: int = SEED, num_examples: int = NUM_EXAMPLES) -> list[dict]:
  """Generates the records (Alpaca dicts, ~CHAT_FRACTION chat dicts).

  Args:
    seed: numpy seed.
    num_examples: Number of records.

  Returns:
    JSON-ready dicts, each with a "task" tag (ignored by the loader).
  """
  g = Gen(seed)
  names = list(TASKS)
  records = []
  for _ in range(num_examples):
    name = g.pick(names)
    instruction, inp, output = TASKS[name](g)
    if g.rng.random() >= CHAT_FRACTION:
      records.append({"task": name, "instruction": instruction, "input": inp, "output": output})
      continue
    messages = []
    if g.int(0, 1):
      messages.append({"role": "system", "content": g.pick(SYSTEM_PROMPTS)})
    messages += [
      {"role": "user", "content": user_text(instruction, inp)},
      {"role": "assistant", "content": output},
    ]
    if g.int(0, 2) == 0:  # some two-round conversations
      name2 = g.pick(names)
      i2, inp2, out2 = TASKS[name2](g)
      messages += [
        {"role": "user", "content": user_text(i2, inp2)},
        {"role": "assistant", "content": out2},
      ]
      name = f"{name}+{name2}"
    records.append({"task": name, "messages": messages})
  return records


def corpus(records: list[dict]) -> list[str]:
  """All texts the tokenizer is trained on, in a fixed order."""
  texts = []
  for r in records:
    if "messages" in r:
      texts += [m["content"] for m in r["messages"]]
    else:
      texts += [user_text(r["instruction"], r["input"]), r["output"]]
  return texts


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
  """Trains a byte-level BPE tokenizer with the "aftune" special tokens.

  Digits are split individually before BPE so numbers are sequences of
  digit tokens (arithmetic tasks become learnable by a tiny model).

  Args:
    texts: Training texts.
    vocab_size: Target vocabulary size (bytes and special tokens included).

  Returns:
    The trained tokenizer; special tokens get ids 0..5 (<|pad|> is 0).
  """
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=1,  # reach exactly vocab_size on this small corpus
    show_progress=False,
    special_tokens=list(AFTUNE_SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def write(out_dir: Path, seed: int = SEED, num_examples: int = NUM_EXAMPLES) -> None:
  """Writes train.jsonl and tokenizer.json into out_dir.

  Args:
    out_dir: Destination directory (created if needed).
    seed: numpy seed.
    num_examples: Number of records.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  records = make_records(seed, num_examples)
  with open(out_dir / "train.jsonl", "w", encoding="utf-8", newline="\n") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  tok = train_tokenizer(corpus(records))
  tok.save(str(out_dir / "tokenizer.json"), pretty=False)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "data" / "default")
  parser.add_argument("--seed", type=int, default=SEED)
  parser.add_argument("--num-examples", type=int, default=NUM_EXAMPLES)
  args = parser.parse_args(argv)
  write(args.out_dir, args.seed, args.num_examples)
  print(f"wrote {args.out_dir}/train.jsonl and tokenizer.json")


if __name__ == "__main__":
  main()
