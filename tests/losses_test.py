"""Tests for infalign_jax.losses."""

import itertools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from infalign_jax import losses


def _np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------
# Token log-probabilities and masked reductions.


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_token_logprobs_matches_numpy(dtype):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, size=(2, 3, 5))
  got = losses.token_logprobs(jnp.asarray(logits, dtype), jnp.asarray(targets))
  rounded = np.asarray(jnp.asarray(logits, dtype).astype(jnp.float32))
  want = np.take_along_axis(
      _np_log_softmax(rounded.astype(np.float64)), targets[..., None], -1
  )[..., 0]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_logprobs_jit_equals_eager():
  logits = jax.random.normal(jax.random.key(0), (4, 6, 9))
  targets = jax.random.randint(jax.random.key(1), (4, 6), 0, 9)
  eager = losses.token_logprobs(logits, targets)
  jitted = jax.jit(losses.token_logprobs)(logits, targets)
  np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-6)


def test_token_logprobs_gradients():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 4))
  targets = jnp.array([[0, 1, 3], [2, 2, 0]])
  check_grads(
      lambda x: losses.token_logprobs(x, targets),
      (logits,),
      order=1,
      modes=['rev'],
      atol=1e-2,
      rtol=1e-2,
  )


def test_token_logprobs_rejects_bad_shapes():
  with pytest.raises(ValueError, match='one more axis'):
    losses.token_logprobs(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match='leading axes'):
    losses.token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match='integer'):
    losses.token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)))


@pytest.mark.parametrize('bad_id', [5, -1])
def test_token_logprobs_rejects_target_outside_vocabulary(bad_id):
  targets = jnp.array([[1, bad_id]])
  with pytest.raises(
      ValueError, match=rf'token id {bad_id} at index \(0, 1\).*\[0, V=5\)'
  ):
    losses.token_logprobs(jnp.zeros((1, 2, 5)), targets)


def test_masked_mean_and_sum_by_hand():
  values = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
  mask = jnp.array([[1, 1, 0], [0, 0, 0], [1, 0, 1]])
  np.testing.assert_allclose(losses.masked_sum(values, mask), [3.0, 0.0, 16.0])
  np.testing.assert_allclose(losses.masked_mean(values, mask), [1.5, 0.0, 8.0])


def test_masked_sum_ignores_nan_at_padding():
  values = jnp.array([1.0, jnp.nan, jnp.inf])
  mask = jnp.array([True, False, False])
  assert float(losses.masked_sum(values, mask)) == 1.0
  grad = jax.grad(lambda v: losses.masked_sum(v, mask))(values)
  np.testing.assert_array_equal(grad, [1.0, 0.0, 0.0])


def test_masked_mean_rejects_mask_shape():
  with pytest.raises(ValueError, match='mask shape'):
    losses.masked_mean(jnp.zeros((2, 3)), jnp.ones((2, 4)))


# ---------------------------------------------------------------------------
# KL estimators.


def test_kl_estimators_by_hand():
  log_ratio = jnp.array([0.0, 1.0, -2.0])
  np.testing.assert_allclose(losses.kl_k1(log_ratio), [0.0, 1.0, -2.0])
  np.testing.assert_allclose(losses.kl_k2(log_ratio), [0.0, 0.5, 2.0])
  np.testing.assert_allclose(
      losses.kl_k3(log_ratio),
      [0.0, np.exp(-1.0) - 1 + 1, np.exp(2.0) - 1 - 2],
      rtol=1e-6,
  )


def test_kl_estimate_stops_reference_gradient():
  logp = jnp.array([-1.0, -2.0])
  ref = jnp.array([-1.5, -1.0])
  grad_ref = jax.grad(
      lambda r: jnp.sum(losses.kl_estimate(logp, r, estimator='k2'))
  )(ref)
  np.testing.assert_array_equal(grad_ref, [0.0, 0.0])


