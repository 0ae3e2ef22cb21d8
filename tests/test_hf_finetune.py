"""A LoRA fine-tune of an imported Hugging Face checkpoint, recorded and audited end to end."""

import json
import shutil

import pytest

from aftune.audit import client as audit
from aftune.audit import train_provider
from aftune.audit import train_verifier
from aftune.data import defaults
from aftune.train import job as job_lib
from aftune.train import trainer as train


@pytest.mark.parametrize("arch,tied", [("qwen3", True), ("llama", False)])
def test_lora_finetune_of_an_hf_checkpoint_is_audited(tiny_hf, small_config, tmp_path, arch,
                                                      tied):
  cfg = tiny_hf.tiny_config(arch, tied=tied)
  cfg["vocab_size"] = 1024  # the built-in tokenizer's
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  (model_dir / "config.json").write_text(json.dumps(cfg))
  tiny_hf.write_tensors(model_dir, tiny_hf.tiny_tensors(cfg, seed=1))
  shutil.copy(defaults.DEFAULT_TOKENIZER_PATH, model_dir / "tokenizer.json")
  c = small_config(num_steps=4, **{"model.hf_path": str(model_dir), "data.tokenizer_path": "",
                                   "lora.enabled": True, "lora.rank": 4,
                                   "audit.steps_per_block": 2, "audit.checkpoint_interval": 1})
  job = job_lib.build_job(c)
  assert job.model_cfg.arch == arch and job.model_cfg.tie_embeddings == tied
  agreed = audit.agreed_fields(job)
  workdir = tmp_path / "run"
  train.train(c, workdir, job=job)
  provider = train_provider.Provider(workdir)
  commitment = provider.commitment
  g = provider.grid
  for k in range(g.num_layer_blocks):
    for s in range(g.num_step_blocks):
      rep = train_verifier.verify_bundle(provider.open_cell(k, s), commitment=commitment, agreed=agreed)
      assert rep.passed, (k, s, rep.check, rep.reason)
  # The frozen base weights are checked against the agreed base model.
  b = provider.open_cell(1, 0)
  name = next(n for n in b.tensors if n.startswith("frozen/") and n.endswith("kernel"))
  b.tensors[name] = b.tensors[name] * 1.01
  rep = train_verifier.verify_bundle(b, commitment=commitment, agreed=agreed)
  assert (rep.passed, rep.check) == (False, "base_model")
