r"""Provider: opens the challenged cells of a recorded run (or served batch) into bundles.

  python -m experiments.open --workdir W --challenge challenge.json --out bundles/
  python -m experiments.open --workdir W --record W/served/batch_0 --challenge ch.json --out b/
  python -m experiments.open --workdir W --receipt r.json --challenge ch.json --out b/   # a
      # request served by experiments.serve (its batch is found under W/serving)

With --record, the cells are (layer block, token step) cells of that served batch of
the model trained in W (a classified image batch has the one step 0).
"""

from pathlib import Path

from absl import app
from absl import flags

from aftune import errors
from aftune import jsonio
from aftune import provenance
from aftune.audit import challenge_doc
from aftune.audit import infer_provider
from aftune.audit import train_provider
from aftune.infer import serving
from aftune.train import mesh as mesh_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "The recorded run.", required=True)
_CHALLENGE = flags.DEFINE_string("challenge", None, "The client's challenge.json.", required=True)
_RECORD = flags.DEFINE_string("record", None, "A served batch's record dir (experiments.infer).")
_OUT = flags.DEFINE_string("out", "bundles", "Directory for the bundles.")
_RECEIPT = flags.DEFINE_string("receipt", None, "A served request's receipt (experiments.serve): "
                               "open the challenged cells of that request only.")
_SERVING_DIR = flags.DEFINE_string("serving_dir", None, "With --receipt: the server's batches "
                                   "(default W/serving).")


def _open_request() -> list[Path]:
  """The cells of one served request (its client's challenge), from the server's batches."""
  from aftune.audit import request_audit  # pylint: disable=g-import-not-at-top
  from aftune.audit import request_provider  # pylint: disable=g-import-not-at-top
  from aftune.infer import receipts  # pylint: disable=g-import-not-at-top
  from aftune.infer import request_record  # pylint: disable=g-import-not-at-top
  receipt, _ = receipts.load_receipt(_RECEIPT.value)
  ch = request_audit.load_challenge(_CHALLENGE.value)
  if ch.request_id != receipt["request_id"]:
    raise errors.InputError(f"{_CHALLENGE.value}: drawn for another request than {_RECEIPT.value}")
  serving_dir = Path(_SERVING_DIR.value or Path(_WORKDIR.value) / "serving")
  batch = request_record.load_batch(request_provider.find_batch(serving_dir, receipt["request_id"]))
  if ch.root != batch.commitment["merkle_root"]:
    raise errors.InputError(f"{_CHALLENGE.value}: drawn from another root than batch "
                            f"{batch.dir}")
  binding = train_provider.Provider(_WORKDIR.value).training_binding()
  provider = request_provider.RequestProvider(
      batch, serving.load_from_training(_WORKDIR.value), training_binding=binding)
  return provider.open_cells(receipt["request_id"], ch.cells, _OUT.value)


def main(argv):
  del argv
  if _RECEIPT.value:
    with errors.exit_on_input_error():
      paths = _open_request()
    print(f"opened {len(paths)} cells into {_OUT.value}")
    return
  with errors.exit_on_input_error():
    # Regeneration replays with the recorded intra-op pool (set before JAX starts).
    spec_path = (Path(_RECORD.value) / "spec.json" if _RECORD.value
                 else Path(_WORKDIR.value) / "trace" / "job_spec.json")
    job_spec = jsonio.load_json(spec_path, errors.InputError, "spec")
    threads = job_spec.get("environment", {}).get("intra_op_threads")
    mesh_lib.force_host_devices_for(job_spec)  # regeneration runs on the committed mesh
    if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0:
      provenance.set_intra_op_threads(threads)
    ch = challenge_doc.load_challenge(_CHALLENGE.value)
    if _RECORD.value:
      # Every opening carries what ties the served weights to the training's end state.
      binding = train_provider.Provider(_WORKDIR.value).training_binding()
      provider = infer_provider.provider_for_record(
          _RECORD.value, serving.load_from_training(_WORKDIR.value), training_binding=binding)
    else:
      provider = train_provider.Provider(_WORKDIR.value)
    if ch.job_id != provider.commitment["job_id"] or ch.root != provider.commitment["merkle_root"]:
      raise errors.InputError(f"{_CHALLENGE.value}: drawn for another job or root than "
                              f"{_RECORD.value or _WORKDIR.value}")
    paths = provider.open_challenge([tuple(c) for c in ch.cells], _OUT.value)
  print(f"opened {len(paths)} cells into {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
