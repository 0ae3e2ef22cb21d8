"""The figure pipeline end to end at --scale smoke, and its results files.

One run of `python -m paper_figures.make_all --scale smoke` (about a minute on 2 cores)
serves every test of the module: each figure's PNG and CSV (and Markdown for tables)
exists, and each CSV holds the numbers the experiments wrote to the results files; a rerun
skips every point; a corrupt results file stops the run with exit 2 and is left alone.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from paper_figures import results as res

ROOT = Path(__file__).resolve().parent.parent
# One worker runs the whole module: its tests share the smoke run (pytest.ini).
pytestmark = pytest.mark.xdist_group("paper_figures")
OUTPUTS = ("fig1_overhead.png", "fig1_overhead.csv", "fig2_storage.png", "fig2_storage.csv",
           "fig3_verify.png", "fig3_verify.csv", "fig4_detection.png", "fig4_detection.csv",
           "table5_detection.png", "table5_detection.csv", "table5_detection.md",
           "fig6_inference.png", "fig6_inference.csv", "fig7_perturbation.png",
           "fig7_perturbation.csv", "table8_alternatives.png", "table8_alternatives.csv",
           "table8_alternatives.md")


def _make_all(out: Path, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "paper_figures.make_all", "--scale", "smoke",
                         "--out", str(out), *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def smoke(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("figs")
  r = _make_all(out)
  assert r.returncode == 0, r.stderr[-3000:]
  return out


def _f(v) -> float:
  return float("nan") if v in ("", None) else float(v)


def _close(a, b) -> bool:
  a, b = _f(a), _f(b)
  return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


def _point(out: Path, experiment: str, name: str) -> dict:
  rows = res.read_point(out / "results" / experiment / f"{name}.jsonl")
  assert rows, f"{experiment}/{name}: no rows"
  return rows[0]


def test_every_figure_and_table_is_written(smoke):
  for name in OUTPUTS:
    p = smoke / name
    assert p.exists() and p.stat().st_size > 0, name
    if p.suffix == ".png":
      assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    if p.suffix == ".csv":
      assert res.read_csv(p), f"{name}: no rows"


def test_record_csvs_hold_the_measured_numbers(smoke):
  rows = res.read_csv(smoke / "fig1_overhead.csv")
  assert {r["model"] for r in rows} == {"lm", "vision"}
  assert {r["axis"] for r in rows} == {"B_S", "B_L", "I_C", "I_A"}
  for r in rows:
    p = _point(smoke, "record", r["point"])
    for col in ("recorded_over_plain_paired", "paired_q25", "paired_q75", "plain_ms",
                "recorded_ms"):
      assert _close(r[col], p[col]), (r["point"], col)
    assert int(r["value"]) == p[r["axis"]]
  rows = res.read_csv(smoke / "fig2_storage.csv")
  assert any(r["reference_accepts_setting"] == "False" for r in rows)  # I_C > 1 with I_A > 1
  for r in rows:
    p = _point(smoke, "record", r["point"])
    assert _close(r["bytes_per_step"], p[f"bytes_{r['category']}"]), (r["point"], r["category"])


def test_verify_and_inference_csvs_hold_the_measured_numbers(smoke):
  rows = res.read_csv(smoke / "fig3_verify.csv")
  assert {r["panel"] for r in rows} == {"cell_time", "audit_cost", "regeneration"}
  for r in rows:
    p = _point(smoke, "verify", r["point"])
    assert _close(r["median_verify_s"], p["median_auth_s"] + p["median_replay_s"])
    assert _close(r["median_open_s"], p["median_open_s"])
    if r["panel"] == "audit_cost":
      m = max(1, math.ceil(float(r["rate"]) * p["n_cells"]))
      assert int(r["cells_checked"]) == m
      assert _close(r["verifier_over_training"], m * p["mean_verify_s"] / p["run_train_s"])
      assert _close(r["provider_over_training"], m * p["mean_open_s"] / p["run_train_s"])
  for r in res.read_csv(smoke / "fig6_inference.csv"):
    p = _point(smoke, "infer", r["point"])
    for col in ("recorded_over_plain_paired", "verify_cell_median_s", "bytes_per_token",
                "tokens_per_s_plain", "tokens_per_s_recorded"):
      assert _close(r[col], p[col]), (r["point"], col)


def test_attack_csvs_hold_the_measured_numbers(smoke):
  from aftune.audit import detection  # pylint: disable=g-import-not-at-top
  measured = res.read_point(smoke / "results" / "attacks" / "detection.jsonl")
  key = lambda r: (r["attack"], r["strength"], r["strategy"], _f(r["rate"]))
  by_key = {key(r): r for r in measured}
  rows = res.read_csv(smoke / "fig4_detection.csv")
  meas = [r for r in rows if r["kind"] == "measured"]
  assert len(meas) == sum(r["strategy"] == "uniform" for r in measured) > 0
  for r in meas:
    m = by_key[key(r)]
    for col in ("measured", "ci_low", "ci_high", "predicted", "m", "k", "N"):
      assert _close(r[col], m[col]), col
  for r in rows:
    if r["kind"] == "computed":
      assert _close(r["p_detect"], detection.detection_probability(int(r["N"]), int(r["k"]),
                                                                   int(r["m"])))
  table = res.read_csv(smoke / "table5_detection.csv")
  assert [r["category"] for r in table] == ["under-training", "poisoning", "poisoning",
                                            "substitution", "tampering"]
  run = [r for r in table if r["measured"]]
  assert {r["suite_attack"] for r in run} == {"skip_steps", "final_edit"}  # the smoke sheet's
  for r in run:
    m = by_key[(r["suite_attack"], r["suite_strength"], r["suite_strategy"], _f(r["suite_rate"]))]
    for col, mcol in (("measured", "measured"), ("ci_low", "ci_low"), ("ci_high", "ci_high"),
                      ("computed_suite_grid", "predicted"), ("suite_k", "k")):
      assert _close(r[col], m[mcol]), col
  assert "| tampering |" in (smoke / "table5_detection.md").read_text()
  success = res.read_point(smoke / "results" / "attacks" / "success.jsonl")
  rows = res.read_csv(smoke / "fig7_perturbation.csv")
  assert len(rows) == len(success) > 0
  for r in rows:
    s = next(s for s in success if (s["attack"], str(s["target"])) == (r["attack"], r["target"]))
    assert _close(r["verifier_rel_err"], s["verifier_rel_err"])
    assert _close(r["tolerance"], s["tolerance"])


def test_alternatives_table_measures_aftune_and_cites_the_others(smoke):
  rows = res.read_csv(smoke / "table8_alternatives.csv")
  assert len(rows) == 4 and all(r["source"] for r in rows)
  ours = rows[0]
  centre = res.centre_of(smoke / "results")
  tag = "_".join(f"{k.replace('_', '')}{centre[k]}" for k in ("B_S", "B_L", "I_C", "I_A"))
  rec, ver = _point(smoke, "record", f"lm_{tag}"), _point(smoke, "verify", f"lm_{tag}")
  assert _close(ours["recorded_over_plain_step"], rec["recorded_over_plain_paired"])
  assert _close(ours["verify_over_train_per_cell"], ver["median_verify_over_train"])
  assert int(ours["client_bytes"]) == ver["client_bytes_commitment"] + ver["client_bytes_job_spec"]
  assert "arXiv 2409.03992" in rows[2]["source"] and "arXiv 2404.16109" in rows[3]["source"]


def test_rerun_skips_valid_results_and_a_corrupt_file_exits_2(smoke, tmp_path):
  out = tmp_path / "copy"
  shutil.copytree(smoke / "results", out / "results")
  r = _make_all(out, "--only", "alternatives")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "0 points run" in r.stderr
  assert (out / "table8_alternatives.csv").read_text() == (
      smoke / "table8_alternatives.csv").read_text()
  victim = sorted((out / "results" / "record").glob("lm_*.jsonl"))[0]
  broken = victim.read_text().splitlines()[:-1]  # the completion marker cut off
  victim.write_text("\n".join(broken) + "\n")
  before = victim.read_bytes()
  r = _make_all(out, "--only", "overhead")
  assert r.returncode == 2
  assert str(victim) in r.stderr and "incomplete" in r.stderr
  assert victim.read_bytes() == before  # never overwritten


def test_results_files_reject_what_they_cannot_vouch_for(tmp_path):
  path = tmp_path / "e" / "p.jsonl"
  res.write_point(path, experiment="e", point="p", sheet={"a": 1}, rows=[{"x": 1.5, "kind": "k"}])
  assert res.read_point(path, {"a": 1}) == [{"x": 1.5, "kind": "k"}]
  assert res.read_point(tmp_path / "absent.jsonl") is None
  with pytest.raises(res.ResultsError, match="another run sheet"):
    res.read_point(path, {"a": 2})
  lines = path.read_text().splitlines()
  path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # a row lost
  with pytest.raises(res.ResultsError, match="counts 1 rows"):
    res.read_point(path)
  path.write_text("{not json\n")
  with pytest.raises(res.ResultsError, match=str(path)):
    res.read_point(path)
  header = json.loads(json.dumps({res.KIND: "header", "sheet": {"a": 1}, "sheet_hash": "0"}))
  path.write_text(json.dumps(header) + "\n" + json.dumps({res.KIND: "done", "rows": 0,
                                                          "sheet_hash": "0"}) + "\n")
  with pytest.raises(res.ResultsError, match="does not match its sheet"):
    res.read_point(path)


def test_sweeps_vary_one_setting_at_a_time():
  from paper_figures import pipeline  # pylint: disable=g-import-not-at-top
  centre = {"B_S": 4, "B_L": 2, "I_C": 2, "I_A": 1}
  s = pipeline.sweep_settings(centre, {"B_S": (2, 4), "I_A": (1, 3)}, pairs=((2, 2),))
  assert s == [centre, {**centre, "B_S": 2}, {**centre, "I_A": 3}, {**centre, "I_A": 2}]
