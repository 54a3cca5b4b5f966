"""Calibrated-space analysis: KL and win rates of transformed-reward policies.

Under the reference policy with continuous rewards, the calibrated reward u
is Uniform[0, 1] for every prompt. The solution of KL-regularized RL with
reward Phi(u), pi ∝ pi_ref exp(Phi(u) / beta), therefore has in calibrated
space the density q(u) ∝ exp(Phi(u) / beta) on [0, 1], with CDF Q, and

  KL(pi || pi_ref) = ∫ q log q du,
  W_1     = ∫ u q(u) du                         (standard win rate),
  W_BoN,N = 1 - N ∫ Q(u)^N u^(N-1) du,
  W_WoN,N = N ∫ (1 - Q(u))^N (1 - u)^(N-1) du.

An inference-time procedure is a map g on CDFs: applied to both policies it
turns a CDF F into g(F) (best-of-N: F^N, worst-of-N: 1 - (1 - F)^N, plain
sampling: F). The win rate of g(pi) over g(pi_ref) is 1 - ∫ g(Q(u)) g'(u) du,
so any user-supplied map g works, and the three formulas above are special
cases.

Numerics: the grid has `num_points` uniform nodes plus nodes spaced
geometrically towards 0 and 1 (cells 1% of the distance to the end, down to
1e-14), where tilted densities concentrate. log q is taken piecewise linear
between nodes and every cell is integrated exactly in log space, so the
mass, the KL and the CDF Q at the nodes are exact for the identity at any
beta, and a density far narrower than the finest cell (exp with t = 200 at
beta = 1e-3 is 1e-92 wide, KL 211) still gets its exact mass and KL.
Win rates integrate g(Q(u)) g'(u) by the trapezoid rule on the same grid.
Everything runs in float64 under `jax.enable_x64` from logits shifted by
their maximum, so exp(t u) / beta stays finite for t up to 700. With the
default 16385 nodes the KL and win rates match the closed forms of the
identity (beta down to 1e-4), log and power-family tilts to within 5e-7
(the tests allow 1e-5). For densities that live within ~1e-13 of an end
the float64 rounding of u (nodes 1e-16 apart) and of Phi limits the
accuracy: the KL of exp(20 u) at beta = 1e-3 is off by about 1e-5, that of
exp(200 u) by about 1e-3 (out of 211). `kl`, `win_rate` and `predict` log
a warning when more than half the mass lies in the outermost cell.

The optimal-transform iteration (`solve_optimal`) keeps a uniform grid with
trapezoid weights, so that R = dW/dq is the gradient of one quadrature.

Public functions are host-side tools: they take Python numbers or NumPy
arrays and return Python floats or NumPy float64 arrays.

References:
  Balashankar, Sun et al., "InfAlign: Inference-aware language model
  alignment", ICML 2025, arXiv:2412.19792 (calibrated space, the optimal
  transform as a fixed point, choosing t for exponential transforms).
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
import numbers
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import base
from infalign_jax import transforms as transforms_lib

__all__ = (
    'DEFAULT_NUM_POINTS',
    'PROCEDURE_NAMES',
    'procedure_cdf_map',
    'tilted_density',
    'kl',
    'win_rate',
    'win_rate_and_kl',
    'predict',
    'tradeoff_curve',
    'beta_for_kl',
    'choose_t',
    'choose_t_details',
    'OptimalSolution',
    'solve_optimal',
    'optimal_transform',
)

DEFAULT_NUM_POINTS = 16385

PROCEDURE_NAMES = ('standard', 'bon', 'won')

CdfMap = Callable[[jax.Array], jax.Array]
TransformLike = str | Callable[[jax.Array], jax.Array]


# ---------------------------------------------------------------------------
# Argument handling.


# Internally a procedure is a "kind" g(cdf, n) plus a float n, so that n is
# traced and compiled functions are shared by every n.
CdfKind = Callable[[jax.Array, jax.Array], jax.Array]


def _standard_kind(cdf: jax.Array, n: jax.Array) -> jax.Array:
  del n
  return cdf


def _bon_kind(cdf: jax.Array, n: jax.Array) -> jax.Array:
  return cdf**n


def _won_kind(cdf: jax.Array, n: jax.Array) -> jax.Array:
  return 1.0 - (1.0 - cdf) ** n


_KINDS = {'standard': _standard_kind, 'bon': _bon_kind, 'won': _won_kind}


@functools.lru_cache(maxsize=256)
def _user_kind(g: CdfMap) -> CdfKind:
  return lambda cdf, n: g(cdf)


def _procedure_kind(procedure: str | CdfMap, n: int) -> tuple[CdfKind, float]:
  """Validate (procedure, n) and return (kind, n as a float)."""
  g = procedure_cdf_map(procedure, n)
  if callable(procedure):
    return _user_kind(g), 1.0
  return _KINDS[procedure], float(n)


def procedure_cdf_map(procedure: str | CdfMap, n: int = 1) -> CdfMap:
  """Return the map g on CDFs that an inference-time procedure applies.

  Args:
    procedure: 'standard' (g(F) = F), 'bon' (best-of-n, g(F) = F^n), 'won'
      (worst-of-n, g(F) = 1 - (1 - F)^n), or a callable g that maps a scalar
      CDF value in [0, 1] to [0, 1], is increasing, traceable and
      differentiable by JAX, with g(0) = 0 and g(1) = 1.
    n: samples per procedure call, >= 1. Must be 1 for 'standard'. Ignored
      for a callable.

  Returns:
    The map g (a callable given as `procedure` is returned as is).

  Raises:
    ValueError: an unknown name, n < 1, n != 1 with 'standard', or a
      callable with g(0) != 0 or g(1) != 1.
  """
  if callable(procedure):
    with jax.enable_x64(True):
      ends = np.asarray(procedure(jnp.array([0.0, 1.0], jnp.float64)))
    if ends.shape != (2,) or not np.allclose(ends, [0.0, 1.0], atol=1e-9):
      raise ValueError(
          f'A procedure given as a map g on CDFs must be elementwise with '
          f'g(0) = 0 and g(1) = 1; got g([0, 1]) = {ends.tolist()}.'
      )
    return procedure
  base.check_choice('procedure', procedure, PROCEDURE_NAMES)
  base.check_int_at_least('n', n, 1)
  if procedure == 'standard' and n != 1:
    raise ValueError(
        f"procedure 'standard' samples once, so n must be 1, got n={n}. Use "
        "'bon' or 'won' for n > 1."
    )
  kind = _KINDS[procedure]
  return lambda cdf: kind(cdf, float(n))


def _as_transform(transform: TransformLike) -> transforms_lib.Transform:
  if isinstance(transform, str):
    return transforms_lib.make_transform(transform)
  if isinstance(transform, transforms_lib.Transform):
    return transform
  if callable(transform):
    return transforms_lib.make_transform(transform)
  raise ValueError(
      f'transform must be a name, a Transform or a callable, got '
      f'{transform!r}.'
  )


def _check_num_points(num_points: int) -> None:
  base.check_int_at_least('num_points', num_points, 3)


# The grid: `num_points` uniform nodes, plus nodes spaced geometrically
# towards both ends, where a tilted density concentrates. Within distance
# v* = h / _REFINE_STEP of an end (h the uniform spacing) cells are
# _REFINE_STEP * v wide at distance v, down to _REFINE_MIN from the end.
_REFINE_STEP = 0.01
_REFINE_MIN = 1e-14


@functools.lru_cache(maxsize=16)
def _grid(num_points: int) -> np.ndarray:
  """Return the sorted float64 nodes of the refined grid on [0, 1]."""
  uniform = np.linspace(0.0, 1.0, num_points)
  edge = min(1.0 / ((num_points - 1) * _REFINE_STEP), 0.5)
  count = int(math.ceil(math.log(edge / _REFINE_MIN) / _REFINE_STEP))
  distances = edge * np.exp(-_REFINE_STEP * np.arange(1, count + 1))
  distances = distances[distances >= _REFINE_MIN]
  middle = uniform[(uniform > edge) & (uniform < 1.0 - edge)]
  nodes = np.concatenate(
      [[0.0, edge, 1.0 - edge, 1.0], distances, 1.0 - distances, middle]
  )
  # Near 1 nodes 1e-14 apart round onto the same float64; keep one each.
  return np.unique(nodes)


def _grid_size(num_points: int) -> int:
  return _grid(num_points).shape[0]


def _phi_on_grid(
    transform: TransformLike, num_points: int
) -> tuple[jax.Array, jax.Array]:
  """Return (u, Phi(u)) on the refined grid in float64; reject non-finite."""
  transform = _as_transform(transform)
  u = jnp.asarray(_grid(num_points), jnp.float64)
  phi = jnp.asarray(transform(u), jnp.float64)
  if phi.shape != u.shape:
    raise ValueError(
        f'Transform {transform!r} must be elementwise: mapped u of shape '
        f'{u.shape} to shape {phi.shape}.'
    )
  # log(0) = -inf at u = 0 is allowed: that node gets density 0.
  finite_or_minus_inf = jnp.isfinite(phi) | (phi == -jnp.inf)
  if not bool(jnp.all(finite_or_minus_inf)):
    bad = int(jnp.argmin(finite_or_minus_inf))
    raise ValueError(
        f'Transform {transform!r} is not finite on [0, 1] in float64: '
        f'Phi({float(u[bad])}) = {float(phi[bad])}. Use a smaller t, or an '
        "equivalent rescaled form such as make_transform('exp', t=..., "
        'normalize=True).'
    )
  if not bool(jnp.any(jnp.isfinite(phi))):
    raise ValueError(f'Transform {transform!r} is -inf everywhere on [0, 1].')
  return u, phi


def _betas(beta) -> tuple[np.ndarray, bool]:
  """Return beta as a 1-D float64 array, and whether the input was scalar."""
  try:
    values = np.asarray(beta, np.float64)
  except (TypeError, ValueError):
    raise ValueError(
        f'beta must be a number > 0 or a 1-D sequence of them, got {beta!r}.'
    ) from None
  if values.ndim > 1:
    raise ValueError(f'beta must be a scalar or 1-D, got shape {values.shape}.')
  base.check_positive('beta', values)
  return np.atleast_1d(values), values.ndim == 0


def _unbatch(values: np.ndarray, scalar: bool):
  values = np.asarray(values, np.float64)
  return float(values[0]) if scalar else values


# ---------------------------------------------------------------------------
# Quadrature on the refined grid. Every function below takes float64 arrays.
#
# log q is taken piecewise linear between nodes, and each cell is integrated
# exactly: a cell of width h whose log-density falls by x from its high end
# `hi` has mass h e^hi (1 - e^-x) / x. This is exact for the identity at
# any beta, and a density far narrower than a cell (exp with t = 200 at
# beta = 1e-3 is 1e-92 wide) still gets its exact mass and KL. Everything is
# computed from log masses, so nothing overflows or underflows to NaN.


def _log_phi(x: jax.Array) -> jax.Array:
  """log((1 - e^-x) / x) for x >= 0 (x = inf gives -inf)."""
  small = x < 1e-8
  safe = jnp.where(small, 1.0, x)
  return jnp.where(small, -0.5 * x, jnp.log(-jnp.expm1(-safe)) - jnp.log(safe))


def _mean_drop(x: jax.Array) -> jax.Array:
  """Mean fall of log q below its high end within a cell: 1 - x / expm1(x)."""
  small = x < 1e-8
  large = x > 700.0
  safe = jnp.where(small | large, 1.0, x)
  return jnp.where(
      small, 0.5 * x, jnp.where(large, 1.0, 1.0 - safe / jnp.expm1(safe))
  )


def _tilt(phi: jax.Array, beta: jax.Array, u: jax.Array):
  """Tilt by exp(phi / beta) on the grid u.

  Returns:
    (cdf [G] at the nodes, ending at exactly 1; KL).
  """
  # Shift by the maximum before dividing: logits of 1e89 would swallow the
  # log of the cell widths in the log-sum-exp.
  logits = (phi - jnp.max(phi)) / beta
  h = u[1:] - u[:-1]
  a, b = logits[:-1], logits[1:]
  hi = jnp.maximum(a, b)
  lo = jnp.minimum(a, b)
  x = jnp.where(lo == -jnp.inf, jnp.inf, hi - lo)
  log_mass = jnp.log(h) + hi + _log_phi(x)
  log_z = jax.nn.logsumexp(log_mass)
  p = jnp.exp(log_mass - log_z)
  mean_log_q = hi - _mean_drop(x) - log_z
  kl = jnp.sum(jnp.where(p > 0, p * mean_log_q, 0.0))
  cdf = jnp.concatenate([jnp.zeros((1,), p.dtype), jnp.cumsum(p)])
  # Dividing by the last value makes the CDF end at exactly 1 and stay in
  # [0, 1], so rounding never gives (1 - cdf)^n a negative base.
  cdf = cdf / cdf[-1]
  return cdf, kl


def _win_of_cdf(
    cdf: jax.Array, u: jax.Array, kind: CdfKind, n: jax.Array
) -> jax.Array:
  """1 - ∫ g(Q(u)) g'(u) du by the trapezoid rule on the grid."""
  g_prime = jax.vmap(jax.grad(kind), in_axes=(0, None))(u, n)
  f = kind(cdf, n) * g_prime
  h = u[1:] - u[:-1]
  return 1.0 - jnp.sum(0.5 * h * (f[1:] + f[:-1]))