@pytest.mark.parametrize('estimator', ['k1', 'k3'])
def test_kl_estimators_unbiased_on_categorical(estimator):
  # E_{y ~ pi}[k(log pi(y) - log pi_ref(y))] = KL(pi || pi_ref) for k1, k3.
  pi = jax.nn.softmax(jnp.array([0.3, -1.0, 2.0, 0.5]))
  ref = jax.nn.softmax(jnp.array([1.0, 0.2, -0.4, 0.0]))
  exact = float(jnp.sum(pi * (jnp.log(pi) - jnp.log(ref))))
  values = losses.kl_estimate(jnp.log(pi), jnp.log(ref), estimator=estimator)
  np.testing.assert_allclose(float(jnp.sum(pi * values)), exact, rtol=1e-5)


@hypothesis.settings(deadline=None, max_examples=50)
@hypothesis.given(st.floats(-30.0, 30.0, allow_nan=False))
def test_k2_k3_are_non_negative(log_ratio):
  x = jnp.float32(log_ratio)
  assert float(losses.kl_k2(x)) >= 0.0
  assert float(losses.kl_k3(x)) >= 0.0


def test_kl_estimate_rejects_unknown_name():
  with pytest.raises(ValueError, match="Unknown KL estimator 'k4'"):
    losses.kl_estimate(jnp.zeros(2), jnp.zeros(2), estimator='k4')


# ---------------------------------------------------------------------------
# REINFORCE with a leave-one-out baseline.


def _np_reinforce_loo(seq_logprobs, rewards, ref, beta, estimator, placement):
  """NumPy reference: value and gradient with respect to seq_logprobs."""
  num_prompts, num_samples = rewards.shape
  log_ratio = seq_logprobs - ref
  estimates = {
      'k1': (log_ratio, np.ones_like(log_ratio)),
      'k2': (0.5 * log_ratio**2, log_ratio),
      'k3': (np.exp(-log_ratio) - 1 + log_ratio, 1 - np.exp(-log_ratio)),
  }
  kl_value, kl_derivative = estimates[estimator]
  if placement == 'reward':
    rewards = rewards - beta * kl_value
  advantages = np.empty_like(rewards)
  for b in range(num_prompts):
    for s in range(num_samples):
      others = np.delete(rewards[b], s)
      advantages[b, s] = rewards[b, s] - others.mean()
  loss = -(advantages * seq_logprobs).mean(axis=1)
  grad = -advantages / num_samples
  if placement == 'loss':
    loss = loss + beta * kl_value.mean(axis=1)
    grad = grad + beta * kl_derivative / num_samples
  return loss, grad


@pytest.mark.parametrize(
    'estimator,placement',
    [('k1', 'reward'), ('k3', 'reward'), ('k2', 'loss'), ('k3', 'loss')],
)
def test_reinforce_loo_matches_numpy(estimator, placement):
  rng = np.random.default_rng(1)
  seq_logprobs = rng.normal(size=(3, 5)) - 2
  rewards = rng.normal(size=(3, 5))
  ref = rng.normal(size=(3, 5)) - 2
  beta = 0.3
  want_loss, want_grad = _np_reinforce_loo(
      seq_logprobs, rewards, ref, beta, estimator, placement
  )

  def loss_fn(logp):
    return losses.reinforce_loo_loss(
        logp,
        jnp.asarray(rewards, jnp.float32),
        ref_seq_logprobs=jnp.asarray(ref, jnp.float32),
        beta=beta,
        kl_estimator=estimator,
        kl_placement=placement,
    )

  logp = jnp.asarray(seq_logprobs, jnp.float32)
  np.testing.assert_allclose(loss_fn(logp), want_loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      jax.jit(loss_fn)(logp), want_loss, rtol=1e-5, atol=1e-5
  )
  grad = jax.grad(lambda x: jnp.sum(loss_fn(x)))(logp)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)


def test_leave_one_out_advantages_by_hand():
  rewards = jnp.array([[1.0, 2.0, 6.0]])
  # Sample 0: 1 - (2 + 6) / 2 = -3; sample 1: 2 - 3.5; sample 2: 6 - 1.5.
  np.testing.assert_allclose(
      losses.leave_one_out_advantages(rewards), [[-3.0, -1.5, 4.5]]
  )


