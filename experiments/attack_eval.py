r"""The attack suite, measured: each attack trained once, every cell verified, many challenges.

  python -m experiments.attack_eval --config configs/attacks.py:small --out /tmp/attacks

Writes to --out (resuming: finished runs and their cell verdicts are reused):
  detection.csv / .json  attack, strength, B_S, B_L, strategy, rate, m, tampered cells k
                         (the attack's footprint), cells the verifier flagged, N, draws,
                         measured detection with a 95% Wilson interval, the prediction and
                         how it is computed, misses (draws that sampled a tampered cell and
                         passed: 0 in exact mode)
  cells.csv              every attack's verdict per cell (check, step, reason)
  economics.csv          compute saved vs P(caught) per sampling rate (suite.economics)
  success.csv            attack success beside detection (aftune/attacks/edits.py): the
                         smallest weight backdoor, rank-one edit and activation perturbation
                         that flip a yes/no answer of the honest final model, their sizes in
                         the verifier's metric, the tolerance threshold of that tensor kind,
                         whether they fit under it, and the honest replay noise
  summary.md             the tables, readable
  runs/<attack>/         each dishonest provider's workdir
The library does the work (`aftune/bench/attack_eval.py` runs `aftune/attacks/suite.py`).
"""

from pathlib import Path

from absl import app
from absl import flags
from ml_collections import config_flags

from aftune import errors
from aftune.bench import attack_eval

_CONFIG = config_flags.DEFINE_config_file("config", "configs/attacks.py:small", "Attack sheet.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Results directory.", required=True)


def main(argv):
  del argv
  out = Path(_OUT.value)
  with errors.exit_on_input_error():
    attack_eval.run(_CONFIG.value, out)
  print((out / "summary.md").read_text())


if __name__ == "__main__":
  app.run(main)
