"""Inference-time procedures on sampled rewards, and win-rate estimators.

Best-of-N draws N responses and keeps the one with the highest reward;
worst-of-N keeps the lowest. The win rate of policy pi over the reference
under a procedure is P(r(y1) > r(y2)) + 1/2 P(r(y1) = r(y2)), with y1 the
procedure's output on pi and y2 its output on pi_ref.

Estimators, per prompt, from S policy rewards p and M reference rewards r:

* standard (N = 1): the Mann-Whitney statistic
  (1 / (S M)) sum_i sum_j [p_i > r_j] + 1/2 [p_i = r_j], computed by sorting
  r and two binary searches per p_i, O((S + M) log M).
* best-of-N: the U-statistic that averages the comparison over every
  N-subset of the S policy samples and every N-subset of the M reference
  samples. Sorted ascending, the i-th smallest of S is the maximum of a
  uniformly random N-subset with probability C(i - 1, N - 1) / C(S, N), so
  the average is a weighted Mann-Whitney sum with these weights on both
  sides. It is unbiased for S >= N and M >= N. With ties, the weights still
  give the exact distribution of the subset maximum's value.
* worst-of-N: the same with weights C(S - i, N - 1) / C(S, N) (the i-th
  smallest is the minimum of the subset).

Each estimate is the mean over B prompts, with the standard error
std(per-prompt estimates, ddof=1) / sqrt(B). It counts only the variation
between prompts.

References:
  Balashankar, Sun et al., "InfAlign: Inference-aware language model
  alignment", ICML 2025, arXiv:2412.19792 (win rates under best-of-N and
  worst-of-N).
  Hoeffding, "A class of statistics with asymptotically normal
  distribution", Ann. Math. Statist. 19 (1948) (U-statistics).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import base

__all__ = (
    'PROCEDURE_NAMES',
    'best_of_n',
    'worst_of_n',
    'select',
    'order_statistic_weights',
    'win_rate_per_prompt',
    'win_rate',
)

PROCEDURE_NAMES = ('standard', 'bon', 'won')


def _check_rewards(rewards) -> None:
  base.check_rank('rewards', rewards, 2)
  if jnp.shape(rewards)[1] < 1:
    raise ValueError(
        f'rewards needs N >= 1 samples per prompt, got shape '
        f'{jnp.shape(rewards)}.'
    )
  base.check_finite('rewards', rewards)


def best_of_n(rewards: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Select the highest-reward sample per prompt.

  Tie rule: among samples with the maximal reward, the one with the lowest
  index wins (`jnp.argmax` semantics). Samples are exchangeable draws, so
  this choice does not change the distribution of the selected reward.

  Args:
    rewards: [B, N] rewards of N samples per prompt.

  Returns:
    (index [B] int32, reward [B]): the selected sample and its reward. Under
    `jax.jit` a NaN counts as the maximum (`jnp.argmax` semantics).

  Raises:
    ValueError: rewards not rank 2, N = 0, or (outside `jax.jit`) non-finite.
  """
  _check_rewards(rewards)

  rewards = jnp.asarray(rewards)
  index = jnp.argmax(rewards, axis=-1).astype(jnp.int32)
  return index, jnp.take_along_axis(rewards, index[:, None], axis=-1)[:, 0]