@hypothesis.settings(deadline=None, max_examples=30)
@hypothesis.given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=8)
)
def test_leave_one_out_advantages_sum_to_zero(values):
  rewards = jnp.asarray([values], jnp.float32)
  advantages = losses.leave_one_out_advantages(rewards)
  scale = max(1.0, float(jnp.max(jnp.abs(rewards))))
  assert abs(float(jnp.sum(advantages))) <= 1e-4 * scale * len(values)
  # Adding a constant to every reward leaves the advantages unchanged.
  shifted = losses.leave_one_out_advantages(rewards + 5.0)
  np.testing.assert_allclose(shifted, advantages, atol=1e-3 * scale)


def test_reinforce_loo_gradient_checks():
  logp = jax.random.normal(jax.random.key(0), (2, 4)) - 1.0
  rewards = jax.random.normal(jax.random.key(1), (2, 4))
  ref = jax.random.normal(jax.random.key(2), (2, 4)) - 1.0
  check_grads(
      lambda x: losses.reinforce_loo_loss(
          x,
          rewards,
          ref_seq_logprobs=ref,
          beta=0.5,
          kl_placement='loss',
          kl_estimator='k3',
      ),
      (logp,),
      order=1,
      modes=['rev'],
      atol=1e-2,
      rtol=1e-2,
  )


def test_reinforce_loo_rejects_bad_inputs():
  good = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match='S >= 2'):
    losses.reinforce_loo_loss(jnp.zeros((2, 1)), jnp.zeros((2, 1)))
  with pytest.raises(ValueError, match=r'\[B, S\]'):
    losses.reinforce_loo_loss(jnp.zeros(3), jnp.zeros(3))
  with pytest.raises(ValueError, match='differs from rewards shape'):
    losses.reinforce_loo_loss(good, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match='beta must be >= 0'):
    losses.reinforce_loo_loss(good, good, ref_seq_logprobs=good, beta=-1.0)
  with pytest.raises(ValueError, match='beta must be >= 0, got -1.0'):
    losses.reinforce_loo_loss(
        good, good, ref_seq_logprobs=good, beta=np.float32(-1.0)
    )
  with pytest.raises(ValueError, match='beta must be a real number'):
    losses.reinforce_loo_loss(good, good, ref_seq_logprobs=good, beta=True)
  with pytest.raises(
      ValueError, match=r'shape \(2, 4\) differs from seq_logprobs shape'
  ):
    losses.reinforce_loo_loss(
        good, good, ref_seq_logprobs=jnp.zeros((2, 4)), beta=0.1
    )
  with pytest.raises(ValueError, match='ref_seq_logprobs is required'):
    losses.reinforce_loo_loss(good, good, beta=0.1)
  with pytest.raises(ValueError, match="Unknown KL placement 'both'"):
    losses.reinforce_loo_loss(
        good, good, ref_seq_logprobs=good, kl_placement='both'
    )


# ---------------------------------------------------------------------------
# The gradient of each KL placement against the exact gradient of the KL, on
# a categorical policy over K responses. The expected gradient over S i.i.d.
# samples is computed exactly by enumerating all K^S sample tuples.

_REF_LOGITS = jnp.array([0.4, -0.3, 1.1, -1.0])
_REWARDS = jnp.array([0.7, -0.2, 0.1, 1.3])
_BETA = 0.4
_NUM_SAMPLES = 3


def _expected_gradient(theta, loss_of_samples):
  """E over S samples y ~ softmax(theta) of grad_theta loss(theta, y)."""
  num_responses = theta.shape[0]
  tuples = jnp.array(
      list(itertools.product(range(num_responses), repeat=_NUM_SAMPLES))
  )

  def weighted_grad(samples):
    weight = jnp.prod(jax.nn.softmax(theta)[samples])
    return weight * jax.grad(loss_of_samples)(theta, samples)

  return jnp.sum(jax.vmap(weighted_grad)(tuples), axis=0)


