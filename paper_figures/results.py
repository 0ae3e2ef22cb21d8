"""The results directory the figure scripts read, and the files they write.

Layout of `<out>/results/` (written by `paper_figures.pipeline`):

  run_sheet.json        the whole run sheet (`configs/figures.py:<scale>`) and its hash
  index.json            the sheet's points: what the figures read
  provenance.json       versions, devices, XLA flags, git SHA, argv of the latest make_all
                        (aftune.provenance); each point's header keeps its own run's SHA
  <experiment>/<point>.jsonl
                        one experiment point: a header line (experiment, point, the part of
                        the sheet it depends on and its hash), one line per result row, and a
                        last line {KIND: "done", "rows": n, "sheet_hash": ...}
  attack_eval/<hash>/   experiments.attack_eval's own files (detection.csv, success.csv, runs/)

A point file is written atomically (temporary file, then rename) and only once its run is
over, so a file is either absent (the point is run) or whole. One that is present but
cannot be read, has no completion marker, or was made from another sheet is an error
naming the file (exit 2): it is never overwritten, the user decides.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any
from typing import Sequence

from aftune import errors

Row = dict[str, Any]
KIND = "__line__"  # which line of a results file: header | row | done (rows never use it)


class ResultsError(errors.InputError):
  """A results file that cannot be used; the message names the file."""


def sheet_hash(part: Any) -> str:
  """SHA-256 of the canonical JSON of (part of) a run sheet."""
  text = json.dumps(part, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(x: Any) -> Any:
  """NaN and infinities as strings: the files stay strict JSON."""
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def write_point(path: Path, *, experiment: str, point: str, sheet: Any,
                rows: Sequence[Row], made_by: Row | None = None) -> None:
  """Writes one experiment point's results file, atomically, with its completion marker
  (`made_by`: the provenance of the run, e.g. git SHA and backend, kept in the header)."""
  h = sheet_hash(sheet)
  lines = [{KIND: "header", "experiment": experiment, "point": point, "sheet": sheet,
            "sheet_hash": h, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "made_by": made_by or {}}]
  lines += [{KIND: "row", **_jsonable(dict(r))} for r in rows]
  lines.append({KIND: "done", "rows": len(rows), "sheet_hash": h})
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(json.dumps(x, sort_keys=True, default=str) + "\n" for x in lines))
  tmp.replace(path)


def read_point(path: Path, sheet: Any | None = None) -> list[Row] | None:
  """The rows of a point file; None when it is absent (the point has to be run).

  Raises:
    ResultsError: the file is unreadable, truncated (no completion marker), malformed, or
      holds results of another sheet than `sheet` (when given).
  """
  if not path.exists():
    return None
  try:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip()]
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ResultsError(f"{path}: not a results file (invalid JSONL: {e}); delete it to rerun "
                       "that point") from None
  if (not lines or not all(isinstance(x, dict) for x in lines)
      or lines[0].get(KIND) != "header"):
    raise ResultsError(f"{path}: not a results file (no header line); delete it to rerun")
  if lines[-1].get(KIND) != "done":
    raise ResultsError(f"{path}: incomplete (no completion marker); delete it to rerun")
  rows = [{k: v for k, v in x.items() if k != KIND} for x in lines[1:-1]]
  if lines[-1].get("rows") != len(rows) or any(x.get(KIND) != "row" for x in lines[1:-1]):
    raise ResultsError(f"{path}: the completion marker counts {lines[-1].get('rows')} rows, "
                       f"the file holds {len(rows)}; delete it to rerun")
  h = lines[0].get("sheet_hash")
  if h != lines[-1].get("sheet_hash") or h != sheet_hash(lines[0].get("sheet")):
    raise ResultsError(f"{path}: its sheet hash does not match its sheet; delete it to rerun")
  if sheet is not None and h != sheet_hash(sheet):
    fields = ", ".join(_differences(lines[0].get("sheet"), json.loads(json.dumps(sheet)))[:3])
    raise ResultsError(f"{path}: made from another run sheet (hash {h[:12]}, this sheet's "
                       f"{sheet_hash(sheet)[:12]}; differs in {fields}); use another --out or "
                       "delete it")
  return rows


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
  """Dotted paths where two JSON documents differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k),
                                                                     f"{path}.{k}" if path else k)]
  return [] if a == b else [path or "(the whole sheet)"]