def worst_of_n(rewards: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Select the lowest-reward sample per prompt.

  Tie rule: among samples with the minimal reward, the one with the lowest
  index wins (`jnp.argmin` semantics).

  Args:
    rewards: [B, N] rewards of N samples per prompt.

  Returns:
    (index [B] int32, reward [B]). Under `jax.jit` a NaN counts as the
    minimum (`jnp.argmin` semantics).

  Raises:
    ValueError: rewards not rank 2, N = 0, or (outside `jax.jit`) non-finite.
  """
  _check_rewards(rewards)

  rewards = jnp.asarray(rewards)
  index = jnp.argmin(rewards, axis=-1).astype(jnp.int32)
  return index, jnp.take_along_axis(rewards, index[:, None], axis=-1)[:, 0]


def select(
    rewards: jax.typing.ArrayLike, procedure: str
) -> tuple[jax.Array, jax.Array]:
  """Apply 'bon' (`best_of_n`) or 'won' (`worst_of_n`) to rewards [B, N]."""
  base.check_choice('procedure', procedure, ('bon', 'won'))
  if procedure == 'bon':
    return best_of_n(rewards)
  return worst_of_n(rewards)


@functools.lru_cache(maxsize=128)
def _weights(num_samples: int, n: int, procedure: str) -> np.ndarray:
  total = math.comb(num_samples, n)
  ranks = range(1, num_samples + 1)
  if procedure == 'bon':
    counts = [math.comb(i - 1, n - 1) for i in ranks]
  else:
    counts = [math.comb(num_samples - i, n - 1) for i in ranks]
  # Integer true division rounds once, so each weight is the nearest double.
  weights = np.array([c / total for c in counts], np.float64)
  weights.setflags(write=False)
  return weights


def order_statistic_weights(
    num_samples: int, n: int, procedure: str = 'bon'
) -> np.ndarray:
  """Probability that the i-th smallest of S samples is the subset's output.

  Take a uniformly random n-subset of S samples sorted ascending. For 'bon',
  entry i - 1 is C(i - 1, n - 1) / C(S, n), the probability that the i-th
  smallest is the subset maximum. For 'won' it is C(S - i, n - 1) / C(S, n)
  (the subset minimum). The weights sum to 1, and for n = 1 they are 1 / S.

  Args:
    num_samples: S >= n.
    n: subset size >= 1.
    procedure: 'bon' or 'won'.

  Returns:
    [S] float64 NumPy array (read-only).

  Raises:
    ValueError: n < 1, S < n, or an unknown procedure.
  """
  base.check_int_at_least('n', n, 1)
  base.check_int_at_least('num_samples', num_samples, n)
  base.check_choice('procedure', procedure, ('bon', 'won'))
  return _weights(int(num_samples), int(n), procedure)


def _check_win_rate_args(policy_rewards, ref_rewards, procedure, n) -> None:
  base.check_rank('policy_rewards', policy_rewards, 2)
  base.check_rank('ref_rewards', ref_rewards, 2)
  base.check_same_leading_dims(
      ('policy_rewards', 'ref_rewards'), (policy_rewards, ref_rewards)
  )
  base.check_choice('procedure', procedure, PROCEDURE_NAMES)
  base.check_int_at_least('n', n, 1)
  if jnp.shape(policy_rewards)[0] < 1:
    raise ValueError(
        'policy_rewards and ref_rewards have B=0 prompts; a win rate needs '
        'at least one prompt (B >= 1).'
    )
  if procedure == 'standard' and n != 1:
    raise ValueError(
        f"procedure 'standard' samples once, so n must be 1, got n={n}. Use "
        "'bon' or 'won' for n > 1."
    )
  num_policy = jnp.shape(policy_rewards)[1]
  num_reference = jnp.shape(ref_rewards)[1]
  if num_policy < n or num_reference < n:
    raise ValueError(
        f'The {procedure} estimator with n={n} needs at least n samples per '
        f'prompt on both sides, got S={num_policy} policy and '
        f'M={num_reference} reference samples. Draw more samples or lower n.'
    )
  base.check_finite('policy_rewards', policy_rewards)
  base.check_finite('ref_rewards', ref_rewards)


def _weighted_win(policy_rewards, ref_rewards, policy_weights, ref_weights):
  """Per-prompt sum_i sum_j a_i v_j ([p_i > r_j] + 1/2 [p_i = r_j])."""
  dtype = jnp.promote_types(
      jnp.result_type(policy_rewards, ref_rewards), jnp.float32
  )
  sorted_policy = jnp.sort(policy_rewards, axis=-1)
  sorted_ref = jnp.sort(ref_rewards, axis=-1)
  policy_weights = jnp.asarray(policy_weights, dtype)
  # Cumulative reference weight below insertion point k: cumulative[k].
  # The weights are summed in float64 on the host and the total scaled to
  # exactly 1: a float32 cumsum over M = 1e5 weights ends near 1 + 2e-7.
  cumulative = np.concatenate([[0.0], np.cumsum(ref_weights, dtype=np.float64)])
  cumulative = jnp.asarray(cumulative / cumulative[-1], dtype)

  def one(policy_row, ref_row):
    below = jnp.searchsorted(ref_row, policy_row, side='left')
    below_or_equal = jnp.searchsorted(ref_row, policy_row, side='right')
    score = 0.5 * (cumulative[below] + cumulative[below_or_equal])
    # Rounding in the weighted float32 sum can still overshoot 1 by an ulp
    # or so; the clip keeps every estimate a probability.
    return jnp.clip(jnp.sum(policy_weights * score), 0.0, 1.0)

  return jax.vmap(one)(sorted_policy, sorted_ref)


def win_rate_per_prompt(
    policy_rewards: jax.typing.ArrayLike,
    ref_rewards: jax.typing.ArrayLike,
    procedure: str = 'standard',
    n: int = 1,
) -> jax.Array:
  """Estimate each prompt's win rate of the policy over the reference.

  See the module docstring for the estimators. `procedure` and `n` fix
  array shapes, so under `jax.jit` pass them as static arguments (for
  example with `functools.partial`).

  Args:
    policy_rewards: [B, S] rewards of S policy samples per prompt.
    ref_rewards: [B, M] rewards of M reference samples per prompt, any order.
    procedure: 'standard', 'bon' (best-of-n) or 'won' (worst-of-n).
    n: samples per procedure call; 1 for 'standard', and S >= n, M >= n.

  Returns:
    [B] unbiased estimates in [0, 1], float32 for float32 input. Reference
    weights are accumulated in float64 on the host, and each estimate is
    clipped to [0, 1] against float32 rounding (at most a few ulps). Under
    `jax.jit` the finiteness check is skipped, and a NaN reward ranks above
    every finite reward.

  Raises:
    ValueError: rank or batch mismatch, B = 0, an unknown procedure, n < 1,
      S or M < n, or (outside `jax.jit`) non-finite rewards.
  """
  _check_win_rate_args(policy_rewards, ref_rewards, procedure, n)

  policy_rewards = jnp.asarray(policy_rewards)
  ref_rewards = jnp.asarray(ref_rewards)
  num_policy = policy_rewards.shape[1]
  num_reference = ref_rewards.shape[1]
  if procedure == 'standard':
    policy_weights = np.full(num_policy, 1.0 / num_policy)
    ref_weights = np.full(num_reference, 1.0 / num_reference)
  else:
    policy_weights = order_statistic_weights(num_policy, n, procedure)
    ref_weights = order_statistic_weights(num_reference, n, procedure)
  return _weighted_win(policy_rewards, ref_rewards, policy_weights, ref_weights)


def win_rate(
    policy_rewards: jax.typing.ArrayLike,
    ref_rewards: jax.typing.ArrayLike,
    procedure: str = 'standard',
    n: int = 1,
) -> tuple[jax.Array, jax.Array]:
  """Estimate the win rate over prompts, with its standard error.

  Args: as in `win_rate_per_prompt`.

  Returns:
    (estimate, standard_error): scalars. The estimate is the mean of the
    per-prompt estimates; the standard error is their std (ddof=1) divided
    by sqrt(B), and NaN when B = 1.

  Raises:
    ValueError: as in `win_rate_per_prompt`.
  """
  per_prompt = win_rate_per_prompt(policy_rewards, ref_rewards, procedure, n)
  num_prompts = per_prompt.shape[0]
  estimate = jnp.mean(per_prompt)
  if num_prompts < 2:
    return estimate, jnp.full((), jnp.nan, per_prompt.dtype)
  standard_error = jnp.std(per_prompt, ddof=1) / math.sqrt(num_prompts)
  return estimate, standard_error