@functools.partial(jax.jit, static_argnames=('kinds',))
def _metrics(
    phi: jax.Array,
    betas: jax.Array,
    ns: jax.Array,
    u: jax.Array,
    kinds: tuple[CdfKind, ...],
):
  """Return KL [K] and win rates [len(kinds), K] for betas [K]."""

  def one(beta):
    cdf, kl_value = _tilt(phi, beta, u)
    wins = jnp.stack(
        [_win_of_cdf(cdf, u, kind, ns[i]) for i, kind in enumerate(kinds)]
    )
    return kl_value, wins

  kls, wins = jax.vmap(one)(betas)
  return kls, wins.T


@jax.jit
def _edge_mass(phi: jax.Array, betas: jax.Array, u: jax.Array) -> jax.Array:
  """Mass [K] in the outermost cell at either end, of width ~1e-16."""

  def one(beta):
    cdf, _ = _tilt(phi, beta, u)
    return jnp.maximum(cdf[1], 1.0 - cdf[-2])

  return jax.vmap(one)(betas)


def _warn_if_at_rounding_limit(transform, betas, phi, u) -> None:
  """Warn when most of the mass lies within float64 rounding of an end."""
  edge = np.asarray(_edge_mass(phi, jnp.asarray(betas), u))
  if np.any(edge > 0.5):
    i = int(np.argmax(edge))
    logging.warning(
        'The density of %r at beta=%g lies within 1e-16 of an end of [0, 1] '
        '(%.3g of its mass in the outermost cell). Its KL rests on the '
        'float64 rounding of Phi there: about 1e-3 off for exp with t=200 '
        'at beta=1e-3 (KL 211), exact for the identity. Use a larger beta '
        'if that matters.',
        _as_transform(transform),
        betas[i],
        edge[i],
    )