def _reinforce_on_samples(estimator, placement):
  def loss(theta, samples):
    logp = jax.nn.log_softmax(theta)[samples][None]
    ref = jax.nn.log_softmax(_REF_LOGITS)[samples][None]
    return losses.reinforce_loo_loss(
        logp,
        _REWARDS[samples][None],
        ref_seq_logprobs=ref,
        beta=_BETA,
        kl_estimator=estimator,
        kl_placement=placement,
    )[0]

  return loss


def _ppo_first_epoch_on_samples(estimator, placement):
  """PPO at pi = pi_old (the first inner epoch), T = 1."""

  def loss(theta, samples):
    logp = jax.nn.log_softmax(theta)[samples][None, :, None]
    ref = jax.nn.log_softmax(_REF_LOGITS)[samples][None, :, None]
    old = jax.lax.stop_gradient(logp)
    rewards = _REWARDS[samples][None]
    if placement == 'reward':
      rewards = losses.kl_regularized_rewards(
          rewards, (old - ref)[..., 0], beta=_BETA, estimator=estimator
      )
      kl_args = {}
    else:
      kl_args = dict(ref_logprobs=ref, beta=_BETA, kl_estimator=estimator)
    return losses.ppo_clip_loss(
        logp,
        old,
        losses.leave_one_out_advantages(rewards),
        jnp.ones_like(logp),
        kl_placement=placement,
        **kl_args,
    )[0]

  return loss


def _objective_gradients(theta):
  """Gradients of E[R], KL(pi || pi_ref) and KL(pi_ref || pi)."""
  log_ref = jax.nn.log_softmax(_REF_LOGITS)

  def expected_reward(t):
    return jnp.sum(jax.nn.softmax(t) * _REWARDS)

  def forward_kl(t):
    logp = jax.nn.log_softmax(t)
    return jnp.sum(jnp.exp(logp) * (logp - log_ref))

  def reverse_kl(t):
    logp = jax.nn.log_softmax(t)
    return jnp.sum(jnp.exp(log_ref) * (log_ref - logp))

  return (
      jax.grad(expected_reward)(theta),
      jax.grad(forward_kl)(theta),
      jax.grad(reverse_kl)(theta),
  )


@pytest.mark.parametrize(
    'make_loss', [_reinforce_on_samples, _ppo_first_epoch_on_samples]
)
@pytest.mark.parametrize(
    'estimator,placement', [('k1', 'reward'), ('k2', 'loss')]
)
def test_kl_placement_gradient_is_exact(make_loss, estimator, placement):
  theta = jnp.array([-0.2, 0.9, 0.3, -0.5])
  got = _expected_gradient(theta, make_loss(estimator, placement))
  reward_grad, kl_grad, _ = _objective_gradients(theta)
  np.testing.assert_allclose(
      got, -(reward_grad - _BETA * kl_grad), rtol=1e-4, atol=1e-6
  )


def test_k3_in_loss_gives_reverse_kl_gradient():
  theta = jnp.array([-0.2, 0.9, 0.3, -0.5])
  got = _expected_gradient(theta, _reinforce_on_samples('k3', 'loss'))
  reward_grad, kl_grad, reverse_grad = _objective_gradients(theta)
  np.testing.assert_allclose(
      got, -(reward_grad - _BETA * reverse_grad), rtol=1e-4, atol=1e-6
  )
  assert not np.allclose(got, -(reward_grad - _BETA * kl_grad), atol=1e-3)


def test_k1_in_loss_has_no_expected_kl_gradient():
  theta = jnp.array([-0.2, 0.9, 0.3, -0.5])
  got = _expected_gradient(theta, _reinforce_on_samples('k1', 'loss'))
  reward_grad, _, _ = _objective_gradients(theta)
  np.testing.assert_allclose(got, -reward_grad, rtol=1e-4, atol=1e-6)


def test_k3_in_reward_gradient_is_biased():
  theta = jnp.array([-0.2, 0.9, 0.3, -0.5])
  got = _expected_gradient(theta, _reinforce_on_samples('k3', 'reward'))
  reward_grad, kl_grad, _ = _objective_gradients(theta)
  assert not np.allclose(got, -(reward_grad - _BETA * kl_grad), atol=1e-3)


