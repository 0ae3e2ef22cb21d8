r"""Provider: serves prompts (or classifies images) from an audited fine-tuned model, with a
signed record.

  python -m experiments.infer --workdir workdirs/demo --prompts prompts.txt \
      --out workdirs/demo/served/batch_0 --serve configs/serve.py:greedy --serve.max_new_tokens=32
  python -m experiments.infer --workdir workdirs/vit --images photos/ --out workdirs/vit/served/b0

--images (image models): a directory of .png/.jpg files (sorted by name) or one file; they
are prepared as the job's preprocessing says and classified as one batch
(`aftune/infer/classify.py`); the predicted classes are committed per (layer block, batch).

--prompts: a text file (one user message per line) or JSONL of {"prompt": ...} or
{"messages": [...]}; the chat template is the job's. The served model must hash to the
final model of the job's signed commitment. The record (spec.json, leaves.bin,
tensors.safetensors.zst, commitment.json) is what the audit commands take (--record);
request.json and response.json beside it are what the client keeps (experiments.verify
--request, --response).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from aftune import errors
from aftune.infer import classify
from aftune.infer import serving
from aftune.model import family

_WORKDIR = flags.DEFINE_string("workdir", None, "The audited training run.", required=True)
_PROMPTS = flags.DEFINE_string("prompts", None, "Prompts file (txt or jsonl): language models.")
_IMAGES = flags.DEFINE_string("images", None, "Image file or directory: image models.")
_OUT = flags.DEFINE_string("out", None, "The record directory (must not exist).", required=True)
_SERVE = config_flags.DEFINE_config_file("serve", "configs/serve.py:greedy", "Serving run sheet.",
                                         lock_config=True)

def _classify(model) -> None:
  files = classify.image_files(_IMAGES.value)
  images = classify.load_images(files, model.model_cfg.image.preprocess)
  out = classify.serve_images(model, images, _OUT.value, record=_SERVE.value.record,
                              activation_interval=int(_SERVE.value.activation_interval),
                              key_path=f"{_WORKDIR.value}/provider_key.pem")
  for p in classify.describe(out["predictions"], files, model.class_names):
    print(f"{p.source}: {p.label} ({p.name})")
  if out["commitment"] is not None:
    print(f"record: {_OUT.value} (root {out['commitment']['merkle_root'][:16]}…)")


def main(argv):
  del argv
  with errors.exit_on_input_error():  # bad prompts file, model not matching its commitment, ...
    model = serving.load_from_training(_WORKDIR.value)
    image_model = family.of(model.model_cfg).MODALITY == "image"
    if (_IMAGES.value is None) == (_PROMPTS.value is None) or image_model != bool(_IMAGES.value):
      raise errors.ConfigError(f"{_WORKDIR.value} holds a {model.model_cfg.arch} model: give "
                               f"{'--images' if image_model else '--prompts'} (only)")
    if image_model:
      return _classify(model)
    prompts = serving.read_prompts(_PROMPTS.value, model.tokenizer, model.template)
    settings = serving.settings_from_sheet(_SERVE.value, model.tokenizer)
    out = serving.serve(model, prompts, settings, _OUT.value, record=_SERVE.value.record,
                        key_path=f"{_WORKDIR.value}/provider_key.pem")
  for toks in out["result"].tokens:
    print(repr(model.tokenizer.decode(toks)))
  if out["commitment"] is not None:
    print(f"record: {_OUT.value} (root {out['commitment']['merkle_root'][:16]}…)")


if __name__ == "__main__":
  app.run(main)
