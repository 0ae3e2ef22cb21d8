r"""Provider: opens the challenged cells of a recorded run (or served batch) into bundles.

  python -m experiments.open --workdir W --challenge challenge.json --out bundles/
  python -m experiments.open --workdir W --record W/served/batch_0 --challenge ch.json --out b/

With --record, the cells are (layer block, token step) cells of that served batch of
the model trained in W.
"""

import sys

from absl import app
from absl import flags

from aftune.audit import challenge_doc
from aftune.audit import infer_provider
from aftune.audit import train_provider
from aftune.infer import serving

_WORKDIR = flags.DEFINE_string("workdir", None, "The recorded run.", required=True)
_CHALLENGE = flags.DEFINE_string("challenge", None, "The client's challenge.json.", required=True)
_RECORD = flags.DEFINE_string("record", None, "A served batch's record dir (experiments.infer).")
_OUT = flags.DEFINE_string("out", "bundles", "Directory for the bundles.")


def main(argv):
  del argv
  try:
    ch = challenge_doc.load_challenge(_CHALLENGE.value)
    if _RECORD.value:
      provider = infer_provider.InferenceProvider(
          _RECORD.value, serving.load_from_training(_WORKDIR.value))
    else:
      provider = train_provider.Provider(_WORKDIR.value)
    if ch.job_id != provider.commitment["job_id"] or ch.root != provider.commitment["merkle_root"]:
      raise ValueError(f"{_CHALLENGE.value}: drawn for another job or root than "
                       f"{_RECORD.value or _WORKDIR.value}")
    paths = provider.open_challenge([tuple(c) for c in ch.cells], _OUT.value)
  except (ValueError, OSError) as e:  # errors.InputError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"opened {len(paths)} cells into {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
