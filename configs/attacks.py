"""Attack-suite run sheets (`experiments.attack_eval`).

  python -m experiments.attack_eval --config configs/attacks.py:small --out /tmp/attacks

Variants:
  small   the smoke decoder widened to 4 layers, 16 steps (B_S=2, B_L=2: a 4 x 8 grid of 32
          cells), every attack of aftune/attacks/suite.py, 5 strategies x 3 sampling rates
          x 300 draws: the whole table on CPU in ~10 minutes on 2 cores.
  smoke   3 attacks, 2 rates, 150 draws on the 3 x 4 smoke grid: the CI agreement test.
  paper   the paper's grid (Llama-3.1-8B, B_L=4, B_S=8); set --config.train.model.hf_path.

Attacks are "name:strength" (aftune/attacks/suite.build_attack): a fraction for skip_steps,
stop_early, learning_rate, substitute_data, poison_data, layer_substitution; a step for
reorder; a layer block for final_edit and forged_forward.
"""

import ml_collections

from configs import finetune


def get_config(variant: str = "small") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = finetune.get_config("smoke")
  c.train.num_steps = 16
  c.train.audit.steps_per_block = 2
  c.train.audit.units_per_block = 2
  c.train.audit.checkpoint_interval = 1
  c.train.model.num_layers = 4
  c.mode = "exact"  # exact | tolerance: how every cell is verified
  c.strategies = ("uniform", "input_only", "output_only", "stratified", "guarantee")
  c.rates = (0.05, 0.1, 0.25)  # fraction of the population drawn
  c.guarantee_ps = (0.5, 0.9)  # the guarantee strategy: P(detect) promised if >= 2 cells tampered
  c.draws = 300  # independent challenges per (attack, strategy, rate)
  c.sims = 20000  # stratified: draws of the simulated prediction
  c.attacks = (
      "skip_steps:0.25", "skip_steps:0.5", "stop_early:0.25", "learning_rate:0.25",
      "schedule:0", "substitute_data:0.1", "poison_data:0.05", "reorder:5", "base_model:0",
      "layer_substitution:0.75", "layer_substitution:1.0", "final_edit:1",
      "forged_forward:0", "adaptive_middle:0")
  c.economics_rates = (0.05, 0.1, 0.25)
  c.success = True  # attack success beside detection (aftune/attacks/edits.py), text models
  if variant == "small":
    pass
  elif variant == "smoke":
    c.train = finetune.get_config("smoke")
    c.train.num_steps = 8
    c.train.audit.checkpoint_interval = 1
    c.attacks = ("skip_steps:0.25", "substitute_data:0.1", "adaptive_middle:0")
    c.rates = (0.1, 0.25)
    c.draws = 150
    c.sims = 4000
    c.success = False  # tests/test_attack_success.py covers it
  elif variant == "paper":
    c.train = finetune.get_config("llama3_8b")
    c.train.audit.units_per_block = 4
    c.train.audit.steps_per_block = 8
    c.draws = 1000
  else:
    raise ValueError(f"unknown variant {variant!r}: small, smoke, paper")
  return c
