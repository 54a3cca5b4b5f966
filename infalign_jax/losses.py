"""Token log-probabilities, KL estimators and KL-regularized RL losses.

Arrays in, arrays out: no function here takes a model. Every loss returns one value
per prompt `[B]` and leaves the reduction over prompts to the caller.

Notation: B prompts, S policy samples per prompt, T tokens, V vocabulary.
`log_ratio` is always `log pi(y) - log pi_ref(y)` for a sample `y ~ pi`.

KL estimators (Schulman's naming, "Approximating KL divergence", 2020), as
functions of the log ratio `l` of an on-policy sample:

- k1 = l: unbiased for KL(pi || pi_ref), high variance, can be negative.
- k2 = l^2 / 2: biased, non-negative; its gradient at on-policy samples has
  expectation equal to the gradient of KL(pi || pi_ref).
- k3 = exp(-l) - 1 + l: unbiased, non-negative, lower variance than k1.

Where the KL term sits changes its gradient. The RL losses apply the
estimator to the sequence log ratio `sum_t log(pi / pi_ref)` and support two
placements:

- `'reward'` (the default): `beta * k(l)` is subtracted from the reward before
  the baseline and then treated as a constant, so it reaches the parameters
  only through the score function `grad log pi(y)`. With k1 the expected
  gradient is exactly `beta * grad KL(pi || pi_ref)`; with k2 or k3 it is not.
- `'loss'`: `beta * k(l)` is added to the loss and differentiated through
  `log pi(y)` at fixed samples. With k2 the expected gradient is exactly
  `beta * grad KL(pi || pi_ref)`; with k3 it is `beta * grad KL(pi_ref || pi)`
  (the reverse KL); with k1 its expectation is zero.

tests/losses_test.py checks each of these statements against exact gradients
on a small categorical policy.

NOTE: k3 of a sequence log ratio below about -88 overflows float32
(exp(88) > 3.4e38). That needs a sequence far less likely under pi than
under pi_ref; k1 and k2 have no such limit.
"""

from collections.abc import Callable
import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = (
    'KL_ESTIMATORS',
    'KL_PLACEMENTS',
    'kl_estimate',
    'kl_k1',
    'kl_k2',
    'kl_k3',
    'kl_regularized_rewards',
    'leave_one_out_advantages',
    'masked_mean',
    'masked_sum',
    'ppo_clip_loss',
    'reinforce_loo_loss',
    'sequence_logprobs',
    'token_logprobs',
)

