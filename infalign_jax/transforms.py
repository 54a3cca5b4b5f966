"""Reward transforms Phi applied to calibrated rewards u in [0, 1].

CTRL trains with KL-regularized RL on Phi(C(x, y)), with Phi chosen for the
inference-time procedure: identity for plain sampling, exp(t u) for
best-of-N, -exp(-t u) for worst-of-N. The log transform log(u) with
beta = 1 / (N - 1) reproduces best-of-N sampling itself.

`make_transform(name, **params)` returns a `Transform`: a callable
u -> Phi(u) that works on any array shape, under `jax.jit`, `jax.vmap` and
`jax.grad`, with an optional inverse.

References:
  Balashankar, Sun et al., "InfAlign: Inference-aware language model
  alignment", ICML 2025, arXiv:2412.19792 (CTRL step 2, exponential
  transforms for best-of-N and worst-of-N).
"""

from collections.abc import Callable, Mapping
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import base

__all__ = (
    'Transform',
    'make_transform',
    'TRANSFORM_NAMES',
    'DEFAULT_LOG_FLOOR',
)

# Smallest u that `log` evaluates: log(1e-6) = -13.8, finite in float32.
DEFAULT_LOG_FLOOR = 1e-6

TRANSFORM_NAMES = ('identity', 'log', 'exp', 'neg_exp', 'interpolated')


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Transform:
  """A monotone increasing reward transform u -> Phi(u) on [0, 1].

  Attributes:
    name: transform name, for logs and file names (a user callable gets its
      `__name__`).
    params: the parameters it was made with, for example {'t': 4.0}.
    fn: the elementwise function, traceable by JAX.
    inverse_fn: Phi^-1 where it exists, or None.
  """

  name: str
  params: Mapping[str, Any]
  fn: Callable[[jax.Array], jax.Array]
  inverse_fn: Callable[[jax.Array], jax.Array] | None = None

  def __call__(self, u: jax.typing.ArrayLike) -> jax.Array:
    """Apply Phi elementwise; integer input is computed in float32."""
    u = jnp.asarray(u)
    if not jnp.issubdtype(u.dtype, jnp.floating):
      u = u.astype(jnp.float32)
    return self.fn(u)

  def inverse(self, value: jax.typing.ArrayLike) -> jax.Array:
    """Apply Phi^-1 elementwise.

    Raises:
      ValueError: the transform has no inverse (a user callable made without
        `inverse=`).
    """
    if self.inverse_fn is None:
      raise ValueError(
          f'Transform {self.name!r} has no inverse; pass inverse=... to '
          'make_transform for a user callable.'
      )
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating):
      value = value.astype(jnp.float32)
    return self.inverse_fn(value)

  def __repr__(self) -> str:
    params = ', '.join(
        f'{k}={v!r}' for k, v in sorted(self.params.items()) if k != 'fn'
    )
    return f'Transform({self.name}{", " if params else ""}{params})'


def _check_params(name: str, params: Mapping[str, Any], allowed) -> None:
  unknown = sorted(set(params) - set(allowed))
  if unknown:
    raise ValueError(
        f'Transform {name!r} got unknown parameter(s) {unknown}; allowed: '
        f'{sorted(allowed) or "none"}.'
    )


def _check_t(name: str, params: Mapping[str, Any]) -> float:
  if 't' not in params:
    raise ValueError(
        f'Transform {name!r} needs a parameter t > 0, for example '
        f"make_transform('{name}', t=4.0)."
    )
  t = params['t']
  if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)):
    raise ValueError(f'Transform {name!r}: t must be a number, got {t!r}.')
  base.check_positive(f'{name} transform parameter t', t)
  return float(t)


def _identity() -> Transform:
  return Transform(
      name='identity', params={}, fn=lambda u: u, inverse_fn=lambda v: v
  )


def _log(params: Mapping[str, Any]) -> Transform:
  _check_params('log', params, ('floor',))
  floor = params.get('floor', DEFAULT_LOG_FLOOR)
  if not (isinstance(floor, (int, float)) and 0.0 < floor < 1.0):
    raise ValueError(
        f'log transform floor must be a number in (0, 1), got {floor!r}.'
    )
  floor = float(floor)
  return Transform(
      name='log',
      params={'floor': floor},
      fn=lambda u: jnp.log(jnp.maximum(u, floor)),
      inverse_fn=jnp.exp,
  )


