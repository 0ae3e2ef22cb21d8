r"""Every figure and table of the evaluation, from fresh runs, in one command.

  python -m paper_figures.make_all --scale small --out paper_figures/out   # ~20 min, 2 cores
  python -m paper_figures.make_all --scale smoke --out /tmp/figs           # ~1-2 min (CI test)
  python -m paper_figures.make_all --sheet configs/figures.py:paper --out /data/figs \
      --sheet.lm.model.hf_path=/models/Meta-Llama-3.1-8B-Instruct \
      --sheet.attacks.train.model.hf_path=/models/Meta-Llama-3.1-8B-Instruct \
      --sheet.vision.model.hf_path=/models/vit-large-patch16-224 \
      --sheet.vision.data.train_path=/data/mini-imagenet                # a GPU host

Runs every experiment point of the run sheet (`configs/figures.py`) that `--out/results`
does not hold yet (`paper_figures.pipeline`: a progress line per point, with ETA), then
draws each figure from the results (`paper_figures.fig_*`, `table_*`). Rerunning resumes:
valid results are skipped; a results file that is not valid stops the run with one error
naming it (exit 2) and is left as it is. `--only overhead,storage` makes those figures and
runs only the experiments they read.
"""

import sys
import time
from pathlib import Path

from absl import app
from absl import flags
from ml_collections import config_flags

from aftune import errors
from paper_figures import fig_detection
from paper_figures import fig_inference
from paper_figures import fig_overhead
from paper_figures import fig_perturbation
from paper_figures import fig_storage
from paper_figures import fig_verify
from paper_figures import pipeline
from paper_figures import table_alternatives
from paper_figures import table_detection

FIGURES = {"overhead": fig_overhead, "storage": fig_storage, "verify": fig_verify,
           "detection": fig_detection, "detection_table": table_detection,
           "inference": fig_inference, "perturbation": fig_perturbation,
           "alternatives": table_alternatives}

_SCALE = flags.DEFINE_enum("scale", "small", ["smoke", "small", "paper"],
                           "Run sheet configs/figures.py:<scale> (unless --sheet).")
_SHEET = config_flags.DEFINE_config_file("sheet", None, "A run sheet (overrides --scale).",
                                         lock_config=True)
_OUT = flags.DEFINE_string("out", "paper_figures/out", "Output directory (results/ inside).")
_ONLY = flags.DEFINE_list("only", [], f"Figures to make: {', '.join(FIGURES)} (default all).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = sorted(set(_ONLY.value) - set(FIGURES))
  if unknown:
    raise app.UsageError(f"unknown figures {unknown}: {', '.join(FIGURES)}")
  if _SHEET.value is not None:
    sheet = _SHEET.value
  else:
    from configs import figures  # pylint: disable=g-import-not-at-top
    sheet = figures.get_config(_SCALE.value)
  from aftune.train import trainer  # pylint: disable=g-import-not-at-top
  trainer.apply_platform(sheet.lm)  # threads, GPU flags: before JAX starts
  out = Path(_OUT.value)
  names = _ONLY.value or list(FIGURES)
  needed = tuple(sorted({e for n in names for e in FIGURES[n].EXPERIMENTS}))
  t0 = time.perf_counter()
  with errors.exit_on_input_error():
    done = pipeline.run(sheet, out, only=needed)
    t_runs = time.perf_counter() - t0
    written = []
    for n in names:
      written += FIGURES[n].make(out)
      print(f"figure {n}: " + ", ".join(str(p) for p in written[-3:] if p.stem.startswith(
          FIGURES[n].NAME)), file=sys.stderr, flush=True)
  print(f"{done['ran']} points run, {done['skipped']} reused; experiments {t_runs:.0f}s, "
        f"total {time.perf_counter() - t0:.0f}s", file=sys.stderr)
  for p in written:
    print(p)


if __name__ == "__main__":
  app.run(main)
