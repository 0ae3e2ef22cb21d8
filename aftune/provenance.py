"""What a run ran on: package versions, backend, devices, XLA flags, threads, git SHA.

`environment_manifest()` is also the environment part of the job spec: the fields in
it are the ones that decide whether a replay can be bitwise (see docs/determinism.md).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-dtypes", "blake3",
             "ml-collections", "tokenizers", "safetensors")


def package_versions() -> dict[str, str]:
  out = {}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def cpu_info() -> dict[str, Any]:
  """CPU model and the vector extensions XLA may compile for (they can change the bits)."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return {"model": platform.processor() or "unknown", "isa": []}
  fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
  fields = {k.strip(): v.strip() for k, v in fields.items()}
  flags = set(fields.get("flags", "").split())
  isa = sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "sse4", "f16c", "bmi")))
  return {"model": fields.get("model name", "unknown"), "isa": isa}


@functools.lru_cache(maxsize=1)  # scanning every installed distribution takes ~40 ms
def accelerator_packages() -> dict[str, str]:
  """Versions of installed CUDA/ROCm/TPU plugin packages (jax-cuda*, nvidia-*, libtpu...)."""
  out = {}
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name.startswith(("jax-cuda", "jax_cuda", "jax-rocm", "nvidia-", "libtpu")):
      out[name] = dist.version
  return dict(sorted(out.items()))


def cpu_threads() -> int:
  """The CPU affinity XLA sees: it sets the intra-op thread count, which changes bits."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def environment_manifest() -> dict[str, Any]:
  """The settings a bitwise replay must reproduce (committed in the job spec)."""
  devices = jax.devices()
  return {
      "packages": package_versions(),
      "python": platform.python_version(),
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "process_count": jax.process_count(),
      "cpu_threads": cpu_threads(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "prng_impl": str(jax.config.jax_default_prng_impl),
      "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
      "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
      "machine": platform.machine(),
      "cpu": cpu_info(),
      "accelerator_packages": dict(accelerator_packages()),
  }


def git_sha(repo: Path | None = None) -> str:
  repo = repo or Path(__file__).resolve().parent.parent
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                         timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return sha + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def provenance() -> dict[str, Any]:
  """The run's provenance record (written to <workdir>/provenance.json)."""
  return {
      **environment_manifest(),
      "git_sha": git_sha(),
      "argv": sys.argv,
      "hostname": platform.node(),
      "devices": [str(d) for d in jax.devices()],
  }
