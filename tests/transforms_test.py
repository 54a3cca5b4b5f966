"""Tests for infalign_jax.transforms."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np

from infalign_jax import transforms

_VARIANTS = (('eager', lambda f: f), ('jit', jax.jit))
_U = np.array([0.0, 0.1, 0.25, 0.5, 0.9, 1.0], np.float32)


class MakeTransformTest(parameterized.TestCase):

  @parameterized.named_parameters(*_VARIANTS)
  def test_values(self, variant):
    cases = (
        (transforms.make_transform('identity'), _U),
        (
            transforms.make_transform('log'),
            np.log(np.maximum(_U, transforms.DEFAULT_LOG_FLOOR)),
        ),
        (transforms.make_transform('exp', t=3.0), np.exp(3.0 * _U)),
        (transforms.make_transform('neg_exp', t=2.0), -np.exp(-2.0 * _U)),
        (
            transforms.make_transform('exp', t=3.0, normalize=True),
            np.expm1(3.0 * _U) / np.expm1(3.0),
        ),
    )
    for transform, expected in cases:
      with self.subTest(repr(transform)):
        np.testing.assert_allclose(
            variant(transform)(_U), expected, rtol=2e-6, atol=1e-6
        )

  def test_log_at_zero_is_finite(self):
    log = transforms.make_transform('log')
    self.assertAlmostEqual(float(log(0.0)), np.log(1e-6), places=4)
    grad = jax.grad(lambda u: log(u))(0.0)
    self.assertEqual(float(grad), 0.0)
    custom = transforms.make_transform('log', floor=1.0 / 1024)
    self.assertAlmostEqual(float(custom(0.0)), -np.log(1024.0), places=4)

  def test_large_t_float32(self):
    u = jnp.linspace(0.0, 1.0, 11)
    normalized = transforms.make_transform('exp', t=200.0, normalize=True)(u)
    self.assertTrue(bool(jnp.all(jnp.isfinite(normalized))))
    self.assertAlmostEqual(float(normalized[-1]), 1.0, places=6)
    self.assertEqual(float(normalized[0]), 0.0)
    neg = transforms.make_transform('neg_exp', t=200.0)(u)
    self.assertTrue(bool(jnp.all(jnp.isfinite(neg))))
    # The plain form overflows to inf, as documented.
    plain = transforms.make_transform('exp', t=200.0)(u)
    self.assertTrue(bool(jnp.isinf(plain[-1])))

  @parameterized.named_parameters(
      ('identity', 'identity', {}),
      ('log', 'log', {}),
      ('exp', 'exp', {'t': 5.0}),
      ('exp_normalized', 'exp', {'t': 50.0, 'normalize': True}),
      ('neg_exp', 'neg_exp', {'t': 5.0}),
  )
  def test_inverse_round_trip(self, name, params):
    transform = transforms.make_transform(name, **params)
    u = jnp.array([0.01, 0.3, 0.5, 0.99])
    np.testing.assert_allclose(
        transform.inverse(transform(u)), u, rtol=1e-4, atol=1e-5
    )

  def test_callable(self):
    transform = transforms.make_transform(
        lambda u: u**3, inverse=lambda v: jnp.cbrt(v)
    )
    np.testing.assert_allclose(transform(_U), _U**3, rtol=1e-6)
    np.testing.assert_allclose(transform.inverse(_U**3), _U, atol=1e-6)
    no_inverse = transforms.make_transform(jnp.tanh)
    self.assertEqual(no_inverse.name, 'tanh')
    with self.assertRaisesRegex(ValueError, 'has no inverse'):
      no_inverse.inverse(0.5)
    self.assertIs(transforms.make_transform(transform), transform)

  def test_interpolated(self):
    transform = transforms.make_transform(
        'interpolated', u=[0.0, 0.5, 1.0], values=[0.0, 1.0, 3.0]
    )
    np.testing.assert_allclose(
        jax.jit(transform)(jnp.array([0.0, 0.25, 0.75, 1.0])),
        [0.0, 0.5, 2.0, 3.0],
    )

  @parameterized.named_parameters(
      ('identity', 'identity', {}),
      ('log', 'log', {}),
      ('exp', 'exp', {'t': 2.0}),
      ('neg_exp', 'neg_exp', {'t': 2.0}),
  )
  def test_gradients(self, name, params):
    transform = transforms.make_transform(name, **params)
    jtu.check_grads(
        lambda u: transform(u).sum(),
        (jnp.array([0.2, 0.5, 0.8], jnp.float32),),
        order=1,
        modes=('rev',),
        atol=1e-2,
        rtol=1e-2,
    )

  @hypothesis.settings(max_examples=40, deadline=None)
  @hypothesis.given(
      name_and_params=st.sampled_from(
          [
              ('identity', {}),
              ('log', {}),
              ('exp', {'t': 0.5}),
              ('exp', {'t': 20.0}),
              ('exp', {'t': 200.0, 'normalize': True}),
              ('neg_exp', {'t': 0.5}),
              ('neg_exp', {'t': 50.0}),
          ]
      ),
      a=st.floats(1e-3, 1.0),
      b=st.floats(1e-3, 1.0),
  )
  def test_monotone(self, name_and_params, a, b):
    name, params = name_and_params
    transform = transforms.make_transform(name, **params)
    lo, hi = min(a, b), max(a, b)
    values = np.asarray(transform(np.array([lo, hi], np.float64)))
    self.assertLessEqual(values[0], values[1])

  @hypothesis.settings(max_examples=60, deadline=None)
  @hypothesis.given(
      log10_t=st.floats(-8.0, math.log10(200.0)),
      u=hnp.arrays(np.float32, 6, elements=st.floats(0.0, 1.0, width=32)),
  )
  def test_normalized_exp_float32_monotone_in_unit_range(self, log10_t, u):
    t = 10.0**log10_t
    u = np.sort(np.concatenate([u, np.array([0.0, 1.0], np.float32)]))
    values = np.asarray(
        transforms.make_transform('exp', t=t, normalize=True)(jnp.asarray(u))
    )
    self.assertEqual(values.dtype, np.float32)
    self.assertTrue(np.all(np.diff(values) >= 0), values)
    self.assertEqual(values[0], 0.0)
    self.assertEqual(values[-1], 1.0)
    self.assertTrue(np.all((values >= 0) & (values <= 1)), values)
    # Against float64 expm1(t u) / expm1(t): a few float32 ulps.
    want = np.expm1(t * u.astype(np.float64)) / np.expm1(t)
    np.testing.assert_allclose(values, want, rtol=2e-6, atol=1e-7)

  @parameterized.named_parameters(
      ('unknown', ('power',), {}, "Unknown transform 'power'"),
      ('missing_t', ('exp',), {}, 'needs a parameter t > 0'),
      ('zero_t', ('exp',), {'t': 0.0}, 'must be finite and > 0, got 0.0'),
      ('negative_t', ('neg_exp',), {'t': -1.0}, 'must be finite and > 0'),
      ('nan_t', ('exp',), {'t': float('nan')}, 'must be finite and > 0'),
      ('string_t', ('exp',), {'t': '2'}, 't must be a number'),
      ('floor', ('log',), {'floor': 0.0}, 'floor must be a number in'),
      ('extra', ('identity',), {'t': 1.0}, 'unknown parameter'),
      ('exp_extra', ('exp',), {'t': 1.0, 'beta': 1.0}, r"\['beta'\]"),
      ('interp_missing', ('interpolated',), {}, 'needs u='),
  )
  def test_bad_input(self, args, params, message):
    with self.assertRaisesRegex(ValueError, message):
      transforms.make_transform(*args, **params)


if __name__ == '__main__':
  jax.config.update('jax_numpy_rank_promotion', 'raise')
  absltest.main()
