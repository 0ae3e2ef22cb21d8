"""Chat templates: the marker strings that wrap each conversation turn.

A template is plain data (strings only, no tokenizer), so it can be logged in
a run's config and compared exactly.  How a conversation is turned into token
ids and a loss mask lives in `aftune.data.encoding.encode_conversation`; the layout it
produces for one turn is

    <header(role)> <content> <end_of_turn> <turn_separator>

preceded once by `bos`.  Only the content and end_of_turn of *assistant* turns
are trained on; headers, separators, system and user turns are masked.

Presets:
  "aftune": the built-in default tokenizer (data/default/tokenizer.json)
      <|bos|><|user|>Hi<|end|><|assistant|>Hello<|end|>
  "llama3": Llama 3 / 3.1 / 3.2 instruct
      <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
  "chatml": Qwen2 / Qwen2.5 / Qwen3 (no bos token)
      <|im_start|>user\\nHi<|im_end|>\\n
"""

from __future__ import annotations

import dataclasses

ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Marker strings of a chat format.

  Attributes:
    name: Preset name (informational, goes into logs/configs).
    bos: Text prepended once to every sequence ("" for none).
    system_header: Text before a system turn's content.
    user_header: Text before a user turn's content.
    assistant_header: Text before an assistant turn's content.
    end_of_turn: Marker closing every turn. For assistant turns it is part
      of the trained response, so the model learns to stop.
    turn_separator: Text after end_of_turn (e.g. "\\n" in ChatML); masked.
  """

  name: str
  bos: str
  system_header: str
  user_header: str
  assistant_header: str
  end_of_turn: str
  turn_separator: str = ""

  def header(self, role: str) -> str:
    """Returns the header text of `role` (one of ROLES).

    Args:
      role: "system", "user" or "assistant".

    Returns:
      The header string.
    """
    if role == "system":
      return self.system_header
    if role == "user":
      return self.user_header
    if role == "assistant":
      return self.assistant_header
    raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")

  def special_markers(self) -> tuple[str, ...]:
    """Returns the markers that must be single tokens in the tokenizer.

    Returns:
      The non-empty bos and end_of_turn strings.
    """
    return tuple(s for s in (self.bos, self.end_of_turn) if s)


AFTUNE = ChatTemplate(
  name="aftune",
  bos="<|bos|>",
  system_header="<|system|>",
  user_header="<|user|>",
  assistant_header="<|assistant|>",
  end_of_turn="<|end|>",
)

LLAMA3 = ChatTemplate(
  name="llama3",
  bos="<|begin_of_text|>",
  system_header="<|start_header_id|>system<|end_header_id|>\n\n",
  user_header="<|start_header_id|>user<|end_header_id|>\n\n",
  assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
  end_of_turn="<|eot_id|>",
)

# Qwen's own template also injects a default system prompt when none is
# given; we do not, so a dataset's records are rendered exactly as written.
CHATML = ChatTemplate(
  name="chatml",
  bos="",
  system_header="<|im_start|>system\n",
  user_header="<|im_start|>user\n",
  assistant_header="<|im_start|>assistant\n",
  end_of_turn="<|im_end|>",
  turn_separator="\n",
)

PRESETS: dict[str, ChatTemplate] = {t.name: t for t in (AFTUNE, LLAMA3, CHATML)}

# Special tokens of the built-in tokenizer, in id order (<|pad|> is id 0).
AFTUNE_SPECIAL_TOKENS: tuple[str, ...] = (
  "<|pad|>",
  "<|bos|>",
  "<|end|>",
  "<|system|>",
  "<|user|>",
  "<|assistant|>",
)


def get_template(name_or_template: str | ChatTemplate) -> ChatTemplate:
  """Looks up a preset by name (templates pass through unchanged).

  Args:
    name_or_template: A preset name ("aftune", "llama3", "chatml") or a
      ChatTemplate.

  Returns:
    The ChatTemplate.

  Raises:
    ValueError: the name is not a preset.
  """
  if isinstance(name_or_template, ChatTemplate):
    return name_or_template
  try:
    return PRESETS[name_or_template]
  except KeyError:
    raise ValueError(
      f"unknown chat template {name_or_template!r}; presets are {sorted(PRESETS)}"
    ) from None