def read_experiment(results: Path, experiment: str) -> list[Row]:
  """Every row of every point of one experiment in the run sheet's index, each with its
  point's name (files of other sheets left in the directory are not read)."""
  from aftune import jsonio  # pylint: disable=g-import-not-at-top
  index = jsonio.load_json(results / "index.json", ResultsError, "the points of the run sheet")
  out = []
  for key in index["points"]:
    exp, _, name = key.partition("/")
    if exp != experiment:
      continue
    path = results / exp / f"{name}.jsonl"
    rows = read_point(path)
    if rows is None:
      raise ResultsError(f"{path}: missing (run paper_figures.make_all first)")
    out += [{"point": name, **r} for r in rows]
  if not out:
    raise ResultsError(f"{results / experiment}: no results")
  return out


# ---- writing the figures' files -----------------------------------------------------------


def write_csv(path: Path, rows: Sequence[Row], columns: Sequence[str] | None = None) -> None:
  columns = list(columns or rows[0])
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  tmp.replace(path)


def read_csv(path: Path) -> list[dict[str, str]]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.3g}"
  return "" if v is None else str(v)


def markdown_table(rows: Sequence[Row], columns: Sequence[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in columns) + " |"
            for r in rows]
  return "\n".join(lines)


def pyplot():
  """matplotlib's pyplot on the Agg backend (no display), one style for every figure."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8,
                       "figure.dpi": 120, "savefig.dpi": 120})
  return plt


def save(fig, path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.stem + ".tmp.png")
  fig.savefig(tmp, bbox_inches="tight")
  tmp.replace(path)


def provenance_note(results: Path) -> str:
  """One line naming the sheet and the commit the results came from (for captions)."""
  try:
    doc = json.loads((results / "run_sheet.json").read_text())
    prov = json.loads((results / "provenance.json").read_text())
  except (OSError, json.JSONDecodeError):
    return ""
  return (f"scale {doc.get('scale')}, sheet {doc.get('sheet_hash', '')[:8]}, "
          f"git {str(prov.get('git_sha', '?'))[:10]}, {prov.get('backend', '?')}")


class Progress:
  """One stderr line per finished item: done/total, elapsed, ETA."""

  def __init__(self, total: int, stream=None):
    self.total, self.done, self.t0 = total, 0, time.perf_counter()
    self.stream = stream or sys.stderr

  def line(self, what: str, advance: int = 1) -> None:
    self.done += advance
    dt = time.perf_counter() - self.t0
    eta = dt / self.done * (self.total - self.done) if self.done else float("nan")
    print(f"[{self.done}/{self.total}] {what}  ({dt:.0f}s elapsed, ETA {eta:.0f}s)",
          file=self.stream, flush=True)


def as_float(v: Any) -> float:
  return float("nan") if v in (None, "") else float(v)


def figure_main(make) -> None:
  """The command line of one figure script: `python -m paper_figures.<name> --out DIR`
  redraws that figure from DIR/results (run `paper_figures.make_all` first)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  out_flag = flags.DEFINE_string("out", "paper_figures/out", "The make_all output directory.")

  def main(argv):
    del argv
    with errors.exit_on_input_error():
      for p in make(Path(out_flag.value)):
        print(p)

  app.run(main)


def sweep_rows(rows: Sequence[Row], centre: dict[str, int], axis: str,
               settings: Sequence[str] = ("B_S", "B_L", "I_C", "I_A")) -> list[Row]:
  """The rows of the one-at-a-time sweep of `axis` (the others at the centre), by value."""
  keep = [r for r in rows if all(int(r[k]) == int(centre[k]) for k in settings
                                 if k != axis and k in r)]
  return sorted(keep, key=lambda r: int(r[axis]))


def run_sheet(results: Path) -> Row:
  from aftune import jsonio  # pylint: disable=g-import-not-at-top
  return jsonio.load_json(results / "run_sheet.json", ResultsError, "the run sheet")


def centre_of(results: Path) -> dict[str, int]:
  doc = run_sheet(results)
  return {k: int(v) for k, v in doc["sheet"]["centre"].items()}
