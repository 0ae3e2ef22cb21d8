"""The attack suite: dishonest providers run for real, and their measured detection rates.

For each attack (name, strength) the suite

1. trains it once through the real trainer and recorder (`trainer.train(..., tamper=...)`),
   so the provider holds a consistent, signed trace of what it really did;
2. opens every cell of the grid the way that provider would (its own hooks, not strict)
   and verifies each with the real verifier against the honest job's agreed fields: the
   cells the verifier rejects are `flagged`. Each attack also declares its `footprint`,
   the cells it touched, worked out from what it does (which steps, which blocks), not
   from the verifier; `flagged == footprint` is the claim "the verifier catches exactly
   what was tampered";
3. draws many independent challenges per strategy and sampling rate with the real
   `challenge.draw_challenge` (nonces derived from the attack, strategy, rate and draw
   index, so a table is reproducible) and counts a draw as caught when one of its cells is
   flagged: the verifier's verdict on a cell is a deterministic function of the bundle, so
   each cell is verified once and every draw that samples it reuses that verdict;
4. reports the measured rate with a 95% Wilson interval beside the prediction: the
   hypergeometric probability for uniform and guarantee draws (k = the footprint's size,
   over N cells), for input_only / output_only over the S cells of the first / last
   layer block, and for stratified draws (not hypergeometric) the exact sampler simulated
   with independent seeds.

`misses` counts draws that sampled a footprint cell and were not caught: zero in exact
mode is the claim that a sampled tampered cell is always caught.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from aftune.attacks import training as attacks
from aftune.audit import challenge as challenge_lib
from aftune.audit import detection
from aftune.audit import train_provider
from aftune.audit import train_verifier
from aftune.model import blocks as grid_lib
from aftune.model import family
from aftune.record import jobspec
from aftune.record import layout as trace
from aftune.train import job as job_lib
from aftune.train import optim
from aftune.train import trainer

Cell = tuple[int, int]
STRATEGIES = ("uniform", "input_only", "output_only", "stratified", "guarantee")


@dataclasses.dataclass
class Attack:
  """One dishonest provider: its hooks and the cells it touches (its ground truth)."""
  name: str
  strength: str
  hooks: Any
  footprint: frozenset[Cell]
  what: str


def _all_blocks(grid: trace.Grid, step_blocks) -> frozenset[Cell]:
  return frozenset((k, s) for k in range(grid.num_layer_blocks) for s in step_blocks)


def _steps_footprint(grid: trace.Grid, steps) -> frozenset[Cell]:
  """A deviation at these steps changes every block's state in their step blocks."""
  return _all_blocks(grid, {t // grid.steps_per_block for t in steps})


def _units_blocks(job: job_lib.Job, units) -> set[int]:
  return {k for k, spec in enumerate(job.blocked.specs) if set(spec.unit_names) & set(units)}


def _layer_units(job: job_lib.Job) -> list[str]:
  """The model's repeated layers (decoder / encoder layers, residual layers)."""
  names = family.of(job.model_cfg).unit_names(job.model_cfg)
  return [n for n in names if n.startswith(("layer_", "stage"))]


def build_attack(name: str, strength: float, job: job_lib.Job, grid: trace.Grid,
                 seed: int = 0) -> Attack:
  """An attack of the suite by name, at a strength (a fraction, or a block/step index)."""
  T, L, S = grid.num_steps, grid.num_layer_blocks, grid.num_step_blocks
  pct = f"{100 * strength:g}%"
  if name == "skip_steps":  # under-training: a fraction of the updates dropped
    steps = attacks.choose_steps(T, strength, seed)
    return Attack(name, pct, attacks.SkippedSteps(steps), _steps_footprint(grid, steps),
                  f"updates of steps {list(steps)} dropped")
  if name == "stop_early":  # trains (1 - strength) of the steps, claims them all
    steps = tuple(range(T - int(round(strength * T)), T))
    return Attack(name, pct, attacks.SkippedSteps(steps), _steps_footprint(grid, steps),
                  f"stopped after step {T - len(steps) - 1}, claimed {T}")
  if name == "learning_rate":  # x10 learning rate on a fraction of the steps (never step 0:
    # the warmup's learning rate is 0 there, and 10 x 0 changes nothing)
    steps = tuple(1 + s for s in attacks.choose_steps(T - 1, strength, seed))
    changes = (("learning_rate", job.opt_cfg.learning_rate * 10),)
    return Attack(name, pct, attacks.OptimizerDeviation(changes, steps),
                  _steps_footprint(grid, steps), f"learning rate x10 at steps {list(steps)}")
  if name == "schedule":  # a constant learning rate instead of the agreed schedule
    changes = (("schedule", "constant"), ("warmup_steps", 0))
    agreed_lr = optim.make_schedule(job.opt_cfg)
    other_lr = optim.make_schedule(dataclasses.replace(job.opt_cfg, **dict(changes)))
    steps = [t for t in range(T) if float(agreed_lr(t)) != float(other_lr(t))]
    return Attack(name, "constant", attacks.OptimizerDeviation(changes),
                  _steps_footprint(grid, steps), "constant learning rate, no warmup")
  if name in ("substitute_data", "poison_data"):  # a fraction of the dataset's examples
    n = job.num_examples
    rng = np.random.default_rng(seed)
    ex = tuple(sorted(int(i) for i in rng.choice(n, size=max(1, int(round(strength * n))),
                                                 replace=False)))
    steps = [t for t in range(T) if set(job.example_indices(t).tolist()) & set(ex)]
    if name == "substitute_data":
      hooks = attacks.SubstitutedExamples(ex)
    else:  # the targets of the poisoned set all become one token (a trigger set's answer)
      field = "targets" if "targets" in job.encoded else "label"
      hooks = attacks.SubstitutedExamples(ex, poison_field=field, poison_value=1)
    return Attack(name, pct, hooks, _steps_footprint(grid, steps),
                  f"{len(ex)} of {n} examples, in steps {steps}")
  if name == "reorder":  # two consecutive batches swapped, real indices committed
    t = int(strength)
    return Attack(name, f"steps {t},{t + 1}", attacks.ReorderedBatches(t),
                  _steps_footprint(grid, (t, t + 1)), f"batches of steps {t} and {t + 1} swapped")
  if name in ("base_model", "layer_substitution"):  # units from another model
    units = (list(family.of(job.model_cfg).unit_names(job.model_cfg)) if name == "base_model"
             else _layer_units(job))
    if name == "layer_substitution":
      units = units[:max(1, int(round(strength * len(units))))]
    fam = family.of(job.model_cfg)
    other = grid_lib.split_into_blocks(job.model_cfg, fam.build_units(job.model_cfg, seed + 1000),
                                       grid.units_per_block).trainable
    blocks = _units_blocks(job, units)
    return Attack(name, "all units" if name == "base_model" else pct,
                  attacks.SubstitutedUnits(tuple(units), other),
                  frozenset((k, 0) for k in blocks), f"units {units} from another model")
  if name == "final_edit":  # post-training edit of one layer block
    k = int(strength)
    return Attack(name, f"block {k}", attacks.EditedFinalModel(block=k),
                  frozenset({(k, S - 1)}), f"final parameters of layer block {k} edited")
  if name in ("forged_forward", "adaptive_middle"):  # one boundary forged at one step.
    # adaptive_middle knows the strategy: it forges block 1's output, whose two cells (1, 2)
    # input_only and output_only never draw (L >= 4); with L < 4, the last block's output
    # (one cell, which input_only never draws).
    if name == "forged_forward":
      k = int(strength)
    else:
      k = 1 if L >= 4 else L - 1
    t = T // 2 + 1
    cells = {(k, t // grid.steps_per_block)}
    if k + 1 < L:
      cells.add((k + 1, t // grid.steps_per_block))
    return Attack(name, f"block {k}", attacks.ForgedForward(step=t, block=k), frozenset(cells),
                  f"output of layer block {k} forged at step {t}")
  raise ValueError(f"unknown attack {name!r}")


# ---- statistics ---------------------------------------------------------------------------


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
  """The Wilson score interval of a binomial proportion (95% by default)."""
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  # At 0 or n successes the interval ends exactly at 0 or 1 (no float round-off).
  lo = 0.0 if successes == 0 else max(0.0, centre - half)
  hi = 1.0 if successes == n else min(1.0, centre + half)
  return lo, hi


def _m_for(strategy: str, rate: float, L: int, S: int) -> dict[str, Any]:
  """The challenge parameters of a sampling rate (the fraction of the population drawn)."""
  if strategy in ("input_only", "output_only"):
    return {"m": max(1, math.ceil(rate * S))}
  if strategy == "stratified":
    return {"m": max(max(L, S), math.ceil(rate * L * S))}
  if strategy == "guarantee":
    return {"k": 2, "p": rate}  # the promised P(detect) if >= 2 cells were tampered
  return {"m": max(1, math.ceil(rate * L * S))}


def predicted(strategy: str, footprint, L: int, S: int, m: int, sims: int = 20000,
              seed: int = 0) -> tuple[float, str]:
  """The detection probability the strategy gives against this footprint, and how it is
  computed (hypergeometric, or the stratified sampler simulated)."""
  N = L * S
  if strategy in ("uniform", "guarantee"):
    return detection.detection_probability(N, len(footprint), m), "hypergeometric"
  if strategy in ("input_only", "output_only"):
    row = 0 if strategy == "input_only" else L - 1
    k = sum(1 for c in footprint if c[0] == row)
    return detection.detection_probability(S, k, m), "hypergeometric"
  rng = np.random.default_rng(seed)
  hits = 0
  for _ in range(sims):
    cells = challenge_lib._draw_cells(rng.bytes(32), "stratified", L, S, m)  # pylint: disable=protected-access
    hits += any(tuple(c) in footprint for c in cells)
  return hits / sims, f"simulated ({sims} draws)"


def _nonce(*parts: Any) -> bytes:
  return hashlib.sha256(json.dumps(parts).encode()).digest()


def measure(attack: Attack, flagged: frozenset[Cell], *, job_id: bytes, root: bytes, L: int,
            S: int, strategies=STRATEGIES, rates=(0.05, 0.1, 0.25),
            guarantee_ps=(0.5, 0.9), draws: int = 300, sims: int = 20000) -> list[dict[str, Any]]:
  """Detection rows of one attack: per strategy and rate, `draws` real challenges (for the
  guarantee strategy the "rate" is the promised P(detect) if >= 2 cells were tampered)."""
  rows = []
  for strategy in strategies:
    for rate in (guarantee_ps if strategy == "guarantee" else rates):
      params = _m_for(strategy, rate, L, S)
      caught = misses = 0
      m = None
      for i in range(draws):
        ch = challenge_lib.draw_challenge(job_id=job_id, root=root, num_layer_blocks=L,
                                          num_step_blocks=S, strategy=strategy,
                                          nonce=_nonce(attack.name, attack.strength, strategy,
                                                       rate, i), **params)
        m = len(ch.cells)
        cells = {tuple(c) for c in ch.cells}
        hit_caught = bool(cells & flagged)
        caught += hit_caught
        misses += bool(cells & attack.footprint) and not hit_caught
      lo, hi = wilson(caught, draws)
      pred, how = predicted(strategy, attack.footprint, L, S, m, sims=sims)
      rows.append({"attack": attack.name, "strength": attack.strength, "strategy": strategy,
                   "rate": rate, "m": m, "k": len(attack.footprint), "k_flagged": len(flagged),
                   "N": L * S, "draws": draws, "detected": caught, "measured": caught / draws,
                   "ci_low": lo, "ci_high": hi, "predicted": pred, "prediction": how,
                   "misses": misses})
  return rows


# ---- running an attack --------------------------------------------------------------------


class Progress:
  """One stderr line per event: done/total, elapsed, ETA."""

  def __init__(self, total: int, stream=None):
    self.total, self.done, self.t0 = total, 0, time.perf_counter()
    self.stream = stream or sys.stderr

  def step(self, what: str, n: int = 1) -> None:
    self.done += n
    dt = time.perf_counter() - self.t0
    eta = dt / self.done * (self.total - self.done) if self.done else float("nan")
    bar = "#" * int(30 * self.done / max(self.total, 1))
    print(f"[{bar:<30}] {self.done}/{self.total} {what}  {dt:.0f}s elapsed, ETA {eta:.0f}s",
          file=self.stream, flush=True)


def agreed_fields(workdir: Path) -> dict[str, Any]:
  spec = json.loads((workdir / "trace" / "job_spec.json").read_text())
  return {f: spec[f] for f in train_verifier.AGREED_FIELDS}


def cell_verdicts(workdir: Path, hooks: Any, agreed: dict[str, Any], cells, *,
                  mode: str = "exact", cache: Path | None = None) -> dict[Cell, dict[str, Any]]:
  """Every cell opened by the (dishonest) provider and verified by the real verifier."""
  if cache is not None and cache.exists():
    return {tuple(json.loads(k)): v for k, v in json.loads(cache.read_text()).items()}
  provider = train_provider.Provider(workdir, hooks=hooks, strict=False)
  commitment = json.loads((workdir / "commitment.json").read_text())
  out = {}
  for cell in sorted(cells):
    rep = train_verifier.verify_bundle(provider.open_cell(*cell), commitment=commitment,
                                       agreed=agreed, mode=mode)
    out[cell] = {"passed": rep.passed, "check": rep.check, "step": rep.step,
                 "reason": rep.reason, "verify_s": rep.auth_s + rep.replay_s}
  if cache is not None:
    cache.write_text(json.dumps({json.dumps(list(c)): v for c, v in out.items()}, indent=1))
  return out


def run_attack(config, attack_name: str, strength: float, out_dir: Path, *,
               honest_agreed: dict[str, Any], job: job_lib.Job, grid: trace.Grid,
               mode: str = "exact") -> tuple[Attack, dict[Cell, dict[str, Any]], dict[str, Any]]:
  """Trains the attack (resuming a finished run), verifies every cell; (attack, verdicts,
  commitment)."""
  attack = build_attack(attack_name, strength, job, grid, seed=int(config.seed))
  workdir = out_dir / "runs" / f"{attack.name}_{attack.strength}".replace(" ", "_").replace("%", "pct").replace(",", "_")
  if not (workdir / "commitment.json").exists():
    trainer.train(config, workdir, job=job, tamper=attack.hooks)
  cells = [(k, s) for k in range(grid.num_layer_blocks) for s in range(grid.num_step_blocks)]
  verdicts = cell_verdicts(workdir, attack.hooks, honest_agreed, cells, mode=mode,
                           cache=workdir / f"verdicts_{mode}.json")
  commitment = json.loads((workdir / "commitment.json").read_text())
  return attack, verdicts, commitment


def economics(grid: trace.Grid, rates=(0.05, 0.1, 0.25),
              fractions=(1 / 16, 1 / 8, 1 / 4, 1 / 2)) -> list[dict[str, Any]]:
  """The economics of cheating on this grid: a provider that drops a fraction f of the
  updates (clustering them into as few step blocks as possible, the cheapest footprint)
  saves about f of the compute and is caught by a uniform challenge at rate r with the
  hypergeometric probability; if being caught forfeits the fee (1 = the whole job's
  price), its expected gain is f (1 - P) - P."""
  L, S, B = grid.num_layer_blocks, grid.num_step_blocks, grid.steps_per_block
  N = L * S
  rows = []
  for f in fractions:
    skipped = max(1, math.ceil(f * grid.num_steps))
    k = L * -(-skipped // B)  # whole step blocks, every layer block
    row = {"deviation": f"skip {100 * f:g}% of the updates ({skipped} steps)",
           "compute_saved": skipped / grid.num_steps,
           "cells_tampered": k, "N": N}
    for r in rates:
      m = max(1, math.ceil(r * N))
      p = detection.detection_probability(N, min(k, N), m)
      row[f"P_caught@{r:g}"] = p
      row[f"expected_gain@{r:g}"] = row["compute_saved"] * (1 - p) - p
    rows.append(row)
  # The cheapest undetectable-looking deviation: one forged cell (one block, one step).
  row = {"deviation": "forge one cell (1 block x 1 step block)", "compute_saved": 1 / N,
         "cells_tampered": 1, "N": N}
  for r in rates:
    m = max(1, math.ceil(r * N))
    p = detection.detection_probability(N, 1, m)
    row[f"P_caught@{r:g}"] = p
    row[f"expected_gain@{r:g}"] = (1 / N) * (1 - p) - p
  rows.append(row)
  return rows


def job_grid(job: job_lib.Job) -> trace.Grid:
  return jobspec.make_grid(job)
