"""Tests for infalign_jax.analysis against closed forms and NumPy quadrature."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from infalign_jax import analysis
from infalign_jax import transforms

# Small grid for tests that compare methods with each other rather than with
# closed forms; it keeps compilation and iteration fast.
_SMALL = 1025


def _identity_closed_form(lam):
  """KL and W_1 of q ∝ exp(lam u) on [0, 1], without overflow."""
  win = 1.0 / -math.expm1(-lam) - 1.0 / lam
  # log(lam / (e^lam - 1)) = log(lam) - lam - log(1 - e^-lam).
  kl = math.log(lam) - lam - math.log(-math.expm1(-lam)) + lam * win
  return kl, win


def _simpson(values, x):
  """Composite Simpson rule on an odd number of equally spaced points."""
  h = x[1] - x[0]
  return (
      h
      / 3
      * (
          values[0]
          + values[-1]
          + 4 * values[1:-1:2].sum()
          + 2 * values[2:-1:2].sum()
      )
  )


class ClosedFormTest(parameterized.TestCase):

  def test_identity_at_lambda_5(self):
    self.assertAlmostEqual(analysis.kl('identity', 0.2), 0.650117, delta=1e-6)
    self.assertAlmostEqual(
        analysis.win_rate('identity', 0.2), 0.806784, delta=1e-6
    )

  @parameterized.parameters(0.5, 2.0, 5.0, 20.0, 100.0)
  def test_identity(self, lam):
    kl, win = _identity_closed_form(lam)
    self.assertAlmostEqual(analysis.kl('identity', 1.0 / lam), kl, delta=1e-5)
    self.assertAlmostEqual(
        analysis.win_rate('identity', 1.0 / lam), win, delta=1e-5
    )

  @parameterized.parameters(2, 4, 8, 16)
  def test_log_transform_is_best_of_n(self, n):
    predicted = analysis.predict('log', 1.0 / (n - 1), n)
    self.assertAlmostEqual(
        predicted['kl'], math.log(n) - (n - 1) / n, delta=1e-5
    )
    self.assertAlmostEqual(
        predicted['win_rate_standard'], n / (n + 1), delta=1e-5
    )
    # The BoN_n policy has CDF u^n, so its own best-of-n has CDF u^(n^2).
    self.assertAlmostEqual(predicted['win_rate_bon'], n / (n + 1), delta=1e-5)

  @parameterized.parameters(0.5, 1.0, 3.0)
  def test_power_family(self, a):
    # q = (a + 1) u^a is the log transform tilted at beta = 1 / a.
    expected_win = (a + 1) / (a + 2)
    for n in (2, 4, 8):
      predicted = analysis.predict('log', 1.0 / a, n)
      self.assertAlmostEqual(
          predicted['kl'], math.log(a + 1) - a / (a + 1), delta=1e-5
      )
      self.assertAlmostEqual(
          predicted['win_rate_standard'], expected_win, delta=1e-5
      )
      self.assertAlmostEqual(
          predicted['win_rate_bon'], expected_win, delta=1e-5
      )
      # Worst-of-n against NumPy Simpson quadrature of the same formula.
      u = np.linspace(0.0, 1.0, 200001)
      won = n * _simpson((1 - u ** (a + 1)) ** n * (1 - u) ** (n - 1), u)
      self.assertAlmostEqual(predicted['win_rate_won'], won, delta=1e-5)

  def test_no_tilt_is_reference(self):
    predicted = analysis.predict('identity', 1e9, 4)
    self.assertAlmostEqual(predicted['kl'], 0.0, delta=1e-9)
    for key in ('win_rate_standard', 'win_rate_bon', 'win_rate_won'):
      self.assertAlmostEqual(predicted[key], 0.5, delta=1e-6)

  def test_tilted_density_normalized(self):
    u, q = analysis.tilted_density(
        transforms.make_transform('exp', t=3.0), 0.5, num_points=_SMALL
    )
    self.assertAlmostEqual(np.trapezoid(q, u), 1.0, delta=1e-12)
    unnormalized = np.exp(np.exp(3.0 * u) / 0.5 - np.exp(3.0) / 0.5)
    np.testing.assert_allclose(
        q, unnormalized / np.trapezoid(unnormalized, u), rtol=1e-10
    )


class StabilityTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('exp', 'exp', {}),
      ('neg_exp', 'neg_exp', {}),
      ('exp_normalized', 'exp', {'normalize': True}),
  )
  def test_large_t_small_beta(self, name, params):
    transform = transforms.make_transform(name, t=200.0, **params)
    for beta in (1e-3, 1.0, 1e3):
      predicted = analysis.predict(transform, beta, 16, num_points=_SMALL)
      for key, value in predicted.items():
        self.assertTrue(np.isfinite(value), f'{key} at beta={beta}: {value}')
      self.assertBetween(predicted['win_rate_bon'], 0.0, 1.0)
      self.assertGreaterEqual(predicted['kl'], 0.0)

  @parameterized.parameters((20.0, 1e-4), (200.0, 1e-2))
  def test_spike_kl_matches_edge_exponential(self, t, tol):
    # Near u = 1 the density of exp(t u) at beta = 1e-3 is exponential with
    # rate lam = t e^t / beta (1e-13 and 1e-92 wide), so KL = log(lam) - 1
    # up to t / lam. The tolerance is the rounding of Phi near u = 1
    # (float64 nodes there are 1e-16 apart), not the grid; the old uniform
    # grid returned its ceiling log(2 * 16384) = 10.40 for both.
    transform = transforms.make_transform('exp', t=t)
    if t < 100:
      kl = analysis.kl(transform, 1e-3)
    else:
      # The 1e-92 wide density sits inside the outermost cell: warned.
      with self.assertLogs(level='WARNING') as logs:
        kl = analysis.kl(transform, 1e-3)
      self.assertIn('float64 rounding of Phi', logs.output[0])
    self.assertAlmostEqual(
        kl, math.log(t) + t - math.log(1e-3) - 1.0, delta=tol
    )
    self.assertAlmostEqual(
        analysis.win_rate(transform, 1e-3, 'bon', 4), 1.0, delta=1e-12
    )

  def test_normalized_exp_small_beta_matches_fine_quadrature(self):
    # (e^(t u) - 1) / (e^t - 1) with t = 200 at beta = 1e-3: in v = 1 - u,
    # log q = -(1 - e^(-t v)) / beta + const (to 1e-87), mass within 1e-4.
    t, beta = 200.0, 1e-3
    v = np.linspace(0.0, 0.05, 2_000_001)
    log_q = np.expm1(-t * v) / beta
    z = _simpson(np.exp(log_q), v)
    expected = _simpson(np.exp(log_q) / z * (log_q - math.log(z)), v)
    got = analysis.kl(
        transforms.make_transform('exp', t=t, normalize=True), beta
    )
    self.assertAlmostEqual(got, expected, delta=1e-6)

  @parameterized.parameters(1e3, 1e4)
  def test_identity_small_beta(self, lam):
    # The piecewise-linear log-density is exact for the identity.
    kl, win = _identity_closed_form(lam)
    self.assertAlmostEqual(analysis.kl('identity', 1 / lam), kl, delta=1e-10)
    self.assertAlmostEqual(
        analysis.win_rate('identity', 1 / lam), win, delta=1e-6
    )

  @parameterized.parameters(2, 16)
  def test_identity_small_beta_bon(self, n):
    # Q = (e^(lam u) - 1) / (e^lam - 1); W_BoN by Simpson on a fine grid.
    lam = 1000.0
    u = np.linspace(0.0, 1.0, 2_000_001)
    cdf = np.exp(lam * (u - 1.0)) * -np.expm1(-lam * u) / -math.expm1(-lam)
    expected = 1.0 - n * _simpson(cdf**n * u ** (n - 1), u)
    got = analysis.win_rate('identity', 1 / lam, 'bon', n)
    self.assertAlmostEqual(got, expected, delta=1e-6)


class CurvesTest(parameterized.TestCase):

  def test_vector_beta_matches_scalar(self):
    betas = np.array([0.05, 0.3, 2.0])
    curve = analysis.tradeoff_curve(
        transforms.make_transform('exp', t=4.0),
        betas,
        'bon',
        4,
        num_points=_SMALL,
    )
    for i, beta in enumerate(betas):
      win, kl = analysis.win_rate_and_kl(
          transforms.make_transform('exp', t=4.0),
          float(beta),
          'bon',
          4,
          num_points=_SMALL,
      )
      self.assertAlmostEqual(curve['win_rate'][i], win, delta=1e-12)
      self.assertAlmostEqual(curve['kl'][i], kl, delta=1e-12)

  def test_curve_monotone_in_beta(self):
    curve = analysis.tradeoff_curve(
        'identity', np.geomspace(1e-2, 1e2, 20), 'won', 4, num_points=_SMALL
    )
    self.assertTrue(np.all(np.diff(curve['kl']) < 0))
    self.assertTrue(np.all(np.diff(curve['win_rate']) < 0))

  def test_user_procedure_matches_named(self):
    transform = transforms.make_transform('exp', t=2.0)
    for name, g in (
        ('bon', lambda f: f**4),
        ('won', lambda f: 1 - (1 - f) ** 4),
    ):
      named = analysis.win_rate(transform, 0.3, name, 4, num_points=_SMALL)
      custom = analysis.win_rate(transform, 0.3, g, num_points=_SMALL)
      self.assertAlmostEqual(named, custom, delta=1e-12)


class BetaForKlTest(parameterized.TestCase):

  def test_identity_closed_form(self):
    kl, _ = _identity_closed_form(5.0)
    self.assertAlmostEqual(
        analysis.beta_for_kl('identity', kl), 0.2, delta=1e-5
    )

  @parameterized.parameters(('exp', 1.0), ('exp', 50.0), ('neg_exp', 20.0))
  def test_round_trip(self, name, t):
    transform = transforms.make_transform(name, t=t)
    for target in (0.1, 1.0, 2.0):
      beta = analysis.beta_for_kl(transform, target, num_points=_SMALL)
      self.assertAlmostEqual(
          analysis.kl(transform, beta, num_points=_SMALL), target, delta=1e-8
      )

  def test_rejects_unreachable(self):
    with self.assertRaisesRegex(ValueError, 'beyond what a float64 tilt'):
      analysis.beta_for_kl('identity', 800.0)
    # Phi flat on [1/2, 1]: as beta -> 0 the tilt tends to uniform on
    # [1/2, 1], so KL stays below log 2.
    with self.assertRaisesRegex(ValueError, 'cannot reach KL'):
      analysis.beta_for_kl(
          lambda u: jax.numpy.minimum(u, 0.5), 1.0, num_points=_SMALL
      )


class ChooseTTest(parameterized.TestCase):

  @parameterized.parameters(('bon', 'exp'), ('won', 'neg_exp'))
  def test_beats_other_t(self, procedure, family):
    budget = 0.5
    chosen = analysis.choose_t_details(procedure, 4, budget, num_points=_SMALL)
    self.assertEqual(chosen['family'], family)
    self.assertBetween(chosen['t'], 0.1, 200.0)
    self.assertAlmostEqual(
        analysis.kl(
            transforms.make_transform(family, t=chosen['t']),
            chosen['beta'],
            num_points=_SMALL,
        ),
        budget,
        delta=1e-8,
    )
    self.assertEqual(
        analysis.choose_t(procedure, 4, budget, num_points=_SMALL),
        chosen['t'],
    )
    for t in (0.3, 1.0, 3.0, 10.0, 30.0, 100.0):
      transform = transforms.make_transform(family, t=t)
      try:
        beta = analysis.beta_for_kl(transform, budget, num_points=_SMALL)
      except ValueError as error:
        # neg_exp with large t is bounded and cannot reach every KL.
        self.assertIn('cannot reach KL', str(error))
        continue
      win = analysis.win_rate(transform, beta, procedure, 4, num_points=_SMALL)
      self.assertGreaterEqual(chosen['win_rate'], win - 1e-9, f't={t}')

  def test_family_formulas_match_transforms(self):
    with jax.enable_x64(True):
      ts = np.array([0.5, 7.0, 200.0])
      for family in ('exp', 'neg_exp'):
        phis = np.asarray(
            analysis._family_phis(family, ts, np.linspace(0.0, 1.0, 33))
        )
        for t, phi in zip(ts, phis, strict=True):
          expected = transforms.make_transform(family, t=float(t))(
              np.linspace(0.0, 1.0, 33)
          )
          np.testing.assert_allclose(phi, expected, rtol=1e-14)

  def test_won_large_budget_is_interior(self):
    # Before the bisection reached beta below spread * e^-28, N = 4 and
    # N = 8 both returned t = 31.70, where that limit cut the search.
    ts = [
        analysis.choose_t_details('won', n, 2.0, num_points=_SMALL)
        for n in (4, 8)
    ]
    for chosen in ts:
      self.assertIsNone(chosen['at_limit'])
      self.assertGreater(chosen['beta'], 1e-290)
    self.assertGreater(abs(ts[0]['t'] - ts[1]['t']), 1.0)

  def test_optimum_at_range_end_is_flagged(self):
    with self.assertLogs(level='WARNING') as logs:
      chosen = analysis.choose_t_details(
          'bon', 4, 0.5, t_range=(0.1, 2.0), num_points=_SMALL
      )
    self.assertEqual(chosen['at_limit'], 'high')
    self.assertAlmostEqual(chosen['t'], 2.0, delta=1e-4)
    self.assertIn('high end of t_range', logs.output[0])

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, 't_range must be'):
      analysis.choose_t('bon', 4, 0.5, t_range=(1.0, 1000.0))
    with self.assertRaisesRegex(ValueError, 't_range must be a pair'):
      analysis.choose_t('bon', 4, 0.5, t_range=5.0)
    with self.assertRaisesRegex(ValueError, "Unknown family 'power'"):
      analysis.choose_t('bon', 4, 0.5, family='power')
    with self.assertRaisesRegex(ValueError, 'kl_budget must be finite'):
      analysis.choose_t('bon', 4, 0.0)


class OptimalTransformTest(parameterized.TestCase):

  @parameterized.parameters(2, 4)
  def test_bon_gain_matches_closed_form(self, n):
    solution = analysis.solve_optimal('bon', n, 0.2, num_points=_SMALL)
    self.assertTrue(solution.converged)
    u, q = solution.u, solution.density
    cdf = np.concatenate(
        [[0.0], np.cumsum(0.5 * (q[1:] + q[:-1]) * np.diff(u))]
    )
    integrand = cdf ** (n - 1) * u ** (n - 1)
    closed = n**2 * np.concatenate(
        [[0.0], np.cumsum(0.5 * (integrand[1:] + integrand[:-1]) * np.diff(u))]
    )
    # The discrete derivative and the trapezoid integral differ by O(h).
    np.testing.assert_allclose(
        solution.transform_values, closed, atol=4.0 * n**2 / (_SMALL - 1)
    )
    u_grid, values = analysis.optimal_transform(
        'bon', n, 0.2, num_points=_SMALL
    )
    np.testing.assert_array_equal(u_grid, u)
    np.testing.assert_array_equal(values, solution.transform_values)

  @parameterized.parameters(
      ('bon', 0.05), ('bon', 0.3), ('won', 0.05), ('won', 0.3)
  )
  def test_beats_exponential_transforms(self, procedure, beta):
    solution = analysis.solve_optimal(procedure, 4, beta, num_points=_SMALL)
    self.assertTrue(solution.converged)
    for family in ('exp', 'neg_exp'):
      for t in np.geomspace(0.1, 200.0, 25):
        win, kl = analysis.win_rate_and_kl(
            transforms.make_transform(family, t=float(t)),
            beta,
            procedure,
            4,
            num_points=_SMALL,
        )
        self.assertGreater(
            solution.objective, win - beta * kl, f'{family} t={t:.3g}'
        )

  @parameterized.parameters((16, 0.5), (16, 0.1), (2, 0.1))
  def test_converges_at_small_beta(self, n, damping):
    # Without a floor on the adaptive step, N = 16 stalled at any damping
    # and N = 2 stopped moving at damping 0.1 (the step halved to 0).
    solution = analysis.solve_optimal('bon', n, 1e-3, damping=damping)
    self.assertTrue(solution.converged)
    reference = analysis.solve_optimal('bon', n, 1e-3)
    self.assertAlmostEqual(solution.objective, reference.objective, delta=1e-9)

  def test_fixed_point_reproduces_itself(self):
    solution = analysis.solve_optimal('won', 4, 0.3, num_points=_SMALL)
    optimum = transforms.make_transform(
        'interpolated', u=solution.u, values=solution.transform_values
    )
    win, kl = analysis.win_rate_and_kl(
        optimum, 0.3, 'won', 4, num_points=_SMALL
    )
    self.assertAlmostEqual(win, solution.win_rate, delta=1e-6)
    self.assertAlmostEqual(kl, solution.kl, delta=1e-6)

  def test_user_procedure(self):
    named = analysis.solve_optimal('bon', 3, 0.5, num_points=_SMALL)
    custom = analysis.solve_optimal(lambda f: f**3, 1, 0.5, num_points=_SMALL)
    np.testing.assert_allclose(
        custom.transform_values, named.transform_values, atol=1e-9
    )

  def test_standard_optimum_is_identity(self):
    # For plain sampling dW/dq(u) = u, so the optimum is the identity.
    solution = analysis.solve_optimal('standard', 1, 0.5, num_points=_SMALL)
    np.testing.assert_allclose(
        solution.transform_values, solution.u, atol=2.0 / (_SMALL - 1)
    )


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('beta_zero', lambda: analysis.kl('identity', 0.0), 'beta must be'),
      (
          'beta_negative',
          lambda: analysis.win_rate('identity', -1.0),
          'beta must be',
      ),
      (
          'n_zero',
          lambda: analysis.win_rate('identity', 1.0, 'bon', 0),
          'n must be an integer >= 1',
      ),
      (
          'procedure',
          lambda: analysis.win_rate('identity', 1.0, 'best'),
          "Unknown procedure 'best'",
      ),
      (
          'standard_n',
          lambda: analysis.win_rate('identity', 1.0, 'standard', 4),
          'n must be 1',
      ),
      (
          'overflow',
          lambda: analysis.kl(transforms.make_transform('exp', t=800.0), 1.0),
          'not finite',
      ),
      (
          'bad_map',
          lambda: analysis.win_rate('identity', 1.0, lambda f: 2 * f),
          'g\\(1\\) = 1',
      ),
      (
          'transform_name',
          lambda: analysis.kl('square', 1.0),
          "Unknown transform 'square'",
      ),
      (
          'optimal_beta',
          lambda: analysis.optimal_transform('bon', 4, 0.0),
          'beta must be',
      ),
      (
          'damping',
          lambda: analysis.solve_optimal('bon', 4, 1.0, damping=0.0),
          'damping must be',
      ),
      (
          'damping_type',
          lambda: analysis.solve_optimal('bon', 4, 1.0, damping='a'),
          "damping must be a number in \\(0, 1\\], got 'a'",
      ),
      (
          'beta_type',
          lambda: analysis.kl('identity', 'a'),
          "beta must be a number > 0 .* got 'a'",
      ),
  )
  def test_raises(self, call, message):
    with self.assertRaisesRegex(ValueError, message):
      call()


if __name__ == '__main__':
  jax.config.update('jax_numpy_rank_promotion', 'raise')
  absltest.main()
