"""The GPU determinism settings: composed flags, the committed autotuning file, the
dispute aid's first divergence, and GPU versions in the manifest (empty on CPU)."""

import pytest

from aftune import errors
from aftune import platform_flags as pf
from aftune import provenance
from aftune.train import trainer


def test_gpu_flags_compose_each_mode(tmp_path):
  assert pf.gpu_flags() == ["--xla_gpu_deterministic_ops=true"]
  assert pf.gpu_flags(deterministic=False, autotune="off") == ["--xla_gpu_autotune_level=0"]
  assert pf.gpu_flags(autotune=f"load:{tmp_path}/a.pb")[-1] == (
      f"--xla_gpu_load_autotune_results_from={tmp_path}/a.pb")
  assert pf.gpu_flags(autotune="dump:/x.pb")[-1] == "--xla_gpu_dump_autotune_results_to=/x.pb"
  dispute = pf.gpu_flags(dispute_dump_dir="/d")
  assert "--xla_gpu_experimental_enable_checksum_tracing_on_thunks=true" in dispute
  assert "--xla_dump_to=/d" in dispute
  for bad in ("fast", "load:", "off:x"):
    with pytest.raises(errors.ConfigError, match="autotune"):
      pf.gpu_flags(autotune=bad)


def test_the_loaded_autotuning_file_is_committed_by_hash(tmp_path, monkeypatch):
  path = tmp_path / "autotune.textproto"
  path.write_bytes(b"results { device: 'sm_90' }")
  flags = f"--xla_gpu_deterministic_ops=true --xla_gpu_load_autotune_results_from={path}"
  first = pf.autotune_results(flags)
  assert first["path"] == str(path) and len(first["hash"]) == 64
  path.write_bytes(b"results { device: 'sm_80' }")
  assert pf.autotune_results(flags)["hash"] != first["hash"]  # other choices: another hash
  assert pf.autotune_results("--xla_gpu_deterministic_ops=true") is None
  with pytest.raises(errors.InputError, match="cannot be read"):
    pf.autotune_results(f"--xla_gpu_load_autotune_results_from={tmp_path}/missing")
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert provenance.environment_manifest()["autotune_results"]["hash"] == pf.autotune_results()["hash"]


def test_flags_cannot_be_added_once_jax_runs(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
  assert pf.apply(["--xla_gpu_deterministic_ops=true"]) == "--xla_gpu_deterministic_ops=true"
  with pytest.raises(errors.ConfigError, match="before JAX starts"):
    pf.apply(["--xla_gpu_autotune_level=0"])
  from configs import finetune  # pylint: disable=g-import-not-at-top
  sheet = finetune.get_config("smoke")
  trainer.apply_platform(sheet)  # the CPU default: nothing to apply
  sheet.platform.gpu_autotune = "off"
  with pytest.raises(errors.ConfigError):
    trainer.apply_platform(sheet)


def test_the_first_divergent_thunk_is_named():
  record = {"fusion.1": "aa", "gemm.2": "bb", "reduce.3": "cc"}
  assert pf.first_divergence(record, dict(record)) is None
  assert pf.first_divergence(record, {"fusion.1": "aa", "gemm.2": "bX", "reduce.3": "cY"}) == "gemm.2"
  assert pf.first_divergence(record, {"fusion.1": "aa", "gemm.2": "bb"}) == "reduce.3"
  assert pf.first_divergence(record, {**record, "extra.4": "dd"}) == "extra.4"


def test_gpu_versions_are_empty_on_cpu():
  assert provenance.gpu_versions() == {} and provenance.environment_manifest()["gpu"] == {}