KL_PLACEMENTS = ('reward', 'loss')


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Compute log pi(target) per position, in float32.

  Args:
    logits: [..., T, V] unnormalized log-probabilities, any float dtype. The
      log-softmax runs in float32 whatever the input dtype.
    targets: [..., T] integer token ids in [0, V).

  Returns:
    [..., T] float32 log-probabilities of the targets.

  Raises:
    ValueError: on mismatched shapes, non-integer targets, or a concrete
      target outside [0, V). Traced targets (under jit) are not checked:
      there a target >= V (or < -V) gives NaN, and one in [-V, 0) wraps
      around to target + V like NumPy indexing.
  """
  if logits.ndim != targets.ndim + 1:
    raise ValueError(
        f'logits must have one more axis than targets: got logits shape '
        f'{logits.shape} and targets shape {targets.shape}. Pass logits '
        '[..., T, V] and targets [..., T].'
    )
  if logits.shape[:-1] != targets.shape:
    raise ValueError(
        f'logits shape {logits.shape} does not match targets shape '
        f'{targets.shape} on the leading axes; they must agree on [..., T].'
    )
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(
        f'targets must be integer token ids, got dtype {targets.dtype}.'
    )
  _check_targets(targets, logits.shape[-1])
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]


def _check_targets(targets, vocab_size: int) -> None:
  """Raise ValueError if concrete `targets` contain an id outside [0, V)."""
  if isinstance(targets, jax.core.Tracer) or not np.size(targets):
    return
  values = np.asarray(targets)
  bad = np.logical_or(values < 0, values >= vocab_size)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f'targets contain token id {int(values[index])} at index {index}, '
        f'outside the vocabulary range [0, V={vocab_size}) of the logits; '
        'pass targets from the same tokenizer as the model.'
    )


def _check_mask(values: jax.Array, mask: jax.Array) -> jax.Array:
  if values.shape != mask.shape:
    raise ValueError(
        f'mask shape {mask.shape} differs from values shape {values.shape}; '
        'pass a mask with exactly the shape of the values.'
    )
  return mask.astype(jnp.float32)


def masked_sum(values: jax.Array, mask: jax.Array, *, axis=-1) -> jax.Array:
  """Sum `values` over `axis`, counting only entries where `mask` is set.

  Masked entries are replaced by zero before the sum, so a NaN or infinity
  at a padded position never leaks into the result.
  """
  mask = _check_mask(values, mask)
  return jnp.sum(jnp.where(mask > 0, values * mask, 0.0), axis=axis)


def masked_mean(values: jax.Array, mask: jax.Array, *, axis=-1) -> jax.Array:
  """Average `values` over `axis` where `mask` is set; 0 where none is set."""
  mask = _check_mask(values, mask)
  count = jnp.sum(mask, axis=axis)
  return masked_sum(values, mask, axis=axis) / jnp.maximum(count, 1.0)


def sequence_logprobs(logprobs: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum per-token log-probabilities `[..., T]` over completion tokens."""
  return masked_sum(logprobs.astype(jnp.float32), mask, axis=-1)


def kl_k1(log_ratio: jax.Array) -> jax.Array:
  """k1 = log(pi / pi_ref), elementwise."""
  return log_ratio


def kl_k2(log_ratio: jax.Array) -> jax.Array:
  """k2 = (log(pi / pi_ref))^2 / 2, elementwise."""
  return 0.5 * jnp.square(log_ratio)


def kl_k3(log_ratio: jax.Array) -> jax.Array:
  """k3 = pi_ref / pi - 1 - log(pi_ref / pi), elementwise.

  Computed as `expm1(-l) + l`, which keeps full precision near l = 0.
  """
  return jnp.expm1(-log_ratio) + log_ratio


KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'k1': kl_k1,
    'k2': kl_k2,
    'k3': kl_k3,
}


def _check_estimator(estimator: str) -> Callable[[jax.Array], jax.Array]:
  if estimator not in KL_ESTIMATORS:
    raise ValueError(
        f'Unknown KL estimator {estimator!r}; use one of '
        f'{sorted(KL_ESTIMATORS)}.'
    )
  return KL_ESTIMATORS[estimator]


def _check_placement(placement: str) -> None:
  if placement not in KL_PLACEMENTS:
    raise ValueError(
        f'Unknown KL placement {placement!r}; use one of {KL_PLACEMENTS}.'
    )


def _concrete_beta(beta) -> float | None:
  """Return `beta` as a float, or None when it is traced."""
  # A traced beta (an adaptive coefficient) cannot be checked here.
  if isinstance(beta, jax.core.Tracer):
    return None
  if isinstance(beta, (bool, np.bool_)):
    raise ValueError(f'beta must be a real number >= 0, got {beta!r}.')
  if isinstance(beta, numbers.Real):
    return float(beta)
  if isinstance(beta, (jax.Array, np.ndarray)) and not np.shape(beta):
    return float(beta)
  raise ValueError(f'beta must be a real scalar >= 0, got {beta!r}.')


def _check_beta(beta) -> None:
  value = _concrete_beta(beta)
  if value is not None and not value >= 0:
    raise ValueError(f'beta must be >= 0, got {value}.')


