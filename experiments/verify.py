r"""Verifier: checks the provider's bundles against the client's commitment and challenge.

  python -m experiments.verify --commitment commitment.json --challenge challenge.json \
      --bundles bundles/ --agreed agreed.json --out verdict.json                  # training
  python -m experiments.verify --commitment served/commitment.json --challenge ch.json \
      --bundles b/ --agreed agreed.json --training_commitment run/commitment.json \
      --request served/request.json --response served/response.json --out v.json  # inference
  python -m experiments.verify --receipt r.json --challenge ch.json --bundles b/ \
      --agreed agreed.json --training_commitment run/commitment.json --out v.json  # a request

A verdict is bound to what the client holds: the challenge it drew and the job it agreed
to (--agreed, or the client's own --config to compute it from; training); the promised
model, architecture, request and response (inference). A
verdict missing any of them is refused unless --allow_unbound, and then it names, in
JSON (`unchecked`) and Markdown, what it did not check.

Exit status: 0 every cell passed, 1 some cell failed, 2 the input could not be judged
(one line on stderr naming the file and the problem; nothing is written).
In exact mode the process sets XLA:CPU's intra-op pool to the recorded size before JAX
starts (PJRT_NPROC: the pool size, not the core count, decides the bits of CPU reductions;
a 1-core verifier replays a 2-core record bitwise, only slower: docs/determinism.md).
"""

import json
import os
import sys
from pathlib import Path

from absl import app
from absl import flags
from ml_collections import config_flags

from aftune import errors
from aftune.audit import bundle as bundle_lib  # no JAX import: threads are pinned first
from aftune.train import mesh as mesh_lib  # imports jax; the backend starts later
from aftune.train import multihost  # jax.distributed, before the backend starts

_COMMITMENT = flags.DEFINE_string("commitment", None, "The client's commitment.json.")
_RECEIPT = flags.DEFINE_string("receipt", None, "A served request's receipt (experiments.serve): "
                               "the client's evidence for auditing its own request.")
_FIRST_PASS = flags.DEFINE_bool("first_pass", False, "With --receipt: run the teacher-forced "
                                "tolerance pass before each exact replay.")
_CHALLENGE = flags.DEFINE_string("challenge", None, "The challenge the bundles answer.")
_BUNDLES = flags.DEFINE_string("bundles", None, "Directory of bundles.", required=True)
_AGREED = flags.DEFINE_string("agreed", None, "The agreed job-spec fields (experiments.agree).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The client's own run sheet: the agreed fields are computed from it, its "
    "data and base model (instead of --agreed).", lock_config=True)
_MODE = flags.DEFINE_enum("mode", "exact", ["exact", "tolerance"], "Bitwise or thresholds.")
_PUBLIC_KEY = flags.DEFINE_string("public_key", None, "Expected provider key (hex).")
_TOLERANCES = flags.DEFINE_string("tolerances", None, 'Tolerance mode thresholds as JSON, e.g. '
                                  '\'{"fwd_out": 1e-4}\' (others keep their defaults).')
_MODEL_HASH = flags.DEFINE_string("model_hash", None,
                                  "Inference: the promised model's hash (hex), when it does not "
                                  "come from an audited training (--training_commitment).")
_REQUEST = flags.DEFINE_string("request", None, "Inference: the client's request JSON "
                               '{"prompts": [[ids]...], "settings": {...}} to hold the spec to.')
_RESPONSE = flags.DEFINE_string("response", None, "Inference: the response the client received "
                                "(response.json); every token must be the committed one.")
_TRAINING_COMMITMENT = flags.DEFINE_string(
    "training_commitment", None, "Inference: the signed commitment of the training whose final "
    "model was promised; the served weights are checked against its trace's end state.")
_ALLOW_UNBOUND = flags.DEFINE_bool("allow_unbound", False, "Give a verdict without the inputs "
                                   "that bind it; the verdict names what it did not check.")
_OUT = flags.DEFINE_string("out", "verdict.json", "Verdict JSON; the report goes beside it (.md).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Verifier processes to spread the cells over "
                                "(parallel audits of a one-process job; the verdict is the same).",
                                lower_bound=1)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 when the verifier "
                                   "runs as several processes, as the job did (exact replays of a "
                                   "multi-process run); default $JAX_COORDINATOR_ADDRESS.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Verifier processes "
                                      "(default: $JAX_NUM_PROCESSES, else 1).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id (default: $JAX_PROCESS_ID).")


def _pin_threads(paths):
  """Sets XLA:CPU's intra-op pool to the recorded size before JAX starts: the pool size,
  not the core count, decides the bits, so a verifier with fewer cores replays exactly."""
  manifest = bundle_lib.read_manifest(paths[0])
  spec = manifest.get("job_spec") or manifest.get("spec")
  threads = spec.get("environment", {}).get("intra_op_threads")
  if isinstance(threads, int) and not isinstance(threads, bool) and 0 < threads <= 4096:
    os.environ["PJRT_NPROC"] = str(threads)  # = provenance.POOL_ENV (no JAX import yet)
  # A sharded job replays exactly on its mesh, over as many processes as it ran on.
  mesh_lib.force_host_devices_for(spec, multihost.process_count_from(_NUM_PROCESSES.value))


