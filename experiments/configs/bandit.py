r"""The bandit check: a categorical policy trained with CTRL, against theory.

  python -m experiments.main --config=experiments/configs/bandit.py \
      --workdir=runs/bandit

Writes runs/bandit/bandit_report.md and bandit_report.json: for each method
(identity, exp for best-of-4, neg_exp for worst-of-4), the trained policy's
exact KL and win rates beside the calibrated-space prediction. The check
passes when every checked metric is within `tolerance` of the prediction.
`--config=experiments/configs/bandit.py:smoke` runs 20 steps per method, to
check the wiring (the comparison is then not expected to pass).
"""

import ml_collections

_ALL_METRICS = ('kl', 'win_rate', 'bon_win_rate', 'won_win_rate')


def _method(name, transform, transform_params, beta, checked_metrics):
  method = ml_collections.ConfigDict()
  # Name of the method, also the sub-directory of its training stage.
  method.name = name
  # Transform name for infalign_jax.transforms.make_transform.
  method.transform = transform
  # Keyword parameters of the transform.
  method.transform_params = transform_params
  # KL weight beta.
  method.beta = beta
  # Metrics compared with the prediction against `tolerance`.
  method.checked_metrics = checked_metrics
  return method


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  """Return the bandit config; variant 'smoke' shrinks it to 20 steps."""
  if variant not in ('', 'smoke'):
    raise ValueError(
        f"Unknown bandit config variant {variant!r}; use '' or 'smoke'."
    )
  smoke = variant == 'smoke'

  config = ml_collections.ConfigDict()

  # Module in experiments/ that runs this config.
  config.experiment = 'bandit'
  # Whether the ':smoke' variant built this config (20 steps per method).
  config.smoke = smoke
  # Seed of the rewards, reference policy and training keys.
  config.seed = 0
  # P, the number of prompts; every step uses all of them.
  config.num_prompts = 8
  # K, responses per prompt. Each pi_ref atom has mass about 1 / K, which
  # sets the gap between the discrete optimum and the continuous analysis.
  config.num_responses = 256
  # M, calibration table entries per prompt; pi_ref masses are multiples of
  # 1 / M, so the table gives the exact calibrated reward.
  config.table_size = 4096
  # Dirichlet concentration of the reference masses (smaller: more uneven).
  config.ref_concentration = 2.0
  # S, policy samples per prompt and step.
  config.num_samples = 64
  # Number of RL steps per method.
  config.num_steps = 1500
  # Peak Adam learning rate on the logits, decayed by a cosine schedule.
  config.learning_rate = 0.1
  # Final learning rate as a fraction of the peak.
  config.final_lr_fraction = 0.0
  # Adam first-moment decay.
  config.adam_b1 = 0.9
  # Adam second-moment decay.
  config.adam_b2 = 0.999
  # RL algorithm: 'reinforce' or 'ppo'.
  config.algorithm = 'reinforce'
  # KL estimator, applied to the sequence log ratio.
  config.kl_estimator = 'k1'
  # KL placement: 'reward' or 'loss'.
  config.kl_placement = 'reward'
  # PPO inner epochs (used only with algorithm='ppo').
  config.ppo_epochs = 4
  # PPO clip range (used only with algorithm='ppo').
  config.clip_epsilon = 0.2
  # N of best-of-N and worst-of-N in the report.
  config.n = 4
  # Largest allowed |trained - predicted| for each checked metric.
  config.tolerance = 0.01
  # Log and write metrics every this many steps.
  config.log_every = 500
  # Save a checkpoint every this many steps (and at the last step), so a
  # killed run loses at most this many steps of the current method.
  config.save_every = 250

  # The methods to train and check.
  config.methods = [
      _method('identity', 'identity', {}, 0.2, _ALL_METRICS),
      _method(
          'exp_bon4', 'exp', {'t': 6.0, 'normalize': True}, 0.2, _ALL_METRICS
      ),
      _method('neg_exp_won4', 'neg_exp', {'t': 6.0}, 0.1, _ALL_METRICS),
  ]
  if smoke:
    config.num_steps = 20
    config.log_every = 10
    config.save_every = 10
  return config
