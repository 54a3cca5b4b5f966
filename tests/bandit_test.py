"""The bandit check on a reduced config, and the bandit's exact metrics."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bandit
from experiments import common
from experiments.configs import bandit as bandit_config
from infalign_jax import calibration
from infalign_jax import transforms

# The reduced run (K = 128, 250 steps) still lands within the full check's
# tolerance; its largest error was 0.0036 at 300 steps when written.
_REDUCED_TOLERANCE = 0.01


def _reduced_config():
  config = bandit_config.get_config()
  config.num_responses = 128
  config.table_size = 2048
  config.num_samples = 32
  config.num_steps = 250
  config.learning_rate = 0.2
  config.log_every = 125
  config.save_every = 125
  config.tolerance = _REDUCED_TOLERANCE
  return config


def test_reduced_bandit_matches_analysis(tmp_path):
  config = _reduced_config()
  summary = common.run_experiment(bandit.run, config, str(tmp_path))
  assert summary['final_step'] == config.num_steps
  rows = {row['name']: row for row in summary['rows']}
  assert set(rows) == {'identity', 'exp_bon4', 'neg_exp_won4'}
  for name, row in rows.items():
    for metric in row['checked_metrics']:
      assert row['errors'][metric] <= _REDUCED_TOLERANCE, (name, metric, row)
  assert summary['passed']
  report = json.loads((tmp_path / bandit.REPORT_JSON).read_text())
  assert report['passed']
  assert (
      '| exp_bon4 | 0.2 | bon_win_rate |'
      in (tmp_path / bandit.REPORT_MARKDOWN).read_text()
  )
  # Periodic saves: a killed run resumes from step 125, not from 0.
  for name in rows:
    saved = sorted(
        int(path.name)
        for path in (tmp_path / name / 'checkpoints').iterdir()
        if path.name.isdigit()
    )
    assert saved == [125, 250], (name, saved)
  assert not list(tmp_path.glob('.*tmp*'))
  written = json.loads((tmp_path / common.SUMMARY_FILE).read_text())
  assert written['final_params_sha256'] == summary['final_params_sha256']

  # Running again restores every method from its final checkpoint.
  again = common.run_experiment(bandit.run, config, str(tmp_path))
  assert again['final_params_sha256'] == summary['final_params_sha256']


def test_identity_prediction_matches_closed_form():
  # lambda = 1 / beta = 5: KL = 0.650117 and W_1 = 0.806784.
  identity = transforms.make_transform('identity')
  prediction = bandit.calibrated_space_prediction(identity, 0.2, n=4)
  np.testing.assert_allclose(prediction['kl'], 0.650117, atol=1e-5)
  np.testing.assert_allclose(prediction['win_rate'], 0.806784, atol=1e-5)


def test_exact_metrics_of_best_of_n_policy():
  # Best-of-N of pi_ref, on many equal atoms: KL -> log N - (N - 1) / N and
  # the standard win rate -> N / (N + 1).
  num_responses, n = 2000, 4
  rewards = np.arange(num_responses, dtype=np.float64)[None]
  log_ref = np.full((1, num_responses), -np.log(num_responses))
  cdf = np.arange(1, num_responses + 1) / num_responses
  bon = cdf**n - (cdf - 1 / num_responses) ** n
  metrics = bandit.exact_metrics(np.log(bon)[None], log_ref, rewards, n=n)
  np.testing.assert_allclose(metrics['kl'], np.log(n) - (n - 1) / n, atol=2e-3)
  np.testing.assert_allclose(metrics['win_rate'], n / (n + 1), atol=1e-3)
  same = bandit.exact_metrics(log_ref, log_ref, rewards, n=n)
  for name in ('win_rate', 'bon_win_rate', 'won_win_rate'):
    np.testing.assert_allclose(same[name], 0.5, atol=1e-12)
  np.testing.assert_allclose(same['kl'], 0.0, atol=1e-12)


def test_table_gives_exact_calibrated_rewards():
  problem = bandit.make_problem(
      num_prompts=2, num_responses=16, table_size=64, concentration=1.0, seed=0
  )
  from_table = calibration.calibrated_rewards(
      jnp.asarray(problem.rewards), jnp.asarray(problem.sorted_ref_rewards)
  )
  np.testing.assert_allclose(from_table, problem.calibrated, atol=1e-7)
  assert problem.ref_counts.min() >= 1
  np.testing.assert_array_equal(problem.ref_counts.sum(1), [64, 64])


def test_make_problem_rejects_small_table():
  with pytest.raises(ValueError, match='table_size'):
    bandit.make_problem(
        num_prompts=1, num_responses=8, table_size=4, concentration=1.0, seed=0
    )