@jax.jit
def _kl_at(phi: jax.Array, beta: jax.Array, u: jax.Array) -> jax.Array:
  return _tilt(phi, beta, u)[1]


# ---------------------------------------------------------------------------
# Uniform-grid quadrature for the fixed-point iteration of the optimal
# transform, where R = dW/dq comes from jax.grad of the trapezoid sums.


def _weights(num_points: int) -> jax.Array:
  h = 1.0 / (num_points - 1)
  w = jnp.full((num_points,), h, jnp.float64)
  return w.at[0].set(h / 2).at[-1].set(h / 2)


def _log_density(phi: jax.Array, beta: jax.Array, w: jax.Array) -> jax.Array:
  logits = (phi - jnp.max(phi)) / beta
  return logits - jax.nn.logsumexp(logits, b=w)


def _cdf(q: jax.Array) -> jax.Array:
  h = 1.0 / (q.shape[0] - 1)
  steps = 0.5 * h * (q[1:] + q[:-1])
  return jnp.concatenate([jnp.zeros((1,), q.dtype), jnp.cumsum(steps)])


def _kl_of_log_density(log_q: jax.Array, w: jax.Array) -> jax.Array:
  q = jnp.exp(log_q)
  return jnp.sum(w * jnp.where(q > 0, q * log_q, 0.0))


