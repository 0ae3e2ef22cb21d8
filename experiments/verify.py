r"""Verifier: checks the provider's bundles against the client's commitment and challenge.

  python -m experiments.verify --commitment commitment.json --challenge challenge.json \
      --bundles bundles/ --agreed agreed.json --out verdict.json

Exit status: 0 every cell passed, 1 some cell failed, 2 the input could not be judged.
In exact mode the process pins itself to the recorded CPU thread count before JAX starts
(the thread count changes the bits of CPU matmuls: docs/determinism.md).
"""

import json
import os
import sys
from pathlib import Path

from absl import app
from absl import flags

from aftune.audit import bundle as bundle_lib  # no JAX import: threads are pinned first

_COMMITMENT = flags.DEFINE_string("commitment", None, "The client's commitment.json.", required=True)
_CHALLENGE = flags.DEFINE_string("challenge", None, "The challenge the bundles answer.")
_BUNDLES = flags.DEFINE_string("bundles", None, "Directory of bundles.", required=True)
_AGREED = flags.DEFINE_string("agreed", None, "The agreed job-spec fields (experiments.agree).")
_MODE = flags.DEFINE_enum("mode", "exact", ["exact", "tolerance"], "Bitwise or thresholds.")
_PUBLIC_KEY = flags.DEFINE_string("public_key", None, "Expected provider key (hex).")
_TOLERANCES = flags.DEFINE_string("tolerances", None, 'Tolerance mode thresholds as JSON, e.g. '
                                  '\'{"fwd_out": 1e-4}\' (others keep their defaults).')
_MODEL_HASH = flags.DEFINE_string("model_hash", None,
                                  "Inference: the promised model's hash (hex), e.g. the final "
                                  "model hash of the audited training job.")
_REQUEST = flags.DEFINE_string("request", None, "Inference: the client's request JSON "
                               '{"prompts": [[ids]...], "settings": {...}} to hold the spec to.')
_TRAINING_COMMITMENT = flags.DEFINE_string(
    "training_commitment", None, "Inference: take the promised model from this signed training "
    "commitment (its final_model_hash).")
_OUT = flags.DEFINE_string("out", "verdict.json", "Verdict JSON; the report goes beside it (.md).")


def _pin_threads(paths):
  manifest = bundle_lib.read_bundle(paths[0]).manifest
  spec = manifest.get("job_spec") or manifest.get("spec")
  threads = spec.get("environment", {}).get("cpu_threads")
  cpus = sorted(os.sched_getaffinity(0))
  if threads and threads <= len(cpus):
    os.sched_setaffinity(0, cpus[:threads])


def _tolerances():
  if not _TOLERANCES.value:
    return None
  try:
    tol = json.loads(_TOLERANCES.value)
  except json.JSONDecodeError as e:
    raise ValueError(f"--tolerances: not valid JSON ({e})") from None
  if not isinstance(tol, dict) or not all(isinstance(v, (int, float)) for v in tol.values()):
    raise ValueError("--tolerances: a JSON object of kind -> number")
  return {k: float(v) for k, v in tol.items()}


def main(argv):
  del argv
  try:
    paths = sorted(Path(_BUNDLES.value).glob("*.bundle"))
    if not paths:
      raise ValueError(f"{_BUNDLES.value}: no *.bundle files")
    if _MODE.value == "exact":
      _pin_threads(paths)
    from aftune.audit import challenge_doc  # pylint: disable=g-import-not-at-top
    from aftune.audit import client as audit  # pylint: disable=g-import-not-at-top  (imports JAX)
    commitment = audit.load_commitment(_COMMITMENT.value, _PUBLIC_KEY.value)
    ch = challenge_doc.load_challenge(_CHALLENGE.value) if _CHALLENGE.value else None
    agreed = audit.load_agreed(_AGREED.value) if _AGREED.value else None
    model_hash = _MODEL_HASH.value
    if _TRAINING_COMMITMENT.value:
      model_hash = audit.load_commitment(_TRAINING_COMMITMENT.value, _PUBLIC_KEY.value)["final_model_hash"]
    request = audit.load_json(_REQUEST.value) if _REQUEST.value else None
    verdict = audit.verify_openings(paths, commitment=commitment, challenge=ch, agreed=agreed,
                                    mode=_MODE.value, expected_model_hash=model_hash,
                                    request=request, tolerances=_tolerances())
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  md = Path(_OUT.value).with_suffix(".md")
  audit.write_verdict(verdict, _OUT.value, md)
  print(audit.render_markdown(verdict))
  print(f"verdict: {_OUT.value}, report: {md}")
  sys.exit(0 if verdict["passed"] else 1)


if __name__ == "__main__":
  app.run(main)
