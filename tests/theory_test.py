"""Runs the theory experiment on a reduced config and checks its outputs."""

import csv
import json
import math
import os
import tempfile

from absl.testing import absltest
import jax

from experiments import common
from experiments import theory
from experiments.configs import theory as theory_config


def _small_config():
  config = theory_config.get_config()
  config.ns = (2, 4)
  config.ts = (5.0,)
  config.kl_budgets = (0.5,)
  config.num_betas = 6
  config.num_optimal_betas = 2
  config.num_points = 513
  return config


class TheoryExperimentTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    # Compilation dominates this run; the flag cuts it and is restored after.
    previous = jax.config.values['jax_disable_most_optimizations']
    jax.config.update('jax_disable_most_optimizations', True)
    self.addCleanup(
        jax.config.update, 'jax_disable_most_optimizations', previous
    )

  def test_outputs(self):
    workdir = self.enter_context(tempfile.TemporaryDirectory())
    summary = common.run_experiment(theory.run, _small_config(), workdir)

    self.assertEqual(summary['final_step'], 0)
    self.assertIsNone(summary['final_params_sha256'])
    for path in summary['outputs'].values():
      self.assertTrue(os.path.getsize(path) > 0, path)
    expected_files = {
        'curves.csv',
        'curves.json',
        'chosen_t.csv',
        'chosen_t.json',
        'bon_points.json',
        'tradeoff_standard.png',
        'tradeoff_bon.png',
        'tradeoff_won.png',
        'config.json',
        'summary.json',
    }
    self.assertEqual(set(os.listdir(workdir)), expected_files)

    with open(os.path.join(workdir, 'curves.csv')) as f:
      rows = list(csv.DictReader(f))
    methods = {r['method'] for r in rows}
    self.assertEqual(
        methods, {'identity', 'log', 'exp_t5', 'neg_exp_t5', 'optimal'}
    )
    for row in rows:
      self.assertBetween(float(row['win_rate']), 0.0, 1.0)
      self.assertGreaterEqual(float(row['kl']), -1e-12)

    with open(os.path.join(workdir, 'chosen_t.json')) as f:
      chosen = json.load(f)
    self.assertLen(chosen, 4)  # {bon, won} x N in {2, 4} x one budget.
    for row in chosen:
      self.assertIn(row['at_limit'], (None, 'low', 'high'))
      # The chosen exponential transform beats the identity at equal KL.
      self.assertGreaterEqual(row['win_rate'], row['win_rate_identity'])

    with open(os.path.join(workdir, 'bon_points.json')) as f:
      points = json.load(f)
    for point in points:
      n = point['n']
      self.assertAlmostEqual(point['kl'], math.log(n) - (n - 1) / n)
      self.assertAlmostEqual(point['win_rate_standard'], n / (n + 1))
      # The analysis must match the closed forms within 1e-5 at the
      # config's grid size.
      self.assertAlmostEqual(point['kl_analysis'], point['kl'], delta=1e-5)
      self.assertAlmostEqual(
          point['win_rate_standard_analysis'], n / (n + 1), delta=1e-5
      )
      self.assertAlmostEqual(point['win_rate_bon'], n / (n + 1), delta=1e-5)

    with open(os.path.join(workdir, 'tradeoff_bon.png'), 'rb') as f:
      self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')


if __name__ == '__main__':
  jax.config.update('jax_numpy_rank_promotion', 'raise')
  absltest.main()