def _win_of_density(
    q: jax.Array, kind: CdfKind, n: jax.Array, w: jax.Array
) -> jax.Array:
  u = jnp.linspace(0.0, 1.0, q.shape[0], dtype=q.dtype)
  g_prime = jax.vmap(jax.grad(kind), in_axes=(0, None))(u, n)
  cdf = _cdf(q)
  cdf = cdf / cdf[-1]
  return 1.0 - jnp.sum(w * kind(cdf, n) * g_prime)


# ---------------------------------------------------------------------------
# Densities, KL and win rates of tilted policies.


def tilted_density(
    transform: TransformLike,
    beta: float,
    *,
    num_points: int = DEFAULT_NUM_POINTS,
) -> tuple[np.ndarray, np.ndarray]:
  """Compute q(u) ∝ exp(Phi(u) / beta) on a uniform grid on [0, 1].

  Args:
    transform: a `Transform`, a transform name, or a callable u -> Phi(u).
    beta: KL weight, > 0.
    num_points: grid nodes G, >= 3.

  Returns:
    u [G] and q [G], float64, with the trapezoid integral of q equal to 1.

  Raises:
    ValueError: beta <= 0, or Phi not finite on the grid.
  """
  _check_num_points(num_points)
  betas, _ = _betas(beta)
  if betas.size != 1:
    raise ValueError('tilted_density takes one beta.')
  with jax.enable_x64(True):
    _, phi = _phi_on_grid(transform, num_points)
    u = np.linspace(0.0, 1.0, num_points)
    phi = jnp.asarray(_as_transform(transform)(jnp.asarray(u)), jnp.float64)
    w = _weights(num_points)
    q = jnp.exp(_log_density(phi, jnp.float64(betas[0]), w))
    return u, np.asarray(q)


def kl(
    transform: TransformLike,
    beta,
    *,
    num_points: int = DEFAULT_NUM_POINTS,
):
  """KL(pi || pi_ref) of the policy tilted by Phi at KL weight beta.

  Args:
    transform: a `Transform`, a transform name, or a callable u -> Phi(u).
    beta: KL weight > 0, a scalar or [K].
    num_points: grid nodes, >= 3.

  Returns:
    KL in nats: a float for scalar beta, else [K] float64.

  Raises:
    ValueError: beta <= 0, or Phi not finite on the grid.
  """
  return win_rate_and_kl(transform, beta, num_points=num_points)[1]


def win_rate(
    transform: TransformLike,
    beta,
    procedure: str | CdfMap = 'standard',
    n: int = 1,
    *,
    num_points: int = DEFAULT_NUM_POINTS,
):
  """Win rate of g(pi) over g(pi_ref) for the policy tilted by Phi at beta.

  Args:
    transform: a `Transform`, a transform name, or a callable u -> Phi(u).
    beta: KL weight > 0, a scalar or [K].
    procedure: 'standard', 'bon', 'won', or a map g on CDFs (see
      `procedure_cdf_map`).
    n: samples per procedure call (1 for 'standard').
    num_points: grid nodes, >= 3.

  Returns:
    Win rate in [0, 1]: a float for scalar beta, else [K] float64.

  Raises:
    ValueError: beta <= 0, an invalid procedure or n, or Phi not finite.
  """
  return win_rate_and_kl(transform, beta, procedure, n, num_points=num_points)[
      0
  ]


def win_rate_and_kl(
    transform: TransformLike,
    beta,
    procedure: str | CdfMap = 'standard',
    n: int = 1,
    *,
    num_points: int = DEFAULT_NUM_POINTS,
):
  """Return (win rate, KL) together; arguments as in `win_rate`."""
  _check_num_points(num_points)
  betas, scalar = _betas(beta)
  kind, n_value = _procedure_kind(procedure, n)
  with jax.enable_x64(True):
    u, phi = _phi_on_grid(transform, num_points)
    kls, wins = _metrics(
        phi, jnp.asarray(betas), jnp.asarray([n_value]), u, (kind,)
    )
    _warn_if_at_rounding_limit(transform, betas, phi, u)
  return _unbatch(wins[0], scalar), _unbatch(kls, scalar)


