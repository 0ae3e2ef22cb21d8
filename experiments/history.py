r"""The periodic signed roots: the provider proves, the client checks, that the final
trace only appended to every root signed during training.

  python -m experiments.history prove --workdir W --out history.json          # provider
  python -m experiments.history check --commitment commitment.json \
      --history history.json [--received roots/]                             # client

Exit status of `check`: 0 consistent, 1 history rewritten, 2 unreadable input.
"""

import json
import sys
from pathlib import Path

from absl import app
from absl import flags

from aftune.audit import client as audit
from aftune.record import history as history_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "prove: the recorded run.")
_OUT = flags.DEFINE_string("out", "history.json", "prove: where to write the proofs.")
_COMMITMENT = flags.DEFINE_string("commitment", None, "check: the final signed commitment.")
_HISTORY = flags.DEFINE_string("history", None, "check: the provider's history.json.")
_RECEIVED = flags.DEFINE_string("received", None, "check: directory of the signed roots the "
                                "client received during training (*.json).")


def main(argv):
  if len(argv) != 2 or argv[1] not in ("prove", "check"):
    raise app.UsageError("usage: history prove|check [flags]")
  try:
    if argv[1] == "prove":
      doc = history_lib.prove_history(_WORKDIR.value)
      Path(_OUT.value).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
      print(f"{len(doc['roots'])} signed roots proven consistent with the final root -> {_OUT.value}")
      return
    commitment = audit.load_commitment(_COMMITMENT.value)
    history = audit.load_json(_HISTORY.value)
    received = ([audit.load_json(p) for p in sorted(Path(_RECEIVED.value).glob("*.json"))]
                if _RECEIVED.value else None)
    problems = history_lib.verify_history(history, commitment, received)
  except (ValueError, OSError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for p in problems:
    print(f"FAIL: {p}")
  if not problems:
    print(f"OK: {len(history['roots'])} signed roots, each a prefix of the final trace")
  sys.exit(1 if problems else 0)


if __name__ == "__main__":
  app.run(main)
