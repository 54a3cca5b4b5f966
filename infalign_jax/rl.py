"""The CTRL train step: calibrate, transform, reinforce.

One step of `make_rl_train_step`:

1. samples S responses per prompt from the current policy (`sample_fn`);
2. scores them with the reward model (`reward_fn`): the raw reward;
3. calibrates each raw reward against the prompt's row of sorted reference
   rewards, `batch['sorted_ref_rewards']` [B, M] (skipped for the raw-reward
   baseline, `RLConfig(calibrate=False)`);
4. applies the transform chosen for the inference-time procedure;
5. applies one REINFORCE update with a leave-one-out baseline, or several
   PPO updates (inner epochs) on the same samples, with the KL penalty
   `beta * KL(pi || pi_ref)` in the reward (default) or in the loss.

The step is generic over the policy. A categorical policy over K fixed
responses (T = 1) and the transformer language model plug in through four
functions, described in `make_rl_train_step`.

Notation: B prompts, S policy samples per prompt, M reference samples per
prompt, T completion tokens.
"""

from collections.abc import Callable, Mapping
import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infalign_jax import calibration
from infalign_jax import losses
from infalign_jax import train
from infalign_jax import transforms

__all__ = (
    'ALGORITHMS',
    'RLConfig',
    'ctrl_rewards',
    'make_rl_train_step',
)

ALGORITHMS = ('reinforce', 'ppo')