def predict(
    transform: TransformLike,
    beta,
    n: int,
    *,
    num_points: int = DEFAULT_NUM_POINTS,
) -> dict[str, Any]:
  """Predict KL, W_1, W_BoN,n and W_WoN,n of the tilted policy in one pass.

  The values a trained policy should reach when RL with reward Phi(C) at KL
  weight beta converges and the reward model's scores are continuous.

  Args:
    transform: a `Transform`, a transform name, or a callable u -> Phi(u).
    beta: KL weight > 0, a scalar or [K].
    n: N of best-of-N and worst-of-N, >= 1.
    num_points: grid nodes, >= 3.

  Returns:
    {'kl', 'win_rate_standard', 'win_rate_bon', 'win_rate_won'}: floats for
    scalar beta, else [K] float64 arrays.
  """
  _check_num_points(num_points)
  betas, scalar = _betas(beta)
  procedure_cdf_map('bon', n)
  kinds = (_standard_kind, _bon_kind, _won_kind)
  ns = [1.0, float(n), float(n)]
  with jax.enable_x64(True):
    u, phi = _phi_on_grid(transform, num_points)
    kls, wins = _metrics(phi, jnp.asarray(betas), jnp.asarray(ns), u, kinds)
    _warn_if_at_rounding_limit(transform, betas, phi, u)
    wins = np.asarray(wins)
    return {
        'kl': _unbatch(kls, scalar),
        'win_rate_standard': _unbatch(wins[0], scalar),
        'win_rate_bon': _unbatch(wins[1], scalar),
        'win_rate_won': _unbatch(wins[2], scalar),
    }


def tradeoff_curve(
    transform: TransformLike,
    betas: Sequence[float] | np.ndarray,
    procedure: str | CdfMap = 'standard',
    n: int = 1,
    *,
    num_points: int = DEFAULT_NUM_POINTS,
) -> dict[str, np.ndarray]:
  """Trace win rate against KL over a grid of KL weights.

  Args:
    transform: a `Transform`, a transform name, or a callable u -> Phi(u).
    betas: [K] KL weights, each > 0.
    procedure: 'standard', 'bon', 'won', or a map g on CDFs.
    n: samples per procedure call.
    num_points: grid nodes, >= 3.

  Returns:
    {'beta': [K], 'kl': [K], 'win_rate': [K]} float64 arrays.
  """
  betas = np.atleast_1d(np.asarray(betas, np.float64))
  wins, kls = win_rate_and_kl(
      transform, betas, procedure, n, num_points=num_points
  )
  return {'beta': betas, 'kl': kls, 'win_rate': wins}


# ---------------------------------------------------------------------------
# Matching a KL budget.

# Bisection on log beta over [log(spread) - _LOG_RANGE_LOW,
# log(spread) + _LOG_RANGE_HIGH], spread = max Phi - min Phi. At the upper
# end the tilt is below 1e-12 (KL ~ 1e-25). The lower end, beta = spread *
# e^-700 (floored at 1e-300), lies far below any beta a float64 tilt can
# tell from 0, so the bisection never stops on it before the KL target: a
# target out of reach shows as a KL mismatch, which the callers check.
_LOG_RANGE_HIGH = 28.0
_LOG_RANGE_LOW = 700.0
_LOG_BETA_FLOOR = math.log(1e-300)
_BISECTION_STEPS = 64

# No tilt of a float64 grid reaches this KL (the finest cell is 1e-16 wide
# and the steepest log-density slope about 1e308).
_KL_CEILING = 700.0


@jax.jit
def _beta_for_kl_batch(
    phis: jax.Array, target: jax.Array, u: jax.Array
) -> jax.Array:
  """Return beta [K] with KL(phis[k], beta) = target, by bisection."""

  def one(phi):
    finite = jnp.isfinite(phi)
    spread = jnp.max(jnp.where(finite, phi, -jnp.inf)) - jnp.min(
        jnp.where(finite, phi, jnp.inf)
    )
    log_spread = jnp.log(jnp.maximum(spread, 1e-300))

    def kl_at(log_beta):
      return _tilt(phi, jnp.exp(log_beta), u)[1]

    def step(_, bounds):
      lo, hi = bounds
      mid = 0.5 * (lo + hi)
      # KL decreases in beta: too much KL means beta must grow.
      too_much = kl_at(mid) > target
      return jnp.where(too_much, mid, lo), jnp.where(too_much, hi, mid)

    lo, hi = jax.lax.fori_loop(
        0,
        _BISECTION_STEPS,
        step,
        (
            jnp.maximum(log_spread - _LOG_RANGE_LOW, _LOG_BETA_FLOOR),
            log_spread + _LOG_RANGE_HIGH,
        ),
    )
    return jnp.exp(0.5 * (lo + hi))

  return jax.vmap(one)(phis)


def _check_kl_target(name: str, value: float) -> None:
  base.check_positive(name, value)
  if value >= _KL_CEILING:
    raise ValueError(
        f'{name}={value} is beyond what a float64 tilt can reach (KL < '
        f'{_KL_CEILING:g} nats); use a smaller value.'
    )


