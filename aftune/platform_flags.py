"""XLA settings that decide whether a GPU replay can be bitwise, composed from the run sheet.

Everything here is a flag XLA reads from `XLA_FLAGS` when JAX starts its backend (the
names are those of the pinned jaxlib), so an entry point applies it before the first JAX
computation; the environment manifest then commits `xla_flags` (and the hash of a
persisted autotuning file), and a verifier must run with the same:

  deterministic ops   --xla_gpu_deterministic_ops=true: no atomics in scatter-adds (the
                      embedding gradient) and reductions, and autotuning restricted to
                      deterministic kernels (it implies --xla_gpu_exclude_nondeterministic_ops)
  autotuning          "default": XLA times candidate kernels on the device at compile time,
                      so two compilations may pick different kernels (different bits);
                      "off": --xla_gpu_autotune_level=0 (fixed heuristics);
                      "dump:PATH": the recording run writes its choices
                      (--xla_gpu_dump_autotune_results_to); "load:PATH": a replay uses them
                      (--xla_gpu_load_autotune_results_from), and the file's hash is committed
  dispute aid         --xla_gpu_experimental_enable_checksum_tracing_on_thunks=true with
                      --xla_dump_to=DIR: XLA checksums every thunk's buffers; comparing the
                      record's and the replay's traces names the first kernel whose outputs
                      differ (`first_divergence`)

Not measured in this project (no GPU was lent): the cost of each flag, and whether the
persisted autotuning file alone makes two compilations bitwise; docs/determinism.md says
what to measure.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from aftune import errors

DETERMINISTIC_OPS = "--xla_gpu_deterministic_ops=true"
AUTOTUNE_OFF = "--xla_gpu_autotune_level=0"
DUMP_AUTOTUNE = "--xla_gpu_dump_autotune_results_to"
LOAD_AUTOTUNE = "--xla_gpu_load_autotune_results_from"
CHECKSUM_THUNKS = "--xla_gpu_experimental_enable_checksum_tracing_on_thunks=true"


def gpu_flags(*, deterministic: bool = True, autotune: str = "default",
              dispute_dump_dir: str | None = None) -> list[str]:
  """The XLA flags for a GPU run.

  Args:
    deterministic: add DETERMINISTIC_OPS.
    autotune: "default" | "off" | "dump:PATH" | "load:PATH" (see the module doc).
    dispute_dump_dir: checksum every thunk's buffers and dump them here.

  Raises:
    errors.ConfigError: an unknown autotune mode.
  """
  flags = [DETERMINISTIC_OPS] if deterministic else []
  mode, _, path = autotune.partition(":")
  if mode == "off" and not path:
    flags.append(AUTOTUNE_OFF)
  elif mode == "dump" and path:
    flags.append(f"{DUMP_AUTOTUNE}={path}")
  elif mode == "load" and path:
    flags.append(f"{LOAD_AUTOTUNE}={path}")
  elif autotune != "default":
    raise errors.ConfigError(f"autotune must be default, off, dump:PATH or load:PATH; got "
                             f"{autotune!r}")
  if dispute_dump_dir:
    flags += [CHECKSUM_THUNKS, f"--xla_dump_to={dispute_dump_dir}"]
  return flags


def apply(flags: list[str]) -> str:
  """Appends `flags` to XLA_FLAGS (before JAX starts its backend); returns the new value.

  Raises:
    errors.ConfigError: JAX already runs (the flags would be silently ignored).
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  current = os.environ.get("XLA_FLAGS", "")
  missing = [f for f in flags if f not in shlex.split(current)]
  if missing and xla_bridge.backends_are_initialized():
    raise errors.ConfigError(f"XLA_FLAGS {missing} must be set before JAX starts")
  value = " ".join(filter(None, [current, *missing]))
  os.environ["XLA_FLAGS"] = value
  return value


def autotune_results(xla_flags: str | None = None) -> dict[str, Any] | None:
  """The persisted autotuning file a run loads (its path and content hash), or None.

  The hash goes into the environment manifest: a replay that loads other choices would
  compile other kernels, so the file is part of what is committed.

  Raises:
    errors.InputError: the flag names a file that cannot be read.
  """
  from aftune.crypto import hashing  # pylint: disable=g-import-not-at-top

  xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  for flag in shlex.split(xla_flags):
    if flag.startswith(LOAD_AUTOTUNE + "="):
      path = Path(flag.split("=", 1)[1])
      try:
        data = path.read_bytes()
      except OSError as e:
        raise errors.InputError(f"{path}: autotuning results named in XLA_FLAGS cannot be read "
                                f"({e.strerror or e})") from None
      return {"path": str(path), "hash": hashing.hexdigest(
          hashing.hash_bytes(b"aftune/v1/file", data))}
  return None


def first_divergence(record: dict[str, str], replay: dict[str, str]) -> str | None:
  """The first thunk (in execution order) whose buffer checksum differs, or None.

  Args:
    record, replay: thunk name -> checksum, in execution order, as parsed from the two
      runs' checksum traces (dicts keep insertion order).
  """
  for name, checksum in record.items():
    if replay.get(name) != checksum:
      return name
  extra = [n for n in replay if n not in record]
  return extra[0] if extra else None
