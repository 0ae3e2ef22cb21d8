r"""The main job: audited fine-tune of the built-in default, then challenge, open, verify.

  python -m experiments.demo --workdir workdirs/demo

Prints the verdict (PASS expected) in a few minutes on 2 CPU cores; every file the three
roles exchange is left in <workdir>/audit/.
"""

import json
import sys
from pathlib import Path
from typing import Any

import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from aftune import errors
from aftune.audit import challenge_doc
from aftune.audit import client as audit
from aftune.audit import train_provider
from aftune.train import job as job_lib
from aftune.train import trainer as train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py:tiny", "Run sheet.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "The provider's workdir.")
_STRATEGY = flags.DEFINE_string("strategy", "stratified", "Challenge strategy.")


def run(config: ml_collections.ConfigDict, workdir: str | Path, *, strategy: str = "stratified",
        m: int | None = None) -> dict[str, Any]:
  """Trains with recording, then audits the run; returns the verdict.

  Args:
    config: a finetune config (record must be on).
    workdir: the provider's workdir; the audit files go to <workdir>/audit.
    strategy: challenge strategy.
    m: number of cells (strategy default if None).

  Returns:
    The verdict document (also written to <workdir>/audit/verdict.{json,md}).
  """
  workdir = Path(workdir)
  adir = workdir / "audit"
  adir.mkdir(parents=True, exist_ok=True)

  logging.info("[client] agreeing on the job (base model, data, hyperparameters, grid)")
  agreed = audit.agreed_fields(job_lib.build_job(config))
  (adir / "agreed.json").write_text(json.dumps(agreed, indent=2, sort_keys=True))

  logging.info("[provider] fine-tuning with recording")
  train.train(config, workdir)
  commitment = audit.load_commitment(workdir / "commitment.json")
  (adir / "commitment.json").write_text(json.dumps(commitment, indent=2, sort_keys=True))

  logging.info("[client] drawing the challenge after receiving root %s", commitment["merkle_root"][:16])
  ch = audit.draw(commitment, strategy, m=m)
  ch_path = adir / "challenge.json"
  if ch_path.exists():
    ch_path.unlink()  # a rerun of the demo draws afresh
  challenge_doc.save_challenge(ch, ch_path)
  logging.info("[client] %d cells: %s", len(ch.cells), list(ch.cells))

  logging.info("[provider] opening the challenged cells")
  bdir = adir / "bundles"
  for old in bdir.glob("*.bundle"):
    old.unlink()
  paths = train_provider.Provider(workdir).open_challenge([tuple(c) for c in ch.cells], bdir)

  logging.info("[verifier] authenticating and replaying %d cells", len(paths))
  verdict = audit.verify_openings(paths, commitment=audit.load_commitment(adir / "commitment.json"),
                                  challenge=challenge_doc.load_challenge(ch_path), agreed=agreed)
  audit.write_verdict(verdict, adir / "verdict.json", adir / "verdict.md")
  return verdict


def main(argv):
  del argv
  with errors.exit_on_input_error():
    verdict = run(_CONFIG.value, _WORKDIR.value, strategy=_STRATEGY.value)
  print(audit.render_markdown(verdict))
  print(f"files: {_WORKDIR.value}/audit/")
  sys.exit(0 if verdict["passed"] else 1)


if __name__ == "__main__":
  app.run(main)