def beta_for_kl(
    transform: TransformLike,
    kl_target: float,
    *,
    num_points: int = DEFAULT_NUM_POINTS,
) -> float:
  """Find the KL weight beta at which the tilted policy has KL = kl_target.

  KL(beta) decreases from its maximum (beta -> 0) to 0 (beta -> inf), so
  bisection in log beta finds the unique solution; the search range
  scales with the spread max Phi - min Phi, so any t works.

  Args:
    transform: a `Transform`, a transform name, or a callable u -> Phi(u),
      not constant.
    kl_target: KL in nats, in (0, the KL of the most concentrated policy
      the transform reaches); a bounded transform such as neg_exp with
      large t flattens out below some KL.
    num_points: grid nodes, >= 3.

  Returns:
    beta > 0 (relative accuracy about 1e-12).

  Raises:
    ValueError: kl_target out of range, or Phi constant or not finite.
  """
  _check_num_points(num_points)
  _check_kl_target('kl_target', kl_target)
  with jax.enable_x64(True):
    u, phi = _phi_on_grid(transform, num_points)
    if float(jnp.max(phi) - jnp.min(phi[jnp.isfinite(phi)])) <= 0:
      raise ValueError('A constant transform has KL 0 at every beta.')
    beta = float(_beta_for_kl_batch(phi[None], jnp.float64(kl_target), u)[0])
    reached = float(_kl_at(phi, jnp.float64(beta), u))
  if abs(reached - kl_target) > 1e-6 * max(1.0, kl_target):
    raise ValueError(
        f'Transform {_as_transform(transform)!r} cannot reach KL '
        f'{kl_target} on this grid (closest: {reached:.6g}); it flattens '
        'out before. Use a lower kl_target or a transform with a wider range.'
    )
  return beta


# ---------------------------------------------------------------------------
# Choosing t for exponential transforms.

_DEFAULT_FAMILY = {'standard': 'exp', 'bon': 'exp', 'won': 'neg_exp'}


def _family_phis(family: str, ts: jax.Array, u: jax.Array) -> jax.Array:
  """Phi of make_transform(family, t=t) for each t, as [T, G] (traceable).

  The same formulas as `transforms.make_transform`, written here so that t
  can be traced; a test checks that the two agree.
  """
  if family == 'exp':
    return jnp.exp(ts[:, None] * u[None, :])
  return -jnp.exp(-ts[:, None] * u[None, :])


_family_phis_jit = jax.jit(_family_phis, static_argnames=('family',))


@functools.partial(jax.jit, static_argnames=('kind',))
def _metrics_per_row(
    phis: jax.Array,
    betas: jax.Array,
    n: jax.Array,
    u: jax.Array,
    kind: CdfKind,
):
  """Return KL [T] and win rate [T] of row phis[i] at betas[i]."""
  kls, wins = jax.vmap(
      lambda phi, beta: _metrics(phi, beta[None], n[None], u, (kind,))
  )(phis, betas)
  return kls[:, 0], wins[:, 0, 0]