def kl_estimate(
    logprobs: jax.Array, ref_logprobs: jax.Array, *, estimator: str = 'k1'
) -> jax.Array:
  """Apply a KL estimator to `logprobs - stop_gradient(ref_logprobs)`.

  The reference log-probabilities never receive a gradient: the reference
  policy is frozen.

  Args:
    logprobs: [...] log pi of on-policy samples (per token or per sequence).
    ref_logprobs: [...] log pi_ref of the same samples.
    estimator: 'k1', 'k2' or 'k3' (see the module docstring).

  Returns:
    [...] float32 estimator values; their mean over samples estimates
    KL(pi || pi_ref) (k1, k3) or upper-bounds its second-order term (k2).
  """
  estimator_fn = _check_estimator(estimator)
  if logprobs.shape != ref_logprobs.shape:
    raise ValueError(
        f'logprobs shape {logprobs.shape} differs from ref_logprobs shape '
        f'{ref_logprobs.shape}; both must score the same samples.'
    )
  log_ratio = logprobs.astype(jnp.float32) - jax.lax.stop_gradient(
      ref_logprobs.astype(jnp.float32)
  )
  return estimator_fn(log_ratio)


def _check_samples(name: str, values: jax.Array) -> None:
  if values.ndim != 2:
    raise ValueError(
        f'{name} must have shape [B, S] (prompts, samples per prompt), got '
        f'shape {values.shape}.'
    )


def leave_one_out_advantages(rewards: jax.Array) -> jax.Array:
  """Subtract from each sample the mean reward of the other samples.

  A_s = R_s - mean_{j != s} R_j = S / (S - 1) * (R_s - mean_j R_j). The
  baseline does not depend on sample s, so the policy gradient stays unbiased.

  Args:
    rewards: [B, S] rewards of S >= 2 samples per prompt.

  Returns:
    [B, S] float32 advantages, with gradients stopped.
  """
  _check_samples('rewards', rewards)
  num_samples = rewards.shape[1]
  if num_samples < 2:
    raise ValueError(
        f'The leave-one-out baseline needs S >= 2 samples per prompt, got '
        f'S = {num_samples}. Draw at least two samples per prompt.'
    )
  rewards = jax.lax.stop_gradient(rewards.astype(jnp.float32))
  total = jnp.sum(rewards, axis=1, keepdims=True)
  return rewards - (total - rewards) / (num_samples - 1)


def kl_regularized_rewards(
    rewards: jax.Array,
    log_ratio: jax.Array,
    *,
    beta,
    estimator: str = 'k1',
) -> jax.Array:
  """Return `stop_gradient(rewards - beta * k(log_ratio))`: KL in the reward.

  Args:
    rewards: [B, S] task rewards (after calibration and transform).
    log_ratio: [B, S] sequence log ratio log pi(y) - log pi_ref(y).
    beta: KL weight, >= 0.
    estimator: 'k1' (exact gradient of KL through the score function), 'k2'
      or 'k3'.

  Returns:
    [B, S] float32 rewards with the penalty folded in; no gradient flows
    through them.
  """
  estimator_fn = _check_estimator(estimator)
  _check_beta(beta)
  if rewards.shape != log_ratio.shape:
    raise ValueError(
        f'rewards shape {rewards.shape} differs from log_ratio shape '
        f'{log_ratio.shape}; both must be [B, S].'
    )
  penalty = estimator_fn(log_ratio.astype(jnp.float32))
  return jax.lax.stop_gradient(rewards.astype(jnp.float32) - beta * penalty)