def _exp(params: Mapping[str, Any]) -> Transform:
  _check_params('exp', params, ('t', 'normalize'))
  t = _check_t('exp', params)
  normalize = bool(params.get('normalize', False))
  if normalize:
    # (e^(t u) - 1) / (e^t - 1) = e^(t (u - 1)) (1 - e^(-t u)) / (1 - e^(-t)).
    # Both factors are monotone, in [0, 1] and accurate in float32 for any
    # t > 0: the exponent is never positive, and expm1 keeps the small-t
    # limit (t u) / t = u free of cancellation.
    scale = -math.expm1(-t)  # 1 - e^(-t), for the inverse

    def fn(u):
      u = jnp.asarray(u)
      # The denominator in u's dtype, by the same operations as the
      # numerator at u = 1, so that Phi(1) is exactly 1.
      denominator = -jnp.expm1(-t * jnp.ones_like(u))
      value = jnp.exp(t * (u - 1.0)) * (-jnp.expm1(-t * u)) / denominator
      return jnp.minimum(value, 1.0)

    if t < 1.0:
      # u = 1 + log1p(-(1 - e^(-t)) (1 - v)) / t, without cancellation.
      def inverse_fn(v):
        return jnp.clip(1.0 + jnp.log1p(-scale * (1.0 - v)) / t, 0.0, 1.0)

    else:
      # u = 1 + log(v (1 - e^(-t)) + e^(-t)) / t.
      def inverse_fn(v):
        inside = v * scale + math.exp(-t)
        return jnp.clip(1.0 + jnp.log(inside) / t, 0.0, 1.0)

  else:

    def fn(u):
      return jnp.exp(t * u)

    def inverse_fn(v):
      return jnp.log(v) / t

  return Transform(
      name='exp',
      params={'t': t, 'normalize': normalize},
      fn=fn,
      inverse_fn=inverse_fn,
  )


def _neg_exp(params: Mapping[str, Any]) -> Transform:
  _check_params('neg_exp', params, ('t',))
  t = _check_t('neg_exp', params)
  return Transform(
      name='neg_exp',
      params={'t': t},
      fn=lambda u: -jnp.exp(-t * u),
      inverse_fn=lambda v: -jnp.log(-v) / t,
  )


def _interpolated(params: Mapping[str, Any]) -> Transform:
  _check_params('interpolated', params, ('u', 'values'))
  if 'u' not in params or 'values' not in params:
    raise ValueError(
        "Transform 'interpolated' needs u=[G] grid points and values=[G], "
        'for example the output of analysis.optimal_transform.'
    )
  grid = np.asarray(params['u'], np.float64)
  values = np.asarray(params['values'], np.float64)
  if grid.ndim != 1 or grid.shape != values.shape or grid.size < 2:
    raise ValueError(
        f'interpolated transform needs 1-D u and values of equal length >= '
        f'2, got shapes {grid.shape} and {values.shape}.'
    )
  base.check_finite('values', values)
  if np.any(np.diff(grid) <= 0):
    raise ValueError('interpolated transform: u must be strictly increasing.')
  grid_f32 = np.asarray(grid, np.float32)
  values_f32 = np.asarray(values, np.float32)

  def fn(u):
    return jnp.interp(u, grid_f32.astype(u.dtype), values_f32.astype(u.dtype))

  return Transform(
      name='interpolated',
      params={'u': grid, 'values': values},
      fn=fn,
      inverse_fn=None,
  )


def make_transform(
    name: str | Callable[[jax.Array], jax.Array] | Transform,
    /,
    **params: Any,
) -> Transform:
  """Make a reward transform u -> Phi(u) for calibrated rewards u in [0, 1].

  Available transforms:

  * 'identity': Phi(u) = u. Optimal for plain sampling (N = 1).
  * 'log': Phi(u) = log(max(u, floor)), `floor` in (0, 1), default 1e-6.
    A calibrated reward of 0 (a response below every reference sample) maps
    to log(floor) = -13.8 rather than -inf, so a loss stays finite and its
    gradient is 0 there. With M reference samples, floor = 1 / (2 M) is a
    natural choice (half a rank). With beta = 1 / (N - 1) the tilted policy
    is best-of-N sampling.
  * 'exp': Phi(u) = exp(t u), t > 0, for best-of-N. In float32 the value
    overflows to inf for t u > 88. With `normalize=True` it computes
    (exp(t u) - 1) / (exp(t) - 1) in [0, 1] instead, finite for every t.
    This is the same policy at a KL weight beta / (exp(t) - 1): an affine
    map a Phi + b with a > 0 changes the optimum only through beta / a.
  * 'neg_exp': Phi(u) = -exp(-t u), t > 0, for worst-of-N. Bounded in
    [-1, 0) for u in [0, 1], so finite for every t.
  * 'interpolated': piecewise-linear through points (u[i], values[i]), for
    example the optimal transform on a grid from
    `analysis.optimal_transform`. No inverse.
  * any callable: used as Phi as given; pass `inverse=` for `.inverse`. It
    must be traceable by JAX and increasing; it is not checked.

  Args:
    name: one of the names above, a callable, or an existing `Transform`
      (returned unchanged).
    **params: the transform's parameters (see above).

  Returns:
    A `Transform`; calling it maps an array of u elementwise.

  Raises:
    ValueError: an unknown name, an unknown or missing parameter, t <= 0 or
      not finite, or a floor outside (0, 1).
  """
  if isinstance(name, Transform):
    if params:
      raise ValueError(
          f'make_transform got an existing Transform and parameters '
          f'{sorted(params)}; pass the name instead to change parameters.'
      )
    return name
  if callable(name):
    _check_params('callable', params, ('inverse',))
    return Transform(
        name=getattr(name, '__name__', 'custom'),
        params={'fn': name},
        fn=name,
        inverse_fn=params.get('inverse'),
    )
  base.check_choice('transform', name, TRANSFORM_NAMES)

  if name == 'identity':
    _check_params('identity', params, ())
    return _identity()
  if name == 'log':
    return _log(params)
  if name == 'exp':
    return _exp(params)
  if name == 'neg_exp':
    return _neg_exp(params)
  return _interpolated(params)
