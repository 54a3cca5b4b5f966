"""Tests for infalign_jax.procedures against brute-force enumeration."""

import functools
import itertools

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import procedures

_VARIANTS = (('eager', lambda f: f), ('jit', jax.jit))


def _compare(a, b):
  return float(a > b) + 0.5 * float(a == b)


def _enumerated_win(policy_row, ref_row, procedure, n):
  """Average comparison over every n-subset pair, by enumeration."""
  pick = max if procedure in ('bon', 'standard') else min
  policy_outputs = [pick(s) for s in itertools.combinations(policy_row, n)]
  ref_outputs = [pick(s) for s in itertools.combinations(ref_row, n)]
  total = sum(_compare(a, b) for a in policy_outputs for b in ref_outputs)
  return total / (len(policy_outputs) * len(ref_outputs))


class SelectionTest(parameterized.TestCase):

  @parameterized.named_parameters(*_VARIANTS)
  def test_tie_rule_lowest_index(self, variant):
    rewards = jnp.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    index, value = variant(procedures.best_of_n)(rewards)
    np.testing.assert_array_equal(index, [1, 0])
    np.testing.assert_array_equal(value, [3.0, 2.0])
    index, value = variant(procedures.worst_of_n)(
        jnp.array([[1.0, 0.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    )
    np.testing.assert_array_equal(index, [1, 0])
    np.testing.assert_array_equal(value, [0.0, 2.0])

  def test_select_dispatch(self):
    rewards = jnp.array([[0.5, -1.0, 2.0]])
    np.testing.assert_array_equal(procedures.select(rewards, 'bon')[0], [2])
    np.testing.assert_array_equal(procedures.select(rewards, 'won')[0], [1])
    with self.assertRaisesRegex(ValueError, "Unknown procedure 'best'"):
      procedures.select(rewards, 'best')

  def test_rejects_bad_rewards(self):
    with self.assertRaisesRegex(ValueError, 'rewards contains 1 non-finite'):
      procedures.best_of_n(np.array([[1.0, np.nan]]))
    with self.assertRaisesRegex(ValueError, 'N >= 1'):
      procedures.worst_of_n(np.zeros((2, 0)))
    with self.assertRaisesRegex(ValueError, 'rank 2'):
      procedures.best_of_n(np.zeros(3))


class OrderStatisticWeightsTest(parameterized.TestCase):

  def test_by_hand(self):
    np.testing.assert_allclose(
        procedures.order_statistic_weights(4, 2, 'bon'),
        np.array([0, 1, 2, 3]) / 6,
    )
    np.testing.assert_allclose(
        procedures.order_statistic_weights(4, 2, 'won'),
        np.array([3, 2, 1, 0]) / 6,
    )
    np.testing.assert_allclose(
        procedures.order_statistic_weights(5, 1), np.full(5, 0.2)
    )
    np.testing.assert_array_equal(
        procedures.order_statistic_weights(3, 3), [0.0, 0.0, 1.0]
    )

  def test_sums_to_one_for_large_s(self):
    weights = procedures.order_statistic_weights(2000, 16, 'bon')
    self.assertAlmostEqual(weights.sum(), 1.0, delta=1e-12)

  def test_rejects_s_below_n(self):
    with self.assertRaisesRegex(ValueError, 'num_samples must be an integer'):
      procedures.order_statistic_weights(3, 4)


class WinRateTest(parameterized.TestCase):

  @parameterized.named_parameters(*_VARIANTS)
  def test_standard_by_hand(self, variant):
    policy = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    ref = jnp.array([[2.0, 0.0, 3.0], [0.0, 1.0, -1.0]])
    per_prompt = variant(procedures.win_rate_per_prompt)(policy, ref)
    # Prompt 0: 1 beats 0 (1); 2 beats 0, ties 2 (1.5). 2.5 / 6.
    # Prompt 1: each 0 beats -1, ties 0: 1.5 per sample. 3 / 6.
    np.testing.assert_allclose(per_prompt, [2.5 / 6, 0.5], atol=1e-7)
    estimate, standard_error = variant(procedures.win_rate)(policy, ref)
    self.assertAlmostEqual(float(estimate), (2.5 / 6 + 0.5) / 2, delta=1e-7)
    expected_se = np.std([2.5 / 6, 0.5], ddof=1) / np.sqrt(2)
    self.assertAlmostEqual(float(standard_error), expected_se, delta=1e-7)

  @parameterized.parameters(
      ('standard', 1), ('bon', 2), ('bon', 3), ('won', 2), ('won', 4)
  )
  def test_matches_enumeration_with_ties(self, procedure, n):
    rng = np.random.default_rng(n)
    policy = rng.integers(0, 4, size=(3, 6)).astype(np.float32)
    ref = rng.integers(0, 4, size=(3, 5)).astype(np.float32)
    ref[2] = 1.0  # An all-equal row.
    estimate_fn = jax.jit(
        functools.partial(
            procedures.win_rate_per_prompt, procedure=procedure, n=n
        )
    )
    got = estimate_fn(policy, ref)
    for b in range(3):
      self.assertAlmostEqual(
          float(got[b]),
          _enumerated_win(policy[b], ref[b], procedure, n),
          delta=1e-6,
          msg=f'prompt {b}',
      )

  def test_n_equals_sample_count(self):
    # With S = M = n the estimator compares the two sample maxima.
    policy = np.array([[0.0, 5.0, 1.0]])
    ref = np.array([[4.0, 2.0, 5.0]])
    self.assertAlmostEqual(
        float(procedures.win_rate_per_prompt(policy, ref, 'bon', 3)[0]), 0.5
    )
    self.assertAlmostEqual(
        float(procedures.win_rate_per_prompt(policy, ref, 'won', 3)[0]), 0.0
    )

  def test_single_prompt_standard_error_is_nan(self):
    _, standard_error = procedures.win_rate(np.zeros((1, 2)), np.ones((1, 2)))
    self.assertTrue(np.isnan(float(standard_error)))

  def test_float64(self):
    with jax.enable_x64(True):
      policy = jnp.array([[1.0 + 1e-12, 1.0]], jnp.float64)
      ref = jnp.array([[1.0]], jnp.float64)
      got = procedures.win_rate_per_prompt(policy, ref)
      self.assertEqual(got.dtype, jnp.float64)
      self.assertAlmostEqual(float(got[0]), 0.75, delta=1e-15)

  def test_continuous_bon_approaches_closed_form(self):
    # Policy rewards are maxima of 4 uniform draws, so the policy CDF is
    # Q = u^4 and W_BoN,2 = 1 - 2 * integral of Q^2 u du = 1 - 2/10 = 0.8.
    rng = np.random.default_rng(0)
    ref = rng.uniform(size=(200, 64))
    policy = rng.uniform(size=(200, 64, 4)).max(-1)
    estimate, standard_error = procedures.win_rate(policy, ref, 'bon', 2)
    self.assertAlmostEqual(
        float(estimate), 0.8, delta=4 * float(standard_error)
    )
    self.assertLess(float(standard_error), 0.01)

  # Few distinct shapes, so that eager dispatch compiles only a few times.
  @hypothesis.settings(max_examples=25, deadline=None)
  @hypothesis.given(
      policy=hnp.arrays(
          np.float32, (2, 5), elements=st.integers(-3, 3).map(float)
      ),
      ref=hnp.arrays(
          np.float32, (2, 4), elements=st.integers(-3, 3).map(float)
      ),
      procedure_and_n=st.sampled_from(
          [('standard', 1), ('bon', 2), ('won', 3), ('bon', 4)]
      ),
  )
  def test_symmetric(self, policy, ref, procedure_and_n):
    procedure, n = procedure_and_n
    forward = procedures.win_rate_per_prompt(policy, ref, procedure, n)
    backward = procedures.win_rate_per_prompt(ref, policy, procedure, n)
    np.testing.assert_allclose(forward + backward, np.ones(2), atol=1e-6)
    self.assertTrue(np.all((forward >= 0) & (forward <= 1)))

  @parameterized.named_parameters(
      ('s_below_n', (2, 3), (2, 8), 'bon', 4, 'S=3 policy and M=8'),
      ('m_below_n', (2, 8), (2, 3), 'won', 4, 'at least n samples'),
      ('standard_n', (2, 3), (2, 3), 'standard', 2, 'n must be 1'),
      ('unknown', (2, 3), (2, 3), 'median', 1, "Unknown procedure 'median'"),
      ('n_zero', (2, 3), (2, 3), 'bon', 0, 'n must be an integer >= 1'),
      ('batch', (2, 3), (3, 3), 'standard', 1, 'Batch sizes differ'),
      ('rank', (3,), (2, 3), 'standard', 1, 'policy_rewards must have rank 2'),
      ('no_prompts', (0, 2), (0, 2), 'standard', 1, 'B=0 prompts'),
  )
  def test_bad_input(self, policy_shape, ref_shape, procedure, n, message):
    with self.assertRaisesRegex(ValueError, message):
      procedures.win_rate(
          np.zeros(policy_shape), np.zeros(ref_shape), procedure, n
      )

  @parameterized.parameters(('standard', 1), ('bon', 3), ('won', 3))
  def test_all_wins_is_exactly_one_in_float32(self, procedure, n):
    # A float32 cumsum of 1e5 weights of 1e-5 ends near 1 + 2e-7.
    rng = np.random.default_rng(0)
    policy = rng.random((2, 7)).astype(np.float32) + 2.0
    ref = rng.random((2, 100_000)).astype(np.float32)
    win, _ = procedures.win_rate(policy, ref, procedure, n)
    lose, _ = procedures.win_rate(ref, policy, procedure, n)
    self.assertEqual(float(win), 1.0)
    self.assertEqual(float(lose), 0.0)

  def test_rejects_nan(self):
    with self.assertRaisesRegex(ValueError, 'ref_rewards contains'):
      procedures.win_rate(np.zeros((1, 2)), np.array([[0.0, np.inf]]))


if __name__ == '__main__':
  jax.config.update('jax_numpy_rank_promotion', 'raise')
  absltest.main()