# ---------------------------------------------------------------------------
# PPO clipped surrogate.


def _ppo_single(log_rho, advantage, epsilon=0.2):
  """Loss and d loss / d log pi for one token with log pi_old = 0."""

  def loss(logp):
    return losses.ppo_clip_loss(
        jnp.reshape(logp, (1, 1, 1)),
        jnp.zeros((1, 1, 1)),
        jnp.full((1, 1), advantage),
        jnp.ones((1, 1, 1)),
        epsilon=epsilon,
    )[0]

  value, grad = jax.value_and_grad(loss)(jnp.float32(log_rho))
  return float(value), float(grad)


@pytest.mark.parametrize(
    'rho,advantage,want_loss,want_grad',
    [
        # Ratio above 1 + eps with a positive advantage: clipped, no gradient.
        (1.5, 1.0, -1.2, 0.0),
        # Above 1 + eps with a negative advantage: the unclipped term is
        # smaller, so it stays and pushes the ratio down (gradient -A * rho).
        (1.5, -1.0, 1.5, 1.5),
        # Below 1 - eps with a positive advantage: unclipped, pushes it up.
        (0.5, 1.0, -0.5, -0.5),
        # Below 1 - eps with a negative advantage: clipped, no gradient.
        (0.5, -1.0, 0.8, 0.0),
        # Inside the clip range: the plain importance-weighted term.
        (1.1, 2.0, -2.2, -2.2),
    ],
)
def test_ppo_clip_by_hand(rho, advantage, want_loss, want_grad):
  loss, grad = _ppo_single(np.log(rho), advantage)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_ppo_averages_over_completion_tokens_only():
  logprobs = jnp.log(jnp.array([[[1.1, 1.0, 5.0]]]))
  advantages = jnp.array([[1.0]])
  mask = jnp.array([[[1, 1, 0]]])
  loss = losses.ppo_clip_loss(
      logprobs, jnp.zeros_like(logprobs), advantages, mask
  )
  np.testing.assert_allclose(loss, [-(1.1 + 1.0) / 2], rtol=1e-6)


def test_ppo_gradient_checks():
  key = jax.random.key(3)
  logprobs = -jax.random.uniform(key, (2, 3, 4)) - 0.5
  # Old log-probs 0.05 away from the current ones: inside the clip range, far
  # from the kinks, so finite differences are valid.
  old = logprobs + 0.05
  advantages = jax.random.normal(jax.random.key(4), (2, 3))
  mask = jnp.ones((2, 3, 4)).at[:, :, -1].set(0)
  ref = logprobs - 0.3
  check_grads(
      lambda x: losses.ppo_clip_loss(
          x,
          old,
          advantages,
          mask,
          ref_logprobs=ref,
          beta=0.1,
          kl_placement='loss',
      ),
      (logprobs,),
      order=1,
      modes=['rev'],
      atol=1e-2,
      rtol=1e-2,
  )


def test_ppo_rejects_bad_inputs():
  x = jnp.zeros((2, 3, 4))
  adv = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r'\[B, S, T\]'):
    losses.ppo_clip_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), adv, adv)
  with pytest.raises(ValueError, match='advantages must have shape'):
    losses.ppo_clip_loss(x, x, jnp.zeros((2, 4)), x)
  with pytest.raises(ValueError, match='epsilon must be > 0'):
    losses.ppo_clip_loss(x, x, adv, x, epsilon=0.0)
  with pytest.raises(ValueError, match='kl_regularized_rewards'):
    losses.ppo_clip_loss(x, x, adv, x, ref_logprobs=x, beta=0.1)
  with pytest.raises(ValueError, match='beta=5.0 .* no effect.*caller'):
    losses.ppo_clip_loss(x, x, adv, x, beta=5.0)
  with pytest.raises(ValueError, match='needs ref_logprobs'):
    losses.ppo_clip_loss(x, x, adv, x, beta=0.1, kl_placement='loss')
  with pytest.raises(ValueError, match='old_logprobs shape'):
    losses.ppo_clip_loss(x, jnp.zeros((2, 3, 5)), adv, x)
