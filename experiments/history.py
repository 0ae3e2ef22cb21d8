r"""The periodic signed roots: the provider proves, the client checks, that the final
trace only appended to every root signed during training.

  python -m experiments.history prove --workdir W --out history.json          # provider
  python -m experiments.history check --commitment commitment.json \
      --history history.json --received roots/                               # client

The client's check needs the roots it received during training (--received): without
them it only shows that the final trace extends the roots the provider chose to show,
so it is refused unless --none_received, and then the result says so.

Exit status of `check`: 0 consistent, 1 history rewritten, 2 unreadable input.
"""

import sys
from pathlib import Path

from absl import app
from absl import flags

from aftune import errors
from aftune import jsonio
from aftune.audit import client as audit
from aftune.record import history as history_lib
from aftune.record import schemas

_WORKDIR = flags.DEFINE_string("workdir", None, "prove: the recorded run.")
_OUT = flags.DEFINE_string("out", "history.json", "prove: where to write the proofs.")
_COMMITMENT = flags.DEFINE_string("commitment", None, "check: the final signed commitment.")
_HISTORY = flags.DEFINE_string("history", None, "check: the provider's history.json.")
_RECEIVED = flags.DEFINE_string("received", None, "check: directory of the signed roots the "
                                "client received during training (*.json).")
_NONE_RECEIVED = flags.DEFINE_bool("none_received", False, "check: the client received no roots "
                                   "during training (the result says what that leaves open).")


def _received():
  if _RECEIVED.value and _NONE_RECEIVED.value:
    raise errors.InputError("--received and --none_received contradict each other")
  if _RECEIVED.value:
    paths = sorted(Path(_RECEIVED.value).glob("*.json"))
    if not paths:
      raise errors.InputError(f"{_RECEIVED.value}: no received roots (*.json)")
    return [schemas.check(audit.load_json(p), schemas.ROOT, p) for p in paths]
  if not _NONE_RECEIVED.value:
    raise errors.InputError("check needs the roots the client received (--received DIR), or "
                            "--none_received to check without them")
  return None


def main(argv):
  if len(argv) != 2 or argv[1] not in ("prove", "check"):
    raise app.UsageError("usage: history prove|check [flags]")
  with errors.exit_on_input_error():
    if argv[1] == "prove":
      doc = history_lib.prove_history(_WORKDIR.value)
      jsonio.write_json(_OUT.value, doc)
      print(f"{len(doc['roots'])} signed roots proven consistent with the final root -> {_OUT.value}")
      return
    commitment = audit.load_commitment(_COMMITMENT.value)
    if commitment["format"] != "aftune-commitment/v1":
      raise errors.InputError(f"{_COMMITMENT.value}: not a training commitment")
    history = schemas.check(audit.load_json(_HISTORY.value), schemas.HISTORY, _HISTORY.value)
    received = _received()
    problems = history_lib.verify_history(history, commitment, received)
  for p in problems:
    print(f"FAIL: {p}")
  if not problems:
    print(f"OK: {len(history['roots'])} signed roots, each a prefix of the final trace")
    if received is None:
      print("NOTE: no received roots were given: this shows only that the final trace extends "
            "the roots the provider chose to show, not that they are the ones it sent")
    else:
      print(f"OK: all {len(received)} roots the client received are among them, unchanged")
  sys.exit(1 if problems else 0)


if __name__ == "__main__":
  app.run(main)