def _tolerances():
  if not _TOLERANCES.value:
    return None
  try:
    tol = json.loads(_TOLERANCES.value)
  except json.JSONDecodeError as e:
    raise errors.InputError(f"--tolerances: not valid JSON ({e})") from None
  if not isinstance(tol, dict) or not all(isinstance(v, (int, float)) for v in tol.values()):
    raise errors.InputError("--tolerances: a JSON object of kind -> number")
  return {k: float(v) for k, v in tol.items()}


def _agreed(audit):
  if _AGREED.value and _CONFIG.value is not None:
    raise errors.InputError("give --agreed or --config, not both")
  if _CONFIG.value is not None:
    from aftune.train import job as job_lib  # pylint: disable=g-import-not-at-top
    return audit.agreed_fields(job_lib.build_job(_CONFIG.value, placed=False))
  return audit.load_agreed(_AGREED.value) if _AGREED.value else None


def _verify():
  paths = sorted(Path(_BUNDLES.value).glob("*.bundle"))
  if not paths:
    raise errors.InputError(f"{_BUNDLES.value}: no *.bundle files")
  if _MODE.value == "exact":
    _pin_threads(paths)
  multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from aftune.audit import challenge_doc  # pylint: disable=g-import-not-at-top
  from aftune.audit import client as audit  # pylint: disable=g-import-not-at-top  (imports JAX)
  from aftune.record import commitment as commitment_lib  # pylint: disable=g-import-not-at-top
  commitment = audit.load_commitment(_COMMITMENT.value, _PUBLIC_KEY.value)
  inputs = {
      "challenge": challenge_doc.load_challenge(_CHALLENGE.value) if _CHALLENGE.value else None,
      "agreed": _agreed(audit),
      "expected_model_hash": _MODEL_HASH.value,
      "training_commitment": (audit.load_commitment(_TRAINING_COMMITMENT.value, _PUBLIC_KEY.value)
                              if _TRAINING_COMMITMENT.value else None),
      "request": audit.load_request(_REQUEST.value) if _REQUEST.value else None,
      "response": audit.load_response(_RESPONSE.value) if _RESPONSE.value else None,
  }
  if inputs["training_commitment"] is not None and commitment_lib.is_inference(
      inputs["training_commitment"]):
    raise errors.InputError(f"{_TRAINING_COMMITMENT.value}: not a training commitment")
  loose = audit.unchecked(inference=commitment_lib.is_inference(commitment), **inputs)
  if loose and not _ALLOW_UNBOUND.value:
    raise errors.InputError("this verdict would bind nothing about: " + "; ".join(
        u.split(":")[0] for u in loose) + ". Pass them, or --allow_unbound for a verdict that "
        "names what it did not check")
  return audit, audit.verify_openings(paths, commitment=commitment, mode=_MODE.value,
                                      tolerances=_tolerances(), workers=_WORKERS.value, **inputs)


def _verify_request() -> dict:
  paths = sorted(Path(_BUNDLES.value).glob("*.bundle"))
  if not paths:
    raise errors.InputError(f"{_BUNDLES.value}: no *.bundle files")
  if _MODE.value == "exact":
    _pin_threads(paths)
  from aftune.audit import client as audit  # pylint: disable=g-import-not-at-top  (imports JAX)
  from aftune.audit import request_audit  # pylint: disable=g-import-not-at-top
  agreed = _agreed(audit)
  inputs = {
      "challenge": request_audit.load_challenge(_CHALLENGE.value) if _CHALLENGE.value else None,
      "public_key": _PUBLIC_KEY.value,
      "training_commitment": (audit.load_commitment(_TRAINING_COMMITMENT.value, _PUBLIC_KEY.value)
                              if _TRAINING_COMMITMENT.value else None),
      "model_config": agreed["hyperparameters"]["model"] if agreed else None,
  }
  loose = request_audit.unchecked(**{k: v for k, v in inputs.items()})
  if inputs["public_key"] is None and inputs["training_commitment"] is not None:
    loose = loose[1:]  # the key is pinned to the training commitment's
  if loose and not _ALLOW_UNBOUND.value:
    raise errors.InputError("this verdict would bind nothing about: " + "; ".join(
        u.split(":")[0] for u in loose) + ". Pass them, or --allow_unbound for a verdict that "
        "names what it did not check")
  return request_audit.verify_request(paths, receipt_path=_RECEIPT.value, mode=_MODE.value,
                                      tolerances=_tolerances(), first_pass=_FIRST_PASS.value,
                                      **inputs)


def main(argv):
  del argv
  if _RECEIPT.value:
    with errors.exit_on_input_error():
      if _COMMITMENT.value:
        raise errors.InputError("give --receipt (a served request) or --commitment, not both")
      verdict = _verify_request()
    from aftune.audit import request_audit  # pylint: disable=g-import-not-at-top
    md = request_audit.write_verdict(verdict, _OUT.value)
    print(request_audit.render_markdown(verdict))
    print(f"verdict: {_OUT.value}, report: {md}")
    sys.exit(0 if verdict["passed"] else 1)
  with errors.exit_on_input_error():
    if not _COMMITMENT.value:
      raise errors.InputError("--commitment (or --receipt) is required")
    audit, verdict = _verify()
  if not multihost.is_primary():  # every process replayed the same cells; one writes
    sys.exit(0 if verdict["passed"] else 1)
  md = Path(_OUT.value).with_suffix(".md")
  audit.write_verdict(verdict, _OUT.value, md)
  print(audit.render_markdown(verdict))
  print(f"verdict: {_OUT.value}, report: {md}")
  sys.exit(0 if verdict["passed"] else 1)


if __name__ == "__main__":
  app.run(main)