def reinforce_loo_loss(
    seq_logprobs: jax.Array,
    rewards: jax.Array,
    *,
    ref_seq_logprobs: jax.Array | None = None,
    beta=0.0,
    kl_estimator: str = 'k1',
    kl_placement: str = 'reward',
) -> jax.Array:
  """KL-regularized REINFORCE with a leave-one-out baseline, per prompt.

  With l = log pi(y) - log pi_ref(y) per sample and k the chosen estimator:

  - placement 'reward' (default): R' = sg(R - beta * k(l)) and
    loss = -mean_s sg(A(R')_s) * log pi(y_s).
  - placement 'loss': loss = -mean_s sg(A(R)_s) * log pi(y_s)
    + beta * mean_s k(l_s).

  A is the leave-one-out advantage over the S samples of the prompt and sg is
  stop_gradient. Rewards, advantages and reference log-probabilities never
  receive a gradient. The gradient of the mean loss estimates
  -grad (E[R] - beta * KL(pi || pi_ref)) exactly for ('reward', 'k1') and
  ('loss', 'k2'); see the module docstring for the other pairs.

  Args:
    seq_logprobs: [B, S] log pi(y) of S on-policy samples per prompt; the
      gradient flows through these.
    rewards: [B, S] rewards (already calibrated and transformed).
    ref_seq_logprobs: [B, S] log pi_ref(y); required when beta != 0.
    beta: KL weight, >= 0.
    kl_estimator: 'k1', 'k2' or 'k3'.
    kl_placement: 'reward' or 'loss'.

  Returns:
    [B] float32 loss per prompt.
  """
  _check_samples('seq_logprobs', seq_logprobs)
  _check_samples('rewards', rewards)
  if seq_logprobs.shape != rewards.shape:
    raise ValueError(
        f'seq_logprobs shape {seq_logprobs.shape} differs from rewards shape '
        f'{rewards.shape}; both must be [B, S].'
    )
  _check_placement(kl_placement)
  estimator_fn = _check_estimator(kl_estimator)
  _check_beta(beta)
  seq_logprobs = seq_logprobs.astype(jnp.float32)
  rewards = jax.lax.stop_gradient(rewards.astype(jnp.float32))
  kl_term = jnp.zeros(rewards.shape[:1], jnp.float32)
  if ref_seq_logprobs is None:
    if _concrete_beta(beta) != 0:
      raise ValueError(
          'ref_seq_logprobs is required when beta != 0: pass log pi_ref of '
          'the samples, or set beta=0.'
      )
  else:
    if ref_seq_logprobs.shape != seq_logprobs.shape:
      raise ValueError(
          f'ref_seq_logprobs shape {ref_seq_logprobs.shape} differs from '
          f'seq_logprobs shape {seq_logprobs.shape}; both must be [B, S] '
          'log-probabilities of the same samples.'
      )
    log_ratio = seq_logprobs - jax.lax.stop_gradient(
        ref_seq_logprobs.astype(jnp.float32)
    )
    if kl_placement == 'reward':
      rewards = kl_regularized_rewards(
          rewards,
          jax.lax.stop_gradient(log_ratio),
          beta=beta,
          estimator=kl_estimator,
      )
    else:
      kl_term = beta * jnp.mean(estimator_fn(log_ratio), axis=1)
  advantages = leave_one_out_advantages(rewards)
  policy_term = -jnp.mean(advantages * seq_logprobs, axis=1)
  return policy_term + kl_term


