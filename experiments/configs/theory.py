r"""The analytical tool: win rate against KL in calibrated space.

  python -m experiments.main --config=experiments/configs/theory.py \
      --workdir=runs/theory

Writes win-rate-versus-KL curves for best-of-N and worst-of-N under the
workdir: identity, log, exp and neg_exp transforms at several t, and the
fixed-point optimum. It also writes the t chosen for each KL budget and the
best-of-N point of each N, as CSV and JSON files and PNG plots. Nothing is
trained; it takes about 25 s of CPU time.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Return the theory experiment config."""
  config = ml_collections.ConfigDict()
  # Module in experiments/ that runs this config.
  config.experiment = 'theory'
  # Inference-time procedures to analyse ('bon' best-of-N, 'won' worst-of-N).
  config.procedures = ('bon', 'won')
  # N values of the procedures.
  config.ns = (2, 4, 8, 16)
  # t values of the exp and neg_exp transforms drawn as curves.
  config.ts = (1.0, 5.0, 10.0, 20.0)
  # KL budgets (nats) for the table of chosen t.
  config.kl_budgets = (0.1, 0.25, 0.5, 1.0, 2.0)
  # Each transform's curve spans KL from kl_min to kl_max (nats).
  config.kl_min = 0.01
  # Upper end of the KL range of every curve and plot (nats).
  config.kl_max = 3.0
  # Points per transform curve (betas, log-spaced over the KL range).
  config.num_betas = 60
  # Betas of the fixed-point optimum curve, log-spaced in this range.
  config.optimal_beta_min = 0.002
  # Upper end of the fixed-point optimum's beta range.
  config.optimal_beta_max = 3.0
  # Points on the fixed-point optimum curve.
  config.num_optimal_betas = 12
  # Grid nodes in calibrated space for curves and the fixed point.
  config.num_points = 4097
  # Lowest and highest t searched by choose_t.
  config.t_range = (0.1, 200.0)
  return config
