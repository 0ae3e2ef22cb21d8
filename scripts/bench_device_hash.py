"""Host hash vs on-device hash of one tensor: time per call, same digest.

Compares, for float32 tensors of 64 KiB, 1 MiB and 16 MiB living on jax's
default device:

  (a) host:   hashing.hash_array(np.asarray(x))      -- copy to host, then the
              SIMD `blake3` package (one thread, the recorder's default);
  (b) device: device_hash.hash_array_on_device(x).block_until_ready()
              -- jitted jax BLAKE3 where x lives; only 32 bytes would leave.

The two are run interleaved (a, b, a, b, ...) for --repeats rounds after one
warm-up call each (the first device call compiles; its time is printed
separately), and the median per call is reported with ratio = device / host
(above 1: the device path is slower). Every digest is checked to be equal.

What this shows on a CPU backend: the cost of the jax BLAKE3 against the native
one when no transfer is involved at all -- on CPU `np.asarray(x)` of a jax
array is (usually) zero-copy, so (a) is pure hashing and the comparison is the
worst case for (b): XLA-compiled vectorised uint32 code against hand-written
SIMD. It does NOT show the case this module is for: on a GPU, (a) pays the
device-to-host copy (PCIe/NVLink) and a host hash while the device idles or
competes for the host thread, and (b) runs on thousands of GPU lanes (one per
1 KiB chunk). Those GPU numbers are unmeasured here; run this same script on a
GPU machine to get them (it benchmarks whatever device jax picks).

Usage:
  .venv/bin/python scripts/bench_device_hash.py [--repeats 7] [--sizes 64K,1M,16M]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from aftune.crypto import device_hash
from aftune.crypto import hashing

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _parse_size(text: str) -> int:
  text = text.strip().upper().removesuffix("B").removesuffix("I")
  if text and text[-1] in _UNITS:
    return int(float(text[:-1]) * _UNITS[text[-1]])
  return int(text)


def _label(nbytes: int) -> str:
  for unit in ("G", "M", "K"):
    if nbytes >= _UNITS[unit] and nbytes % _UNITS[unit] == 0:
      return f"{nbytes // _UNITS[unit]} {unit}iB"
  return f"{nbytes} B"


def _host(x: jax.Array) -> bytes:
  return hashing.hash_array(np.asarray(x))


def _device(x: jax.Array) -> jax.Array:
  return device_hash.hash_array_on_device(x).block_until_ready()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--sizes", default="64K,1M,16M")
  args = p.parse_args()
  sizes = [_parse_size(s) for s in args.sizes.split(",")]

  rng = np.random.default_rng(0)
  xs = {n: jnp.asarray(rng.standard_normal(n // 4, dtype=np.float32)) for n in sizes}
  compile_s = {}
  for n, x in xs.items():
    x.block_until_ready()
    t = time.perf_counter()
    d = _device(x)
    compile_s[n] = time.perf_counter() - t
    if bytes(np.asarray(d)) != _host(x):
      raise SystemExit(f"digest mismatch at {_label(n)}")

  host: dict[int, list[float]] = {n: [] for n in sizes}
  dev: dict[int, list[float]] = {n: [] for n in sizes}
  for _ in range(args.repeats):
    for n, x in xs.items():
      t = time.perf_counter()
      _host(x)
      host[n].append(time.perf_counter() - t)
      t = time.perf_counter()
      _device(x)
      dev[n].append(time.perf_counter() - t)

  print(f"jax {jax.__version__}, device {jax.devices()[0]}, repeats {args.repeats} (median)")
  head = f"{'tensor':>9} | {'host copy+hash':>14} | {'on device':>10} | {'dev/host':>8} | {'first call':>10}"
  print(head)
  print("-" * len(head))
  for n in sizes:
    h, d = statistics.median(host[n]), statistics.median(dev[n])
    print(
      f"{_label(n):>9} | {h * 1e3:11.3f} ms | {d * 1e3:7.3f} ms | {d / h:7.1f}x | {compile_s[n]:8.2f} s"
    )
  print("digests equal: yes (checked once per size)")


if __name__ == "__main__":
  main()
