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

from aftune import errors
from aftune import platform_flags

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


POOL_ENV = "PJRT_NPROC"


def cpu_threads() -> int:
  """The CPUs this process may run on (its affinity)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _positive_int(text: str | None) -> int | None:
  try:
    n = int(text) if text else 0
  except ValueError:
    return None
  return n if n > 0 else None


def intra_op_threads() -> int:
  """The size of XLA:CPU's intra-op thread pool, which decides the bits of CPU reductions.

  XLA sizes it from PJRT_NPROC, else NPROC, else the visible cores (`xla/pjrt/utils.cc`,
  DefaultThreadPoolSize). The pool size, not the hardware, decides the summation order:
  a 1-core verifier with PJRT_NPROC=2 replays a 2-core record bitwise, only slower
  (docs/determinism.md).
  """
  return (_positive_int(os.environ.get(POOL_ENV)) or _positive_int(os.environ.get("NPROC"))
          or cpu_threads())


def set_intra_op_threads(n: int) -> None:
  """Fixes this process's intra-op pool size; must run before JAX starts its CPU backend.

  Raises:
    errors.ConfigError: n < 1, or the backend already runs with another pool size.
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise errors.ConfigError(f"intra-op thread pool size must be a positive int, got {n!r}")
  if xla_bridge.backends_are_initialized() and intra_op_threads() != n:
    raise errors.ConfigError(f"JAX already runs with an intra-op pool of {intra_op_threads()}; "
                             f"{POOL_ENV}={n} must be set before JAX starts")
  os.environ[POOL_ENV] = str(n)


def gpu_versions() -> dict[str, Any]:
  """On a GPU backend: the device's compute capability and the CUDA driver, runtime, cuDNN
  and cuBLAS versions the plugin reports (each decides kernels, so bits); {} elsewhere."""
  if jax.default_backend() != "gpu":
    return {}
  from jax._src import lib as jax_lib  # pylint: disable=g-import-not-at-top

  out: dict[str, Any] = {"compute_capability": str(getattr(jax.devices()[0],
                                                           "compute_capability", ""))}
  versions = getattr(jax_lib, "cuda_versions", None)
  for name in ("cuda_driver_get_version", "cuda_runtime_get_version", "cudnn_get_version",
               "cublas_get_version", "cufft_get_version", "cusolver_get_version"):
    fn = getattr(versions, name, None)
    try:
      out[name.replace("_get_version", "")] = fn() if fn is not None else None
    except Exception:  # noqa: BLE001 - a plugin without that library: recorded as unknown
      out[name.replace("_get_version", "")] = None
  return out


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
      "intra_op_threads": intra_op_threads(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "autotune_results": platform_flags.autotune_results(),
      "gpu": gpu_versions(),
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
      "cpu_threads": cpu_threads(),
      "devices": [str(d) for d in jax.devices()],
  }
