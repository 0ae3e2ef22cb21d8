r"""Provider: serves the audited final model of a training run over HTTP, with receipts.

  python -m experiments.serve --workdir W --port 8000
  python -m experiments.serve --workdir W --port 8000 --serve.server.record=false   # baseline

OpenAI-shaped routes (`aftune/infer/http_api.py`): POST /v1/completions and
/v1/chat/completions (every response carries its receipt under "aftune"), GET
/v1/receipts/<request_id>, POST /v1/audit/open, GET /v1/provider, /v1/models, /healthz.
Concurrent requests are batched (`aftune/infer/engine.py`); every recorded batch is
written whole under --serving_dir (default W/serving/batches/<id>/) before its responses
go out, and batch ids continue after a restart. The client's side is
`experiments.serve_client` (send, audit, load).
"""

import json
from pathlib import Path

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from aftune import errors
from aftune import provenance
from aftune.audit import train_provider
from aftune.infer import engine as engine_lib
from aftune.infer import http_api
from aftune.infer import serving

_WORKDIR = flags.DEFINE_string("workdir", None, "The audited training run.", required=True)
_SERVING_DIR = flags.DEFINE_string("serving_dir", None, "Where batches go (default W/serving).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port.")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile every row bucket before listening.")
_SERVE = config_flags.DEFINE_config_file("serve", "configs/serve.py:greedy", "Serving run sheet "
                                         "(its `server` part).", lock_config=True)


def main(argv):
  del argv
  import uvicorn  # pylint: disable=g-import-not-at-top
  with errors.exit_on_input_error():  # a model not matching its commitment, a bad sheet
    workdir = Path(_WORKDIR.value)
    threads = provenance.environment_manifest().get("intra_op_threads")
    logging.info("intra-op threads: %s", threads)
    model = serving.load_from_training(workdir)
    settings = engine_lib.settings_from_sheet(_SERVE.value.server)
    serving_dir = Path(_SERVING_DIR.value or workdir / "serving")
    engine = engine_lib.Engine(model, serving_dir, settings, key_path=workdir / "provider_key.pem")
    commitment = json.loads((workdir / "commitment.json").read_text())
    binding = train_provider.Provider(workdir).training_binding()
    api = http_api.Api(engine, model_name=f"aftune-{model.model_hash[:12]}",
                       training_commitment=commitment, training_binding=binding)
  if _WARMUP.value:
    print(f"compiling {settings.max_batch.bit_length()} row buckets ...", flush=True)
    print(f"warm in {engine.warmup():.1f}s", flush=True)
  print(f"serving {model.model_hash[:16]}… on http://{_HOST.value}:{_PORT.value} "
        f"(batches in {serving_dir / 'batches'}, next id {engine.next_batch_id}, "
        f"recording {'on' if settings.record else 'OFF'})", flush=True)
  uvicorn.run(http_api.make_app(api), host=_HOST.value, port=_PORT.value, log_level="warning")


if __name__ == "__main__":
  app.run(main)
