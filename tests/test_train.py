"""The training loop: loss falls, workdir files, resume equals an uninterrupted run."""

import json

import jax
import numpy as np
import pytest

from aftune import errors
from aftune.train import job as job_lib
from aftune.train import trainer as train


def _leaves_bytes(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_run_writes_workdir_files_and_loss_falls(small_config, tmp_path):
  c = small_config(num_steps=24, **{"optim.learning_rate": 1e-2})
  result = train.train(c, tmp_path)
  assert result.step == 24 and len(result.losses) == 24
  assert np.mean(result.losses[-4:]) < np.mean(result.losses[:4]) - 0.5
  assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 4
  prov = json.loads((tmp_path / "provenance.json").read_text())
  assert prov["packages"]["jax"] == jax.__version__ and prov["cpu_threads"] >= 1
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24]
  assert rows[-1]["loss"] == pytest.approx(result.losses[-1])


@pytest.mark.parametrize("step_impl", ["blocked", "plain"])
def test_resume_equals_uninterrupted(small_config, tmp_path, step_impl):
  c = small_config(step_impl=step_impl, record=step_impl == "blocked")
  full = train.train(c, tmp_path / "full")
  first = train.train(c, tmp_path / "killed", stop_after_steps=6)  # last checkpoint: step 4
  assert first.step == 6
  resumed = train.train(c, tmp_path / "killed")
  assert resumed.step == 12 and len(resumed.losses) == 8  # steps 4..11 rerun
  assert _leaves_bytes(resumed.params) == _leaves_bytes(full.params)
  assert _leaves_bytes(resumed.opt_states) == _leaves_bytes(full.opt_states)
  assert resumed.losses == full.losses[4:]
  steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [4, 8, 12]


def test_workdir_of_another_config_is_refused(small_config, tmp_path):
  train.train(small_config(num_steps=2), tmp_path)
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(errors.ConfigError, match="another config"):
    train.train(small_config(num_steps=2, **{"optim.learning_rate": 0.5}), tmp_path)
  assert (tmp_path / "config.json").read_text() == before


def test_lora_run_keeps_base_frozen(small_config, tmp_path):
  c = small_config(num_steps=4, **{"lora.enabled": True})
  result = train.train(c, tmp_path)
  for blk in result.params:
    for path, _ in jax.tree_util.tree_flatten_with_path(blk)[0]:
      assert "lora_" in jax.tree_util.keystr(path)


@pytest.mark.parametrize("field,value,match", [
    ("model.dtype", "float16", "model.dtype"),
    ("optim.name", "lion", "unknown optimizer"),
    ("data.num_samples", 10**6, "num_samples"),
    ("step_impl", "fused", "step_impl"),
])
def test_bad_config_fails_with_a_clear_error(small_config, field, value, match):
  with pytest.raises(ValueError, match=match):
    job_lib.build_job(small_config(**{field: value}))
