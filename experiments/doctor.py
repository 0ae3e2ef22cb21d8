r"""The platform doctor: what replays bitwise on this machine, and the settings to use.

  python -m experiments.doctor                                     # tiny sheet, 3 steps
  python -m experiments.doctor --config configs/finetune.py:smoke --config.num_steps=2 \
      --pools 1,2,4 --repeats 20 --out doctor.json

Prints a table (same steps twice here, one compiled function called many times, a fresh
process, other intra-op pool sizes, one core, the committed test vector) and the settings
to use. --record_vector adds this machine's digest to aftune/doctor_vectors.json.
Exit status: 0 bitwise where it must be; 1 not (see the table); 2 bad input.
"""

import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from aftune import errors

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py:tiny", "The probe's "
                                          "run sheet (its first num_steps steps).",
                                          lock_config=False)
_POOLS = flags.DEFINE_list("pools", ["1", "2", "4"], "Intra-op pool sizes to try in fresh "
                           "processes.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Calls of one compiled block function.")
_OUT = flags.DEFINE_string("out", None, "Also write the rows as JSON here.")
_CHILD = flags.DEFINE_bool("child", False, "Internal: print the probe's digest and exit.")
_RECORD_VECTOR = flags.DEFINE_bool("record_vector", False, "Add this machine's digest to the "
                                   "committed test vectors.")


def _sheet_argv(argv_all):
  """The --config flags of this command line (as --flag=value), passed on to the children."""
  out, args = [], list(argv_all[1:])
  for i, a in enumerate(args):
    if a.startswith("--config"):
      takes_value = "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--")
      out.append(f"{a}={args[i + 1]}" if takes_value else a)
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  if "num_steps" in config and not any(a.startswith("--config.num_steps") for a in sys.argv):
    config.num_steps = 3
  config.record = False
  from aftune import doctor  # pylint: disable=g-import-not-at-top  (JAX starts here)
  if _CHILD.value:
    print(doctor.probe(config))
    return
  with errors.exit_on_input_error():
    try:
      pools = sorted({int(p) for p in _POOLS.value})
    except ValueError:
      raise errors.InputError(f"--pools: comma-separated ints, got {_POOLS.value}") from None
    argv_sheet = _sheet_argv(sys.argv)
    if not any(a.startswith("--config.num_steps") for a in argv_sheet):
      argv_sheet.append(f"--config.num_steps={config.num_steps}")
    rows = doctor.diagnose(config, argv_sheet, pools=pools, repeats=_REPEATS.value)
  notes = doctor.advice(rows)
  print(doctor.render(rows, notes))
  if _OUT.value:
    from aftune import jsonio  # pylint: disable=g-import-not-at-top
    jsonio.write_json(_OUT.value, {"rows": [r.__dict__ for r in rows], "advice": notes,
                                   "healthy": doctor.healthy(rows),
                                   "platform": json.loads(doctor.platform_key(config))})
  if _RECORD_VECTOR.value:
    vectors = json.loads(doctor.VECTORS.read_text()) if doctor.VECTORS.exists() else {}
    vectors[doctor.platform_key(config)] = rows[0].digest
    doctor.VECTORS.write_text(json.dumps(vectors, indent=1, sort_keys=True) + "\n")
    print(f"recorded the test vector for this platform in {doctor.VECTORS}")
  sys.exit(0 if doctor.healthy(rows) else 1)


if __name__ == "__main__":
  app.run(main)