def _win_at_kl(
    ts: jax.Array,
    kl_budget: float,
    *,
    family: str,
    kind: CdfKind,
    n: float,
    num_points: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Return (win rate [T], beta [T]) for each t at KL = kl_budget.

  A t whose transform cannot reach the budget (neg_exp with large t is
  bounded, so its KL flattens out) gets win rate -inf.
  """
  u = jnp.asarray(_grid(num_points), jnp.float64)
  phis = _family_phis_jit(family, ts, u)
  betas = _beta_for_kl_batch(phis, jnp.float64(kl_budget), u)
  kls, wins = _metrics_per_row(phis, betas, jnp.float64(n), u, kind)
  reached = np.abs(np.asarray(kls) - kl_budget) <= 1e-6 * max(1.0, kl_budget)
  return np.where(reached, np.asarray(wins), -np.inf), np.asarray(betas)


# exp(t u) overflows float64 for t > 709.
_MAX_T = 700.0


def choose_t_details(
    procedure: str | CdfMap,
    n: int,
    kl_budget: float,
    *,
    family: str | None = None,
    t_range: tuple[float, float] = (0.1, 200.0),
    num_candidates: int = 48,
    num_points: int = 4097,
) -> dict[str, float]:
  """Choose t of an exponential transform for a procedure at a KL budget.

  For each t, beta is set so that the tilted policy has KL = kl_budget, and
  the procedure's win rate is evaluated there. The t with the largest win
  rate is found on a log-spaced grid of `num_candidates` values, then
  refined by golden-section search between its neighbours. When the best t
  is at an end of `t_range`, the optimum may lie outside it: a warning is
  logged and 'at_limit' names that end.

  Args:
    procedure: 'standard', 'bon', 'won', or a map g on CDFs.
    n: samples per procedure call.
    kl_budget: KL in nats, > 0.
    family: 'exp' or 'neg_exp'. Default: 'neg_exp' for 'won', else 'exp'.
    t_range: (lowest, highest) t searched, 0 < lowest < highest <= 700.
    num_candidates: log-spaced grid size, >= 3.
    num_points: uniform grid nodes (the grid is refined near 0 and 1 on
      top). The default 4097 keeps the search fast; win rates agree with
      16385 nodes to about 1e-6.

  Returns:
    {'t', 'beta', 'kl', 'win_rate', 'family', 'at_limit'} of the chosen
    transform; 'at_limit' is None, or 'low' or 'high' when t sits at that
    end of `t_range`.

  Raises:
    ValueError: invalid procedure, n, kl_budget, family or t_range.
  """
  kind, n_value = _procedure_kind(procedure, n)
  if family is None:
    family = (
        _DEFAULT_FAMILY.get(procedure, 'exp')
        if isinstance(procedure, str)
        else 'exp'
    )
  base.check_choice('family', family, ('exp', 'neg_exp'))
  _check_kl_target('kl_budget', kl_budget)
  base.check_int_at_least('num_candidates', num_candidates, 3)
  _check_num_points(num_points)
  if np.shape(t_range) != (2,):
    raise ValueError(
        f't_range must be a pair (low, high) of numbers, got {t_range!r}.'
    )
  base.check_positive('t_range', t_range)
  t_lo, t_hi = (float(t) for t in t_range)
  if not t_lo < t_hi <= _MAX_T:
    raise ValueError(
        f't_range must be (low, high) with 0 < low < high <= {_MAX_T:g}, got '
        f'{t_range}.'
    )

  with jax.enable_x64(True):
    search = functools.partial(
        _win_at_kl,
        kl_budget=float(kl_budget),
        family=family,
        kind=kind,
        n=n_value,
        num_points=num_points,
    )
    log_ts = np.linspace(math.log(t_lo), math.log(t_hi), num_candidates)
    wins = np.asarray(search(jnp.asarray(np.exp(log_ts)))[0])
    if not np.any(np.isfinite(wins)):
      raise ValueError(
          f'No {family} transform with t in {t_range} reaches KL '
          f'{kl_budget}; use a smaller kl_budget or another t_range.'
      )
    best = int(np.argmax(wins))
    lo = log_ts[max(best - 1, 0)]
    hi = log_ts[min(best + 1, num_candidates - 1)]

    def objective(log_t):
      return float(search(jnp.asarray([math.exp(log_t)]))[0][0])

    # Golden-section search for the maximum on [lo, hi]; 22 steps shrink
    # the bracket to 0.618^22 = 2.5e-5 of its width (about 1e-5 in log t).
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = objective(c), objective(d)
    for _ in range(22):
      if fc >= fd:
        b, d, fd = d, c, fc
        c = b - ratio * (b - a)
        fc = objective(c)
      else:
        a, c, fc = c, d, fd
        d = a + ratio * (b - a)
        fd = objective(d)
    candidates = [(wins[best], log_ts[best]), (fc, c), (fd, d)]
    _, log_t = max(candidates)
    t = math.exp(log_t)
    win, beta = search(jnp.asarray([t]))
    win, beta = np.asarray(win), np.asarray(beta)
  # The golden-section search converges to within about 1e-6 (relative) of
  # an end of the bracket when the maximum lies there or beyond.
  at_limit = None
  if best == 0 and log_t - log_ts[0] < 1e-4:
    at_limit = 'low'
  elif best == num_candidates - 1 and log_ts[-1] - log_t < 1e-4:
    at_limit = 'high'
  if at_limit is not None:
    logging.warning(
        'choose_t for procedure=%r n=%d kl_budget=%g: the best t=%.6g is at '
        'the %s end of t_range=%s, so the optimum may lie outside it; widen '
        't_range.',
        procedure,
        n,
        kl_budget,
        t,
        at_limit,
        (t_lo, t_hi),
    )
  return {
      't': t,
      'beta': float(beta[0]),
      'kl': float(kl_budget),
      'win_rate': float(win[0]),
      'family': family,
      'at_limit': at_limit,
  }


def choose_t(
    procedure: str | CdfMap,
    n: int,
    kl_budget: float,
    **kwargs: Any,
) -> float:
  """Return the t of `choose_t_details` (same arguments)."""
  return choose_t_details(procedure, n, kl_budget, **kwargs)['t']


# ---------------------------------------------------------------------------
# The optimal transform as a fixed point.


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimalSolution:
  """Result of the fixed-point iteration for the optimal transform.

  Attributes:
    u: [G] grid on [0, 1].
    transform_values: [G] the optimal Phi(u) = R(u), shifted so Phi(0) = 0.
    density: [G] the optimal policy's calibrated-space density q(u).
    kl: KL(pi || pi_ref) of the optimum.
    win_rate: the procedure's win rate of the optimum.
    objective: win_rate - beta * kl.
    iterations: fixed-point iterations run.
    converged: whether the update fell below the tolerance.
  """

  u: np.ndarray
  transform_values: np.ndarray
  density: np.ndarray
  kl: float
  win_rate: float
  objective: float
  iterations: int
  converged: bool


def _marginal_gain(
    q: jax.Array, kind: CdfKind, n: jax.Array, w: jax.Array
) -> jax.Array:
  """R(u) = dW/dq(u), the functional derivative, with R(0) = 0."""
  grad = jax.grad(_win_of_density)(q, kind, n, w) / w
  return grad - grad[0]


# The adaptive step never drops below this (or below `damping`, if that is
# smaller). Without a floor, a residual that wobbles at rounding level halves
# the step again and again until the iteration stops moving.
_MIN_STEP = 0.01


@functools.partial(
    jax.jit, static_argnames=('kind', 'num_points', 'max_iterations')
)
def _fixed_point(beta, damping, tol, n, *, kind, num_points, max_iterations):
  """Iterate log q <- (1 - a) log q + a log normalize(exp(R(q) / beta)).

  Mixing log-densities is damping on the transform: up to normalization it
  is R <- (1 - a) R + a R(q). The step a starts at `damping`, halves
  whenever the residual grows (down to min(_MIN_STEP, damping)) and grows
  by 10% (up to `damping`) whenever it shrinks.
  """
  w = _weights(num_points)
  floor = jnp.minimum(_MIN_STEP, damping)

  def target_log(log_q):
    return _log_density(_marginal_gain(jnp.exp(log_q), kind, n, w), beta, w)

  def residual(log_q, new_log_q):
    q, new_q = jnp.exp(log_q), jnp.exp(new_log_q)
    return jnp.max(jnp.abs(new_q - q)) / jnp.max(new_q)

  def cond(carry):
    _, _, change, iteration = carry
    return (change > tol) & (iteration < max_iterations)

  def body(carry):
    log_q, step, previous, iteration = carry
    target = target_log(log_q)
    change = residual(log_q, target)
    step = jnp.where(
        change > previous,
        jnp.maximum(0.5 * step, floor),
        jnp.minimum(1.1 * step, damping),
    )
    mixed = (1.0 - step) * log_q + step * target
    mixed = mixed - jax.nn.logsumexp(mixed, b=w)
    return mixed, step, change, iteration + 1

  log_q0 = jnp.zeros((num_points,), jnp.float64)
  log_q, step, change, iterations = jax.lax.while_loop(
      cond, body, (log_q0, damping, jnp.float64(jnp.inf), jnp.int32(0))
  )
  q = jnp.exp(log_q)
  return q, _marginal_gain(q, kind, n, w), change, iterations, step


def solve_optimal(
    procedure: str | CdfMap,
    n: int,
    beta: float,
    *,
    num_points: int = 4097,
    damping: float = 0.5,
    tol: float = 1e-10,
    max_iterations: int = 20000,
) -> OptimalSolution:
  """Find the transform that maximizes W^g(pi) - beta KL(pi || pi_ref).

  At the optimum q* the transform is the marginal gain of the win rate,
  R = dW/dq evaluated at q* itself, and q* ∝ exp(R / beta). The iteration
  log q <- (1 - a) log q + a log normalize(exp(R(q) / beta)), that is
  R <- (1 - a) R + a R(q), starts from the uniform density; the step a
  starts at `damping`, halves when the residual grows and grows back
  when it shrinks, never below min(0.01, damping). R comes from `jax.grad` of the discretized win rate, so a
  user-defined procedure works as well as best-of-N (where
  R(u) = N^2 ∫_0^u Q^(N-1) s^(N-1) ds) and worst-of-N.

  For best-of-N the objective is concave in q, so the fixed point is the
  global optimum. For worst-of-N the win rate is convex in q, so the fixed
  point is a stationary point that is not guaranteed to be the global
  optimum.

  Args:
    procedure: 'standard', 'bon', 'won', or a map g on CDFs.
    n: samples per procedure call.
    beta: KL weight > 0.
    num_points: grid nodes G, >= 3.
    damping: largest step size, in (0, 1]. Smaller values converge more
      slowly to the same point; 0.5 converges for beta down to 1e-3.
    tol: stop when max |q_new - q| / max q_new <= tol.
    max_iterations: iteration limit, >= 1.

  Returns:
    An `OptimalSolution`. A run that hits `max_iterations` is logged as a
    warning and has `converged=False`.

  Raises:
    ValueError: invalid procedure, n, beta, damping or iteration settings.
  """
  kind, n_value = _procedure_kind(procedure, n)
  base.check_positive('beta', beta)
  if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
    raise ValueError(f'damping must be a number in (0, 1], got {damping!r}.')
  if not 0.0 < damping <= 1.0:
    raise ValueError(f'damping must be in (0, 1], got {damping!r}.')
  base.check_positive('tol', tol)
  base.check_int_at_least('max_iterations', max_iterations, 1)
  _check_num_points(num_points)

  with jax.enable_x64(True):
    q, gain, change, iterations, step = _fixed_point(
        jnp.float64(beta),
        jnp.float64(damping),
        jnp.float64(tol),
        jnp.float64(n_value),
        kind=kind,
        num_points=num_points,
        max_iterations=max_iterations,
    )
    w = _weights(num_points)
    log_q = jnp.log(q)
    kl_value = float(_kl_of_log_density(log_q, w))
    win = float(_win_of_density(q, kind, jnp.float64(n_value), w))
    u = np.linspace(0.0, 1.0, num_points)
    converged = bool(change <= tol)
  if not converged:
    logging.warning(
        'Optimal transform for procedure=%r n=%d beta=%g did not converge in '
        '%d iterations: the last relative change of q was %.3g > tol=%.3g, '
        'at step %.3g. Raise max_iterations; if the change has stalled, '
        'loosen tol.',
        procedure,
        n,
        beta,
        int(iterations),
        float(change),
        tol,
        float(step),
    )
  return OptimalSolution(
      u=u,
      transform_values=np.asarray(gain),
      density=np.asarray(q),
      kl=kl_value,
      win_rate=win,
      objective=win - beta * kl_value,
      iterations=int(iterations),
      converged=converged,
  )


def optimal_transform(
    procedure: str | CdfMap,
    n: int,
    beta: float,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
  """Return (u [G], R(u) [G]): the optimal transform on a grid.

  Arguments as in `solve_optimal`. Use it in RL through
  `make_transform('interpolated', u=u, values=values)`.
  """
  solution = solve_optimal(procedure, n, beta, **kwargs)
  return solution.u, solution.transform_values