def ppo_clip_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon: float = 0.2,
    ref_logprobs: jax.Array | None = None,
    beta=0.0,
    kl_estimator: str = 'k2',
    kl_placement: str = 'reward',
) -> jax.Array:
  """PPO clipped surrogate with optional KL term, per prompt.

  Per token, with rho = exp(log pi(y_t) - log pi_old(y_t)) and the sequence
  advantage A of its sample: `-min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)`,
  averaged over completion tokens and then over the S samples. Gradients
  flow only through `logprobs`; `old_logprobs`, `advantages` and
  `ref_logprobs` are constants (stop_gradient). Call it several times on the
  same samples (inner epochs) as the parameters move away from pi_old; the
  clip stops each token's ratio from moving more than eps in the direction
  its advantage favours.

  KL placement:

  - 'reward' (default): this function applies no KL term. The caller must
    already have folded `-beta * k(l)` into the rewards behind `advantages`
    (`kl_regularized_rewards`, then `leave_one_out_advantages`).
    `ref_logprobs` must be None and `beta` 0; anything else raises
    ValueError rather than being ignored. A traced `beta` cannot be checked
    and is ignored.
  - 'loss': adds `beta * mean_s k(l_s)` with l the sequence log ratio of the
    current parameters. At the first inner epoch (pi = pi_old) the k2
    gradient equals the exact gradient of KL(pi || pi_ref) in expectation;
    later epochs use the same samples without importance weights.

  Args:
    logprobs: [B, S, T] log pi of the sampled tokens under the current
      parameters.
    old_logprobs: [B, S, T] log pi_old of the same tokens, from the policy
      that drew the samples.
    advantages: [B, S] sequence advantages.
    mask: [B, S, T] completion mask (1 for real completion tokens).
    epsilon: clip range, > 0.
    ref_logprobs: [B, S, T] log pi_ref, only for placement 'loss'.
    beta: KL weight, >= 0, only for placement 'loss' (must be 0 for
      'reward').
    kl_estimator: 'k1', 'k2' or 'k3' for placement 'loss'.
    kl_placement: 'reward' or 'loss'.

  Returns:
    [B] float32 loss per prompt.
  """
  if logprobs.ndim != 3:
    raise ValueError(
        f'logprobs must have shape [B, S, T], got shape {logprobs.shape}.'
    )
  if old_logprobs.shape != logprobs.shape:
    raise ValueError(
        f'old_logprobs shape {old_logprobs.shape} differs from logprobs '
        f'shape {logprobs.shape}; both must score the same samples.'
    )
  if advantages.shape != logprobs.shape[:2]:
    raise ValueError(
        f'advantages must have shape [B, S] = {logprobs.shape[:2]}, got '
        f'{advantages.shape}.'
    )
  if not epsilon > 0:
    raise ValueError(f'epsilon must be > 0, got {epsilon}.')
  _check_placement(kl_placement)
  estimator_fn = _check_estimator(kl_estimator)
  _check_beta(beta)
  mask = _check_mask(logprobs, mask)

  logprobs = logprobs.astype(jnp.float32)
  old_logprobs = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
  advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
  # Padded positions may hold arbitrary values; zero their log ratio so that
  # exp() cannot overflow there.
  log_rho = jnp.where(mask > 0, logprobs - old_logprobs, 0.0)
  rho = jnp.exp(log_rho)
  token_advantages = advantages[:, :, None]
  unclipped = rho * token_advantages
  clipped = jnp.clip(rho, 1.0 - epsilon, 1.0 + epsilon) * token_advantages
  surrogate = masked_mean(jnp.minimum(unclipped, clipped), mask, axis=-1)
  loss = -jnp.mean(surrogate, axis=1)

  if kl_placement == 'reward':
    if ref_logprobs is not None:
      raise ValueError(
          "ref_logprobs was passed with kl_placement='reward', where the KL "
          'term belongs in the rewards behind `advantages`. Fold it in with '
          "kl_regularized_rewards, or use kl_placement='loss'."
      )
    if _concrete_beta(beta) != 0:
      raise ValueError(
          f"beta={beta!r} with kl_placement='reward' would have no effect: "
          'ppo_clip_loss cannot apply a KL penalty in the reward. The caller '
          'applies it to the advantages: fold -beta * k(l) into the rewards '
          'with kl_regularized_rewards, then call leave_one_out_advantages, '
          "and pass beta=0 here; or use kl_placement='loss'."
      )
    return loss
  if ref_logprobs is None:
    raise ValueError("kl_placement='loss' needs ref_logprobs [B, S, T].")
  if ref_logprobs.shape != logprobs.shape:
    raise ValueError(
        f'ref_logprobs shape {ref_logprobs.shape} differs from logprobs '
        f'shape {logprobs.shape}.'
    )
  log_ratio = masked_sum(
      logprobs - jax.lax.stop_gradient(ref_logprobs.astype(jnp.float32)),
      mask,
      axis=-1,
  )
  return loss + beta * jnp.mean(estimator_fn(log_ratio), axis=1)
