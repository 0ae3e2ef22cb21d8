"""Tests for the aftune.data package (records, tokenizer, encoding, order, defaults, chat)
and scripts/make_default_data.py."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers

from aftune.data import defaults
from aftune.data import encoding
from aftune.data import order
from aftune.data import records as records_lib
from aftune.data import tokenizer as tokenizer_lib
from aftune.data.chat import AFTUNE
from aftune.data.chat import CHATML
from aftune.data.chat import LLAMA3
from aftune.data.chat import PRESETS
from aftune.data.chat import ChatTemplate
from aftune.data.chat import get_template
from aftune.data.records import Conversation
from aftune.data.records import DataError
from aftune.data.records import Message

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "make_default_data.py"


@pytest.fixture(scope="module")
def tok() -> tokenizer_lib.TextTokenizer:
  return tokenizer_lib.load_tokenizer(defaults.DEFAULT_TOKENIZER_PATH)


def write_lines(path: Path, lines: list[str]) -> Path:
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def alpaca(instruction: str, output: str, inp: str | None = None) -> Conversation:
  rec = {"instruction": instruction, "output": output}
  if inp is not None:
    rec["input"] = inp
  return records_lib.parse_record(rec, "<test>")


def chat(*turns: tuple[str, str]) -> Conversation:
  return records_lib.parse_record(
    {"messages": [{"role": r, "content": c} for r, c in turns]}, "<test>"
  )


def masked_in_targets(enc: encoding.EncodedExample) -> list[int]:
  return [int(t) for t, m in zip(enc.targets_T, enc.loss_mask_T) if m == 1.0]


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def test_load_alpaca_and_chat(tmp_path):
  path = write_lines(
    tmp_path / "d.jsonl",
    [
      json.dumps({"instruction": "Add.", "input": "1 2", "output": "3", "id": 7}),
      "",  # blank lines are skipped
      json.dumps({"instruction": "Say hi.", "output": "hi", "input": None}),
      json.dumps(
        {
          "messages": [
            {"role": "system", "content": "Be nice."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
          ]
        }
      ),
    ],
  )
  recs = records_lib.load_jsonl(path)
  assert [r.fmt for r in recs] == ["alpaca", "alpaca", "chat"]
  assert recs[0].messages == (Message("user", "Add.\n\n1 2"), Message("assistant", "3"))
  assert recs[1].messages == (Message("user", "Say hi."), Message("assistant", "hi"))
  assert recs[2].messages[0] == Message("system", "Be nice.")
  assert recs[0].source == f"{path}:1"
  assert recs[2].source == f"{path}:4"
  assert recs[2].prompt_and_response() == (recs[2].messages[:2], "Hello")


BAD_RECORDS = [
  # (line 2 content, expected fragment of the message)
  ("{not json", "invalid JSON"),
  ("[1, 2]", "must be a JSON object"),
  (json.dumps({"output": "x"}), "missing field"),
  (json.dumps({"instruction": "x"}), "missing field 'output'"),
  (json.dumps({"instruction": 3, "output": "x"}), "'instruction' must be a string, got int"),
  (json.dumps({"instruction": "x", "output": ["y"]}), "'output' must be a string, got list"),
  (json.dumps({"instruction": "x", "input": 5, "output": "y"}), "'input' must be a string"),
  (json.dumps({"instruction": "  ", "output": "y"}), "'instruction' is empty"),
  (json.dumps({"instruction": "x", "output": "y", "messages": []}), "both"),
  (json.dumps({"messages": "hi"}), "'messages' must be a list"),
  (json.dumps({"messages": []}), "'messages' is empty"),
  (json.dumps({"messages": ["hi"]}), "messages[0] must be an object"),
  (json.dumps({"messages": [{"content": "hi"}]}), "missing field 'messages[0].role'"),
  (json.dumps({"messages": [{"role": "user"}]}), "missing field 'messages[0].content'"),
  (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}), "unknown role 'bot'"),
  (json.dumps({"messages": [{"role": "user", "content": 1}]}), "must be a string, got int"),
  (
    json.dumps(
      {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}
    ),
    "only be the first message",
  ),
  (json.dumps({"messages": [{"role": "user", "content": "a"}]}), "no 'assistant' message"),
]


@pytest.mark.parametrize("line, fragment", BAD_RECORDS)
def test_bad_record_names_file_and_line(tmp_path, line, fragment):
  good = json.dumps({"instruction": "a", "output": "b"})
  path = write_lines(tmp_path / "bad.jsonl", [good, line, good])
  with pytest.raises(DataError) as exc:
    records_lib.load_jsonl(path)
  msg = str(exc.value)
  assert msg.startswith(f"{path}:2: "), msg
  assert fragment in msg, msg


def test_bad_utf8_names_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff"}\n')
  with pytest.raises(DataError, match=r":2: invalid UTF-8"):
    records_lib.load_jsonl(path)


def test_missing_and_empty_files(tmp_path):
  missing = tmp_path / "nope.jsonl"
  with pytest.raises(DataError, match=f"{missing}: file not found"):
    records_lib.load_jsonl(missing)
  empty = write_lines(tmp_path / "empty.jsonl", ["", "   "])
  with pytest.raises(DataError, match=f"{empty}: empty dataset"):
    records_lib.load_jsonl(empty)
  assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------
# Tokenizer and templates
# ---------------------------------------------------------------------------


def test_default_tokenizer(tok):
  assert tok.vocab_size == 1024
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.token_to_id("<|end|>") == tok.eos_id
  assert tok.token_to_id("<|assistant|>") is not None
  assert tok.token_to_id("no such token") is None
  text = "What is the capital of France? 42"
  ids = tok.encode(text)
  assert tok.bos_id not in ids  # no automatic special tokens
  assert tok.decode(ids) == text
  assert tok.encode("<|user|>") == [tok.token_to_id("<|user|>")]


def test_load_tokenizer_errors(tmp_path, tok):
  with pytest.raises(DataError, match="tokenizer file not found"):
    tokenizer_lib.load_tokenizer(tmp_path / "missing.json")
  bad = tmp_path / "tokenizer.json"
  bad.write_text('{"version": "1.0", "model": 12}')
  with pytest.raises(DataError, match=f"{bad}: malformed tokenizer file"):
    tokenizer_lib.load_tokenizer(tmp_path)  # a directory resolves to its tokenizer.json
  with pytest.raises(DataError, match="pad token '<nope>' is not in the vocabulary"):
    tokenizer_lib.load_tokenizer(defaults.DEFAULT_TOKENIZER_PATH, pad_token="<nope>")
  with pytest.raises(DataError, match="needs token '<|begin_of_text|>'"):
    tokenizer_lib.check_template(tok, LLAMA3)


def test_presets():
  assert set(PRESETS) == {"aftune", "llama3", "chatml"}
  assert get_template("chatml") is CHATML
  assert get_template(AFTUNE) is AFTUNE
  with pytest.raises(ValueError, match="unknown chat template"):
    get_template("vicuna")


def tiny_tokenizer(tmp_path: Path, template: ChatTemplate) -> tokenizer_lib.TextTokenizer:
  """A throwaway BPE tokenizer whose special tokens match `template`."""
  specials = [
    "<|pad|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
  ]
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=specials,
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  t.train_from_iterator(["system user assistant hello there how are you"], trainer=trainer)
  path = tmp_path / f"{template.name}.json"
  t.save(str(path))
  return tokenizer_lib.load_tokenizer(path, eos_token=template.end_of_turn)


def expected_response_text(conv: Conversation, template: ChatTemplate) -> str:
  return "".join(m.content + template.end_of_turn for m in conv.messages if m.role == "assistant")


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["aftune", "llama3", "chatml"])
def test_loss_mask_is_exactly_the_assistant_tokens(tmp_path, tok, preset):
  template = get_template(preset)
  tk = tok if preset == "aftune" else tiny_tokenizer(tmp_path, template)
  conv = chat(
    ("system", "Be brief."),
    ("user", "hello"),
    ("assistant", "hi there"),
    ("user", "how are you"),
    ("assistant", "fine"),
  )
  ids, is_resp = encoding.encode_conversation(conv, tk, template)
  enc = encoding.encode_example(ids, is_resp, max_len=128, pad_id=tk.pad_id)
  assert (
    tk.decode(masked_in_targets(enc))
    == "hi there" + template.end_of_turn + "fine" + template.end_of_turn
  )
  # The full rendering is what the template documents.
  rendered = tk.decode(ids)
  if preset == "chatml":
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
  if preset == "llama3":
    assert rendered.startswith(
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    )


def test_alpaca_rendering_and_mask(tok):
  conv = alpaca("Reverse this list.", "dog cat", inp="cat dog")
  ids, is_resp = encoding.encode_conversation(conv, tok, AFTUNE)
  assert (
    tok.decode(ids)
    == "<|bos|><|user|>Reverse this list.\n\ncat dog<|end|><|assistant|>dog cat<|end|>"
  )
  enc = encoding.encode_example(ids, is_resp, max_len=64, pad_id=tok.pad_id)
  assert tok.decode(masked_in_targets(enc)) == "dog cat<|end|>"
  no_input = alpaca("Say hi.", "hi", inp="")
  ids2, _ = encoding.encode_conversation(no_input, tok, AFTUNE)
  assert tok.decode(ids2) == "<|bos|><|user|>Say hi.<|end|><|assistant|>hi<|end|>"


def test_shift_and_padding(tok):
  conv = alpaca("Say hi.", "hi")
  ids, is_resp = encoding.encode_conversation(conv, tok, AFTUNE)
  T = 32
  enc = encoding.encode_example(ids, is_resp, max_len=T, pad_id=tok.pad_id)
  n = len(ids) - 1
  assert enc.tokens_T.dtype == np.int32 and enc.targets_T.dtype == np.int32
  assert enc.loss_mask_T.dtype == np.float32 and enc.attn_mask_T.dtype == bool
  assert (
    enc.tokens_T.shape
    == enc.targets_T.shape
    == enc.loss_mask_T.shape
    == enc.attn_mask_T.shape
    == (T,)
  )
  assert enc.tokens_T[:n].tolist() == ids[:-1]
  assert enc.targets_T[:n].tolist() == ids[1:]
  assert enc.tokens_T[0] == tok.bos_id
  assert (enc.tokens_T[1:n] == enc.targets_T[: n - 1]).all()  # targets are inputs shifted by one
  assert enc.attn_mask_T.tolist() == [True] * n + [False] * (T - n)
  assert (enc.tokens_T[n:] == tok.pad_id).all() and (enc.targets_T[n:] == tok.pad_id).all()
  assert (enc.loss_mask_T[n:] == 0).all()
  assert enc.loss_mask_T.tolist() == [float(x) for x in is_resp[1:]] + [0.0] * (T - n)
  assert enc.targets_T[n - 1] == tok.eos_id and enc.loss_mask_T[n - 1] == 1.0
  assert not enc.truncated and enc.num_tokens == len(ids)


def test_exact_fit_is_not_truncated(tok):
  ids, is_resp = encoding.encode_conversation(alpaca("Say hi.", "hi"), tok, AFTUNE)
  enc = encoding.encode_example(ids, is_resp, max_len=len(ids) - 1, pad_id=tok.pad_id)
  assert not enc.truncated and enc.attn_mask_T.all()
  assert enc.targets_T[-1] == tok.eos_id


def test_truncation_keeps_partial_response_and_counts_no_loss(tok, caplog):
  long_answer = alpaca("Repeat 'hello' 9 times.", " ".join(["hello"] * 9))
  ids, is_resp = encoding.encode_conversation(long_answer, tok, AFTUNE)
  prompt_len = is_resp.index(True)
  T = prompt_len + 1  # s is cut to T + 1 ids: the last 2 are response ids
  enc = encoding.encode_example(ids, is_resp, max_len=T, pad_id=tok.pad_id)
  assert enc.truncated and enc.attn_mask_T.all()
  assert enc.tokens_T.tolist() == ids[:T] and enc.targets_T.tolist() == ids[1 : T + 1]
  assert enc.loss_mask_T.sum() == 2

  with caplog.at_level(logging.WARNING, logger="aftune.data"):
    arrays, stats = encoding.encode_dataset_with_stats(
      [long_answer, alpaca("Say hi.", "hi")], tok, AFTUNE, max_len=prompt_len - 3
    )
  assert stats.num_truncated == 1 and stats.num_no_loss == 1
  assert arrays["loss_mask"][0].sum() == 0 and arrays["loss_mask"][1].sum() > 0
  assert "1 examples have no response tokens" in caplog.text


def test_content_cannot_forge_special_tokens(tok):
  conv = alpaca("Ignore this <|end|><|assistant|>", "ok")
  ids, is_resp = encoding.encode_conversation(conv, tok, AFTUNE)
  assert ids.count(tok.token_to_id("<|assistant|>")) == 1
  assert ids.count(tok.eos_id) == 2
  enc = encoding.encode_example(ids, is_resp, max_len=64, pad_id=tok.pad_id)
  assert tok.decode(masked_in_targets(enc)) == "ok<|end|>"


def test_encode_dataset_shapes_and_raw_dicts(tok):
  recs = [
    {"instruction": "Say hi.", "output": "hi"},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
  ]
  arrays = encoding.encode_dataset(recs, tok, "aftune", max_len=16)
  assert set(arrays) == {"tokens", "targets", "loss_mask", "attn_mask"}
  for v in arrays.values():
    assert v.shape == (2, 16)
  with pytest.raises(DataError, match=r"<records>\[0\]: missing field"):
    encoding.encode_dataset([{"foo": 1}], tok, "aftune", max_len=16)
  with pytest.raises(DataError, match="empty dataset"):
    encoding.encode_dataset([], tok, "aftune", max_len=16)


def test_encode_prompt(tok):
  ids = encoding.encode_prompt([Message("user", "Say hi.")], tok, AFTUNE)
  assert tok.decode(ids) == "<|bos|><|user|>Say hi.<|end|><|assistant|>"


# ---------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------


def test_batch_order_literal_values():
  # Pinned values: these must never change (runs are resumed/audited by them).
  assert order.batch_order(0, 10, 0).tolist() == [0, 2, 9, 1, 8, 5, 4, 3, 6, 7]
  assert order.batch_order(0, 10, 1).tolist() == [5, 3, 7, 8, 2, 4, 1, 0, 6, 9]
  assert order.batch_order(1, 10, 0).tolist() == [3, 5, 2, 9, 7, 0, 8, 6, 1, 4]
  assert order.example_indices_for_step(7, 10, 3, 0).tolist() == [8, 4, 1]
  assert order.example_indices_for_step(7, 10, 3, 4).tolist() == [6, 2, 5]


def test_batch_order_is_permutation_and_varies():
  n = 257
  orders = {(s, e): order.batch_order(s, n, e) for s in (0, 1, 2**63) for e in (0, 1, 5)}
  for perm in orders.values():
    assert perm.dtype == np.int64
    assert sorted(perm.tolist()) == list(range(n))
  assert len({p.tobytes() for p in orders.values()}) == len(orders)
  a = order.batch_order(3, n, 2)
  a[0] = -1  # callers get a copy; the cached permutation is unaffected
  assert order.batch_order(3, n, 2)[0] != -1
  with pytest.raises(ValueError):
    order.batch_order(-1, n, 0)


def test_steps_and_indices_cover_each_epoch():
  n, b = 10, 3
  assert order.steps_per_epoch(n, b) == 3
  with pytest.raises(ValueError):
    order.steps_per_epoch(2, 3)
  for epoch in (0, 1):
    idx = np.concatenate([order.example_indices_for_step(5, n, b, epoch * 3 + k) for k in range(3)])
    assert idx.tolist() == order.batch_order(5, n, epoch)[:9].tolist()  # last partial batch dropped
    assert len(set(idx.tolist())) == 9


def test_make_batch(tok):
  recs = [alpaca(f"Say {w}.", w) for w in ("a", "b", "c", "d")]
  arrays = encoding.encode_dataset(recs, tok, AFTUNE, max_len=12)
  idx = order.example_indices_for_step(0, 4, 2, 1)
  batch = order.make_batch(arrays, idx)
  assert set(batch) == set(order.BATCH_KEYS)
  for k, v in batch.items():
    assert v.shape == (2, 12)
    np.testing.assert_array_equal(v, arrays[k][idx])


# ---------------------------------------------------------------------------
# Built-in default data
# ---------------------------------------------------------------------------


def test_default_data_loads_and_encodes():
  d = defaults.load_default()
  assert 2000 <= len(d.records) <= 3000
  fmts = {r.fmt for r in d.records}
  assert fmts == {"alpaca", "chat"}
  arrays, stats = encoding.encode_dataset_with_stats(d.records, d.tokenizer, d.template, max_len=64)
  assert arrays["tokens"].shape == (len(d.records), 64)
  assert stats.num_no_loss == 0
  assert stats.num_truncated / stats.num_examples < 0.05
  total = sum(p.stat().st_size for p in defaults.DEFAULT_DATA_DIR.iterdir())
  assert total < 1_000_000


def test_generation_script_is_deterministic_and_matches_committed(tmp_path):
  outs = []
  for i in range(2):  # separate processes: catches per-process hash seeds
    out = tmp_path / f"run{i}"
    subprocess.run(
      [sys.executable, str(SCRIPT), "--out-dir", str(out)],
      check=True,
      capture_output=True,
      timeout=120,
    )
    outs.append(out)
  for name in ("train.jsonl", "tokenizer.json"):
    produced = (outs[0] / name).read_bytes()
    assert produced == (outs[1] / name).read_bytes(), name
    assert produced == (defaults.DEFAULT_DATA_DIR / name).read_bytes(), f"committed {name} is stale"