SampleFn = Callable[[Any, Any, jax.Array], Mapping[str, jax.Array]]
LogprobFn = Callable[[Any, Any, Mapping[str, jax.Array]], jax.Array]
RewardFn = Callable[[Any, Any, Mapping[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
  """Settings of the KL-regularized RL step.

  The objective per prompt is E_pi[Phi(C(y))] - beta * KL(pi || pi_ref), with
  C the calibrated reward (or the raw reward when `calibrate` is False) and
  Phi the transform.

  KL estimator and placement (see `infalign_jax.losses` for the derivations;
  each estimator applies to the sequence log ratio sum_t log(pi / pi_ref)):

  - ('reward', 'k1'), the default: the expected gradient is exactly
    beta * grad KL(pi || pi_ref).
  - ('loss', 'k2'): also exact, for on-policy samples (REINFORCE, and the
    first PPO epoch).
  - ('reward', 'k2'), ('reward', 'k3'): the penalty values are KL estimates,
    but the expected gradient is not grad KL.
  - ('loss', 'k3'): the gradient of the reverse KL(pi_ref || pi).
  - ('loss', 'k1') is rejected: its expected gradient is zero.

  Attributes:
    beta: KL weight, a finite real number > 0 (a NumPy scalar is stored as
      a float; a bool is rejected).
    transform: transform name for `transforms.make_transform` ('identity',
      'log', 'exp', 'neg_exp', ...).
    transform_params: keyword parameters of the transform, such as
      {'t': 10.0} for 'exp'. 'exp' with t > 88 needs 'normalize': True,
      because exp(t u) overflows float32 for t u > 88.7.
    calibrate: True for CTRL (calibrate against the batch's
      `sorted_ref_rewards`); False for the raw-reward baseline. With False
      the transform receives raw rewards of any scale: 'log' is rejected, and
      'exp' or 'neg_exp' overflow when |t r| > 88 for a raw reward r.
    algorithm: 'reinforce' (one update per step) or 'ppo' (`ppo_epochs`
      clipped updates on the same samples).
    kl_estimator: 'k1', 'k2' or 'k3'.
    kl_placement: 'reward' or 'loss'.
    num_samples: S, policy samples per prompt, >= 2 (the leave-one-out
      baseline needs another sample).
    ppo_epochs: inner epochs per step for 'ppo', >= 1.
    clip_epsilon: PPO clip range, > 0.
  """

  beta: float
  transform: str = 'identity'
  transform_params: Mapping[str, float] = dataclasses.field(
      default_factory=dict
  )
  calibrate: bool = True
  algorithm: str = 'reinforce'
  kl_estimator: str = 'k1'
  kl_placement: str = 'reward'
  num_samples: int = 4
  ppo_epochs: int = 4
  clip_epsilon: float = 0.2

  def __post_init__(self):
    beta = _real('beta', self.beta)
    if beta <= 0:
      raise ValueError(
          f'beta must be > 0, got {beta}. For no KL penalty use a small '
          'positive beta; the optimum of the objective is undefined at 0.'
      )
    object.__setattr__(self, 'beta', beta)
    if not isinstance(self.calibrate, (bool, np.bool_)):
      raise ValueError(
          f'calibrate must be a bool, got {self.calibrate!r}: True for CTRL, '
          'False for the raw-reward baseline.'
      )
    object.__setattr__(self, 'calibrate', bool(self.calibrate))
    object.__setattr__(self, 'transform_params', dict(self.transform_params))
    # Builds the transform once so an unknown name or bad parameter fails
    # here, with the transforms module's message.
    transforms.make_transform(self.transform, **self.transform_params)
    self._check_transform_range()
    if self.algorithm not in ALGORITHMS:
      raise ValueError(
          f'Unknown algorithm {self.algorithm!r}; use one of {ALGORITHMS}.'
      )
    if self.kl_estimator not in losses.KL_ESTIMATORS:
      raise ValueError(
          f'Unknown kl_estimator {self.kl_estimator!r}; use one of '
          f'{sorted(losses.KL_ESTIMATORS)}.'
      )
    if self.kl_placement not in losses.KL_PLACEMENTS:
      raise ValueError(
          f'Unknown kl_placement {self.kl_placement!r}; use one of '
          f'{losses.KL_PLACEMENTS}.'
      )
    if (self.kl_placement, self.kl_estimator) == ('loss', 'k1'):
      raise ValueError(
          "kl_estimator='k1' with kl_placement='loss' has zero expected "
          "gradient, so it would not regularize. Use kl_estimator='k2' in "
          "the loss, or kl_placement='reward'."
      )
    if not _is_int(self.num_samples) or self.num_samples < 2:
      raise ValueError(
          f'num_samples must be an integer >= 2 for the leave-one-out '
          f'baseline, got {self.num_samples!r}.'
      )
    object.__setattr__(self, 'num_samples', int(self.num_samples))
    if not _is_int(self.ppo_epochs) or self.ppo_epochs < 1:
      raise ValueError(
          f'ppo_epochs must be an integer >= 1, got {self.ppo_epochs!r}.'
      )
    object.__setattr__(self, 'ppo_epochs', int(self.ppo_epochs))
    clip_epsilon = _real('clip_epsilon', self.clip_epsilon)
    if not clip_epsilon > 0:
      raise ValueError(f'clip_epsilon must be > 0, got {clip_epsilon!r}.')
    object.__setattr__(self, 'clip_epsilon', clip_epsilon)

  def _check_transform_range(self):
    """Reject transforms whose values cannot be finite or meaningful."""
    params = self.transform_params
    if (
        self.transform == 'exp'
        and not params.get('normalize', False)
        and float(params['t']) > _EXP_MAX_T
    ):
      t = float(params['t'])
      raise ValueError(
          f"transform 'exp' with t={t:g} and normalize=False overflows "
          f'float32: exp(t u) is inf once t u > {_EXP_MAX_T:g}, that is '
          f'u > {_EXP_MAX_T / t:.2f} for calibrated rewards in [0, 1]. Pass '
          f"transform_params={{'t': {t:g}, 'normalize': True}}, which gives "
          f'the same policy at KL weight beta / (exp(t) - 1), or use '
          f't <= {_EXP_MAX_T:g}.'
      )
    if self.transform == 'log' and not self.calibrate:
      raise ValueError(
          "transform 'log' needs calibrated rewards in [0, 1], but "
          'calibrate=False: every raw reward below the floor would be '
          'clamped to log(floor), with zero gradient. Use calibrate=True, '
          "or transform='identity' for the raw-reward baseline."
      )


# float32 overflows in exp(x) for x > log(3.4e38) = 88.7.
_EXP_MAX_T = 88.0


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _real(name: str, value) -> float:
  """Return `value` as a finite float; reject bools and non-numbers."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise ValueError(f'{name} must be a real number, got {value!r}.')
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f'{name} must be finite, got {value!r}.')
  return value


def _tie_fraction(
    raw_rewards: jax.Array, sorted_ref_rewards: jax.Array | None
) -> jax.Array:
  """Fraction of samples whose raw reward ties another reward.

  Against the reference row when there is one (a tie there is what the
  one-half rule of calibration handles), otherwise against the other samples
  of the same prompt.
  """
  if sorted_ref_rewards is not None:
    left = jax.vmap(lambda row, r: jnp.searchsorted(row, r, side='left'))(
        sorted_ref_rewards, raw_rewards
    )
    right = jax.vmap(lambda row, r: jnp.searchsorted(row, r, side='right'))(
        sorted_ref_rewards, raw_rewards
    )
    tied = right > left
  else:
    equal = raw_rewards[:, :, None] == raw_rewards[:, None, :]
    tied = jnp.sum(equal, axis=-1) > 1
  return jnp.mean(tied.astype(jnp.float32))


def ctrl_rewards(
    raw_rewards: jax.Array,
    sorted_ref_rewards: jax.Array | None,
    *,
    calibrate: bool,
    transform: Callable[[jax.Array], jax.Array],
) -> dict[str, jax.Array]:
  """Run the CTRL reward path: raw -> calibrated -> transformed.

  Args:
    raw_rewards: [B, S] reward-model scores of the policy samples.
    sorted_ref_rewards: [B, M] sorted reference rewards of the same prompts,
      or None. Required when `calibrate` is True; when present with
      `calibrate` False it is still used for the calibrated-reward metric.
    calibrate: whether the transform is applied to the calibrated reward
      (CTRL) or to the raw reward (the baseline).
    transform: elementwise function Phi.

  Returns:
    A dict of [B, S] float32 arrays, all with gradients stopped: 'raw',
    'calibrated' (only when `sorted_ref_rewards` is given), 'transformed'.
  """
  if raw_rewards.ndim != 2:
    raise ValueError(
        f'raw rewards must have shape [B, S], got shape {raw_rewards.shape}.'
    )
  raw_rewards = jax.lax.stop_gradient(raw_rewards.astype(jnp.float32))
  if calibrate and sorted_ref_rewards is None:
    raise ValueError(
        'calibrate=True needs the batch to carry sorted_ref_rewards [B, M], '
        'the calibration table rows of its prompts. Add them with '
        'CalibrationTable.rows, or set calibrate=False for the raw-reward '
        'baseline.'
    )
  result = {'raw': raw_rewards}
  if sorted_ref_rewards is not None:
    result['calibrated'] = calibration.calibrated_rewards(
        raw_rewards, jax.lax.stop_gradient(sorted_ref_rewards)
    ).astype(jnp.float32)
  reward = result['calibrated'] if calibrate else raw_rewards
  result['transformed'] = jax.lax.stop_gradient(
      jnp.asarray(transform(reward), jnp.float32)
  )
  return result


def _check_logprobs(name: str, logprobs: jax.Array, mask: jax.Array, s: int):
  if logprobs.ndim != 3 or logprobs.shape != mask.shape:
    raise ValueError(
        f'{name} must return [B, S, T] log-probabilities with the shape of '
        f"samples['mask'] {mask.shape}, got shape {logprobs.shape}."
    )
  if logprobs.shape[1] != s:
    raise ValueError(
        f'{name} returned {logprobs.shape[1]} samples per prompt but '
        f'RLConfig.num_samples is {s}; build sample_fn with the same S.'
    )


def make_rl_train_step(
    config: RLConfig,
    optimizer: optax.GradientTransformation,
    *,
    sample_fn: SampleFn,
    logprob_fn: LogprobFn,
    ref_logprob_fn: LogprobFn,
    reward_fn: RewardFn,
    axis_name: str | None = None,
) -> train.TrainStepFn:
  """Make the pure CTRL step `train_step(state, batch, frozen)`.

  Args:
    config: the RL settings.
    optimizer: optax gradient transformation for the policy parameters.
    sample_fn: `sample_fn(params, batch, keys) -> samples`, with `keys` [B]
      one PRNG key per prompt. `samples` is a dict of arrays with leading
      axes [B, S] and must contain 'mask' [B, S, T] (1 for completion tokens);
      everything else (tokens, response indices) is opaque to the step. It
      must draw prompt b's samples from `keys[b]` only, so that the result
      does not depend on how the batch is split over devices.
    logprob_fn: `logprob_fn(params, batch, samples) -> [B, S, T]` per-token
      log pi of the sampled tokens; the gradient flows through it.
    ref_logprob_fn: `ref_logprob_fn(frozen, batch, samples) -> [B, S, T]`
      per-token log pi_ref; never differentiated.
    reward_fn: `reward_fn(frozen, batch, samples) -> [B, S]` raw rewards;
      never differentiated.
    axis_name: the pmap axis name when the step runs under
      `train.pmap_train_step`; None under jax.jit.

  The batch is a dict with 'example_ids' [B] (int, unique within the batch:
  the PRNG key of prompt b is fold_in(fold_in(state.key, state.step),
  example_ids[b])), 'sorted_ref_rewards' [B, M] when calibrating, and
  whatever the four functions read. `frozen` holds the reference policy and
  reward model parameters.

  Returns:
    The step. Its metrics (means over the batch, computed on the samples of
    the policy before the update): 'loss' and 'grad_norm' of the first
    update, 'nonfinite_count' (non-finite entries in the losses and
    gradients of all updates and in the raw rewards), 'kl' (the value of the
    configured estimator on the sequence log ratio, the quantity beta
    multiplies in the objective), 'kl_k1' (the mean sequence log ratio, an
    unbiased estimate of KL(pi || pi_ref)), 'raw_reward_mean',
    'calibrated_reward_mean' (when the batch carries the table rows),
    'transformed_reward_mean', 'tie_fraction' (the fraction of samples
    whose raw reward equals a reference reward of its prompt, or, without a
    table, another sample's reward) and
    'objective' (transformed_reward_mean - beta * kl).
  """
  transform = transforms.make_transform(
      config.transform, **config.transform_params
  )
  estimator = losses.KL_ESTIMATORS[config.kl_estimator]
  num_samples = config.num_samples

  def update(params, opt_state, loss_fn):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params, opt_state, metrics = train.apply_gradients(
        params, opt_state, grads, loss, {}, optimizer, axis_name=axis_name
    )
    return params, opt_state, metrics, aux

  def train_step(state, batch, frozen):
    if 'example_ids' not in batch:
      raise ValueError(
          "The RL batch needs 'example_ids' [B], unique integer ids of its "
          'prompts, from which each prompt draws its own PRNG key.'
      )
    step_key = jax.random.fold_in(state.key, state.step)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        step_key, batch['example_ids']
    )
    samples = jax.lax.stop_gradient(sample_fn(state.params, batch, keys))
    mask = samples['mask'].astype(jnp.float32)
    ref_logprobs = jax.lax.stop_gradient(ref_logprob_fn(frozen, batch, samples))
    _check_logprobs('ref_logprob_fn', ref_logprobs, mask, num_samples)
    ref_seq = losses.sequence_logprobs(ref_logprobs, mask)
    sorted_ref = batch.get('sorted_ref_rewards')
    rewards = ctrl_rewards(
        reward_fn(frozen, batch, samples),
        sorted_ref,
        calibrate=config.calibrate,
        transform=transform,
    )

    def sequence_logprobs(params):
      logprobs = logprob_fn(params, batch, samples)
      _check_logprobs('logprob_fn', logprobs, mask, num_samples)
      return logprobs, losses.sequence_logprobs(logprobs, mask)

    if config.algorithm == 'reinforce':

      def loss_fn(params):
        _, seq = sequence_logprobs(params)
        per_prompt = losses.reinforce_loo_loss(
            seq,
            rewards['transformed'],
            ref_seq_logprobs=ref_seq,
            beta=config.beta,
            kl_estimator=config.kl_estimator,
            kl_placement=config.kl_placement,
        )
        return jnp.mean(per_prompt), seq

      params, opt_state, metrics, seq = update(
          state.params, state.opt_state, loss_fn
      )
      seq_log_ratio = jax.lax.stop_gradient(seq) - ref_seq
    else:
      old_logprobs, old_seq = jax.lax.stop_gradient(
          sequence_logprobs(state.params)
      )
      seq_log_ratio = old_seq - ref_seq
      shaped = rewards['transformed']
      if config.kl_placement == 'reward':
        shaped = losses.kl_regularized_rewards(
            shaped,
            seq_log_ratio,
            beta=config.beta,
            estimator=config.kl_estimator,
        )
        kl_args = {}
      else:
        kl_args = dict(
            ref_logprobs=ref_logprobs,
            beta=config.beta,
            kl_estimator=config.kl_estimator,
        )
      advantages = losses.leave_one_out_advantages(shaped)

      def loss_fn(params):
        logprobs, _ = sequence_logprobs(params)
        per_prompt = losses.ppo_clip_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            epsilon=config.clip_epsilon,
            kl_placement=config.kl_placement,
            **kl_args,
        )
        return jnp.mean(per_prompt), None

      def epoch(carry, _):
        params, opt_state = carry
        params, opt_state, metrics, _ = update(params, opt_state, loss_fn)
        return (params, opt_state), metrics

      (params, opt_state), epoch_metrics = jax.lax.scan(
          epoch, (state.params, state.opt_state), length=config.ppo_epochs
      )
      metrics = {
          'loss': epoch_metrics['loss'][0],
          'grad_norm': epoch_metrics['grad_norm'][0],
          'nonfinite_count': jnp.sum(epoch_metrics['nonfinite_count']),
      }

    # Under jit the calibration skips its finiteness check and ranks a NaN
    # reward above every reference reward, so count non-finite raw rewards
    # here: the training loop stops on any non-finite count.
    raw_nonfinite = jnp.sum(
        jnp.logical_not(jnp.isfinite(rewards['raw'])), dtype=jnp.int32
    )
    if axis_name is not None:
      raw_nonfinite = jax.lax.psum(raw_nonfinite, axis_name=axis_name)
    metrics['nonfinite_count'] = metrics['nonfinite_count'] + raw_nonfinite

    kl_values = estimator(seq_log_ratio)
    sample_metrics = {
        'kl': jnp.mean(kl_values),
        'kl_k1': jnp.mean(seq_log_ratio),
        'raw_reward_mean': jnp.mean(rewards['raw']),
        'transformed_reward_mean': jnp.mean(rewards['transformed']),
        'tie_fraction': _tie_fraction(rewards['raw'], sorted_ref),
    }
    if 'calibrated' in rewards:
      sample_metrics['calibrated_reward_mean'] = jnp.mean(rewards['calibrated'])
    if axis_name is not None:
      sample_metrics = jax.lax.pmean(sample_metrics, axis_name=axis_name)
    sample_metrics['objective'] = (
        sample_metrics['transformed_reward_mean']
        - config.beta * sample_metrics['kl']
    )
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state
    )
    return new_state, {**sample_metrics, **metrics}

  return train_step
