"""The platform doctor: what replays bitwise on this machine, and the settings to use.

A provider or verifier runs it on a new machine (`python -m experiments.doctor`). It runs
one probe, a few blocked training steps of a run sheet from its initial state, and
compares the digest of the resulting parameters (and optimizer state) across:
  - the same steps twice in this process;
  - one compiled block function called many times on the same input (open reports
    exist of a compiled CPU module drifting between calls with more than one thread);
  - a fresh process with the same intra-op pool;
  - fresh processes with other pool sizes (PJRT_NPROC);
  - a fresh process on one core (`taskset -c 0`) with the same pool;
  - the committed test vectors (`doctor_vectors.json`) for this platform, if any.
It prints a table of what is bitwise here and what is not, and the settings to use.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

from aftune import provenance
from aftune.crypto import hashing
from aftune.train import job as job_lib
from aftune.train import loop
from aftune.train import step as step_lib

VECTORS = Path(__file__).with_name("doctor_vectors.json")


@dataclasses.dataclass
class Row:
  check: str
  setting: str
  digest: str
  bitwise: bool | None  # equal to the reference; None: nothing to compare with
  note: str = ""


def probe(config: ml_collections.ConfigDict) -> str:
  """Digest of (params, opt states) after config.num_steps blocked steps from the start."""
  job = job_lib.build_job(config)
  state = loop.TrainState(0, list(job.blocked.trainable), job.init_opt_states())
  state = loop.run_steps(job, state, job.num_steps)
  return hashing.hexdigest(hashing.hash_pytree({"params": state.params,
                                                "opt_states": state.opt_states}))


def repeat_digests(config: ml_collections.ConfigDict, repeats: int) -> list[str]:
  """Digests of one compiled block forward (block 0, step 0's batch), called `repeats` times."""
  job = job_lib.build_job(config)
  fns = step_lib.default_fns()
  spec = job.blocked.specs[0]
  _, batch = job.batch(0)
  from aftune.model import family  # pylint: disable=g-import-not-at-top
  x_in = batch[family.get(spec.arch).INPUT_KEY]
  out = []
  for _ in range(repeats):
    y, _, _, _ = fns.fwd(spec, job.blocked.trainable[0], job.blocked.frozen[0], x_in, batch,
                      job.step_key(0))
    out.append(hashing.hexdigest(hashing.hash_array(np.asarray(jax.device_get(y)))))
  return out


def platform_key(config: ml_collections.ConfigDict) -> str:
  """What a test vector is valid for: the sheet, the versions, the ISA, the pool size."""
  env = provenance.environment_manifest()
  sheet = config.to_dict()
  for drop in ("record", "log_every", "platform"):
    sheet.pop(drop, None)
  sheet["data"] = {k: v for k, v in sheet.get("data", {}).items() if not k.endswith("_path")}
  sheet["audit"] = {k: v for k, v in sheet.get("audit", {}).items() if k != "provider_key"}
  return json.dumps({"sheet": sheet,
                     "jax": env["packages"].get("jaxlib"), "machine": env["machine"],
                     "isa": env["cpu"]["isa"], "backend": env["backend"],
                     "intra_op_threads": env["intra_op_threads"],
                     "xla_flags": env["xla_flags"]}, sort_keys=True)


def _child(argv: list[str], env: dict[str, str], prefix: tuple[str, ...] = ()) -> str:
  r = subprocess.run([*prefix, sys.executable, "-m", "experiments.doctor", "--child", *argv],
                     capture_output=True, text=True, env={**os.environ, **env},
                     cwd=Path(__file__).resolve().parent.parent)
  if r.returncode != 0:
    return "error: " + (r.stderr.strip().splitlines() or ["?"])[-1]
  return r.stdout.strip().splitlines()[-1]


def diagnose(config: ml_collections.ConfigDict, sheet_argv: list[str], *, pools: list[int],
             repeats: int, children: bool = True) -> list[Row]:
  """Runs every check; the reference is the first in-process probe."""
  pool = provenance.intra_op_threads()
  here = f"PJRT_NPROC={pool}"
  ref = probe(config)
  rows = [Row("this process", here, ref, None, "the reference")]
  again = probe(config)
  rows.append(Row("the same steps again, this process", here, again, again == ref))
  reps = repeat_digests(config, repeats)
  drift = len(set(reps))
  rows.append(Row(f"one compiled block forward, {repeats} calls", here, reps[0], drift == 1,
                  "" if drift == 1 else f"{drift} different outputs: the module drifts"))
  if children:
    same = _child(sheet_argv, {"PJRT_NPROC": str(pool)})
    rows.append(Row("a fresh process", here, same, same == ref))
    for n in pools:
      if n == pool:
        continue
      d = _child(sheet_argv, {"PJRT_NPROC": str(n)})
      rows.append(Row("a fresh process, another pool", f"PJRT_NPROC={n}", d, d == ref))
    if shutil.which("taskset") and len(os.sched_getaffinity(0)) > 1:
      cpu0 = sorted(os.sched_getaffinity(0))[0]
      d = _child(sheet_argv, {"PJRT_NPROC": str(pool)}, ("taskset", "-c", str(cpu0)))
      rows.append(Row("a fresh process on one core", f"taskset -c {cpu0}, {here}", d, d == ref))
  vectors = json.loads(VECTORS.read_text()) if VECTORS.exists() else {}
  want = vectors.get(platform_key(config))
  rows.append(Row("the committed test vector", here, want or "-",
                  None if want is None else want == ref,
                  "" if want is not None else "none for this platform (see doctor_vectors.json)"))
  return rows


def advice(rows: list[Row]) -> list[str]:
  """The settings to use, from the table."""
  pool = provenance.intra_op_threads()
  out = []
  core = [r for r in rows if r.check in ("the same steps again, this process", "a fresh process",
                                         "a fresh process on one core")
          or r.check.startswith("one compiled")]
  if all(r.bitwise is not False for r in core):
    out.append(f"bitwise here: record and replay with PJRT_NPROC={pool} "
               f"(--config.platform.intra_op_threads={pool}); a verifier with fewer cores "
               "sets the same pool and replays exactly, only slower")
  else:
    bad = [r.check for r in core if r.bitwise is False]
    out.append(f"NOT bitwise here ({', '.join(bad)}): use exact mode only after fixing this "
               "(try PJRT_NPROC=1), or --mode tolerance")
  other = [r.setting for r in rows if r.check == "a fresh process, another pool"]
  differ = [r.setting for r in rows if r.check == "a fresh process, another pool" and not r.bitwise]
  if other:
    out.append(f"other pool sizes give {'other bits: ' + ', '.join(differ) if differ else 'the same bits on this probe'}"
               " (the pool size is committed in the job spec; the verifier sets it)")
  vec = rows[-1]
  if vec.bitwise is False:
    out.append("the committed test vector differs: this machine computes other bits than the "
               "one that committed it (versions, ISA or a broken install)")
  return out


def render(rows: list[Row], notes: list[str]) -> str:
  lines = ["| check | setting | digest | bitwise with the reference |", "|---|---|---|---|"]
  for r in rows:
    verdict = {True: "yes", False: "NO", None: "-"}[r.bitwise] + (f" ({r.note})" if r.note else "")
    lines.append(f"| {r.check} | {r.setting} | {r.digest[:16]} | {verdict} |")
  return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def healthy(rows: list[Row]) -> bool:
  core = {"the same steps again, this process", "a fresh process", "a fresh process on one core",
          "the committed test vector"}
  return all(r.bitwise is not False for r in rows
             if r.check in core or r.check.startswith("one compiled"))
