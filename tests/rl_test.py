"""Tests for infalign_jax.rl: the config, the CTRL reward path and the step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import bandit
from infalign_jax import losses
from infalign_jax import rl
from infalign_jax import train
from infalign_jax import transforms

# A small bandit: 2 prompts, 4 responses, reference masses c / 8.
_REWARDS = np.array([[0.3, -1.0, 2.0, 0.7], [1.5, 0.2, -0.4, 0.9]], np.float32)
_COUNTS = np.array([[1, 3, 2, 2], [2, 2, 1, 3]])
_THETA = np.array([[0.2, -0.1, 0.5, 0.0], [-0.3, 0.4, 0.1, 0.2]], np.float32)


def _problem():
  table = np.stack(
      [np.sort(np.repeat(r, c)) for r, c in zip(_REWARDS, _COUNTS, strict=True)]
  )
  return bandit.BanditProblem(
      rewards=_REWARDS, ref_counts=_COUNTS, sorted_ref_rewards=table
  )


def _enumerate_all_responses(params, batch, keys):
  """A sample_fn whose samples are every response once (S = K = 4)."""
  del params, keys
  num_prompts = batch['prompt_index'].shape[0]
  responses = jnp.broadcast_to(jnp.arange(4), (num_prompts, 4))
  return {'response': responses, 'mask': jnp.ones((num_prompts, 4, 1))}


def _step(config, optimizer, sample_fn=_enumerate_all_responses, **kwargs):
  functions = dict(
      sample_fn=sample_fn,
      logprob_fn=bandit.logprob_fn,
      ref_logprob_fn=bandit.ref_logprob_fn,
      reward_fn=bandit.reward_fn,
  )
  functions.update(kwargs)
  return rl.make_rl_train_step(config, optimizer, **functions)


def _run_one_step(config, optimizer, batch=None, **kwargs):
  problem = _problem()
  state = train.init_train_state(
      {'logits': jnp.asarray(_THETA)}, optimizer, jax.random.key(0)
  )
  if batch is None:
    batch = bandit.make_batch(problem)
  step = jax.jit(_step(config, optimizer, **kwargs))
  return step(state, batch, bandit.make_frozen(problem))


def _np_calibrated():
  return _problem().calibrated


def _np_log_softmax(x):
  x = x.astype(np.float64)
  return (
      x
      - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - x.max(-1, keepdims=True)
  )


# ---------------------------------------------------------------------------
# RLConfig.


@pytest.mark.parametrize(
    'kwargs,message',
    [
        (dict(beta=0.0), 'beta must be > 0'),
        (dict(beta=-1.0), 'beta must be > 0'),
        (dict(beta=float('nan')), 'beta must be finite'),
        (dict(beta=True), 'beta must be a real number, got True'),
        (dict(beta='0.1'), 'beta must be a real number'),
        (dict(beta=0.1, calibrate='no'), "calibrate must be a bool, got 'no'"),
        (
            dict(beta=0.1, transform='exp', transform_params={'t': 200.0}),
            r't=200 and normalize=False overflows float32.*u > 0\.44.*'
            r"'normalize': True",
        ),
        (
            dict(beta=0.1, transform='log', calibrate=False),
            "transform 'log' needs calibrated rewards.*calibrate=False",
        ),
        (dict(beta=0.1, clip_epsilon=float('inf')), 'clip_epsilon must be'),
        (dict(beta=0.1, transform='cube'), 'cube'),
        (dict(beta=0.1, algorithm='grpo'), "Unknown algorithm 'grpo'"),
        (dict(beta=0.1, kl_estimator='k4'), "Unknown kl_estimator 'k4'"),
        (dict(beta=0.1, kl_placement='both'), "Unknown kl_placement 'both'"),
        (
            dict(beta=0.1, kl_estimator='k1', kl_placement='loss'),
            'zero expected gradient',
        ),
        (dict(beta=0.1, num_samples=1), 'num_samples must be an integer >= 2'),
        (dict(beta=0.1, ppo_epochs=0), 'ppo_epochs must be an integer >= 1'),
        (dict(beta=0.1, clip_epsilon=0.0), 'clip_epsilon must be > 0'),
    ],
)
def test_rl_config_rejects_bad_values(kwargs, message):
  with pytest.raises(ValueError, match=message):
    rl.RLConfig(**kwargs)


def test_rl_config_accepts_numpy_scalars():
  config = rl.RLConfig(
      beta=np.float32(0.25),
      calibrate=np.bool_(False),
      num_samples=np.int64(3),
      clip_epsilon=np.float64(0.1),
  )
  assert (type(config.beta), config.beta) == (float, 0.25)
  assert config.calibrate is False
  assert (type(config.num_samples), config.num_samples) == (int, 3)
  assert config.clip_epsilon == 0.1


def test_rl_config_accepts_large_t_when_normalized():
  config = rl.RLConfig(
      beta=0.1,
      transform='exp',
      transform_params={'t': 200.0, 'normalize': True},
  )
  assert config.transform_params['normalize']
  assert rl.RLConfig(beta=0.1, transform='exp', transform_params={'t': 88.0})


def test_rl_config_copies_transform_params():
  params = {'t': 2.0}
  config = rl.RLConfig(beta=0.1, transform='exp', transform_params=params)
  params['t'] = 5.0
  assert config.transform_params == {'t': 2.0}


def test_rl_config_is_frozen():
  config = rl.RLConfig(beta=0.1)
  with pytest.raises(AttributeError):
    config.beta = 0.2


# ---------------------------------------------------------------------------
# The CTRL reward path.


def test_ctrl_rewards_by_hand():
  raw = jnp.array([[1.0, 2.0, 3.0]])
  table = jnp.array([[0.5, 2.0, 2.5, 4.0]])
  exp = transforms.make_transform('exp', t=2.0)
  out = rl.ctrl_rewards(raw, table, calibrate=True, transform=exp)
  # 1.0: one below -> 1/4; 2.0: one below, one tie -> 1.5/4; 3.0: 3/4.
  np.testing.assert_allclose(out['calibrated'], [[0.25, 0.375, 0.75]])
  np.testing.assert_allclose(
      out['transformed'],
      np.exp(2 * np.array([[0.25, 0.375, 0.75]])),
      rtol=1e-6,
  )
  np.testing.assert_array_equal(out['raw'], raw)


def test_ctrl_rewards_raw_baseline():
  raw = jnp.array([[1.0, 2.0, 3.0]])
  table = jnp.array([[0.5, 2.0, 2.5, 4.0]])
  identity = transforms.make_transform('identity')
  out = rl.ctrl_rewards(raw, table, calibrate=False, transform=identity)
  np.testing.assert_array_equal(out['transformed'], raw)
  np.testing.assert_allclose(out['calibrated'], [[0.25, 0.375, 0.75]])
  no_table = rl.ctrl_rewards(raw, None, calibrate=False, transform=identity)
  assert 'calibrated' not in no_table


def test_ctrl_rewards_requires_table_to_calibrate():
  identity = transforms.make_transform('identity')
  with pytest.raises(ValueError, match='sorted_ref_rewards'):
    rl.ctrl_rewards(jnp.zeros((1, 2)), None, calibrate=True, transform=identity)


def test_tie_fraction_by_hand():
  raw = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  table = jnp.array([[2.0, 2.0, 4.0]])
  # 2.0 and 4.0 appear in the table.
  assert float(rl._tie_fraction(raw, table)) == 0.5
  # Without a table: ties among the samples, here 5.0 twice.
  raw = jnp.array([[5.0, 1.0, 5.0, 2.0]])
  assert float(rl._tie_fraction(raw, None)) == 0.5


# ---------------------------------------------------------------------------
# The step against NumPy, with every response sampled once.


def _np_reinforce_update(theta, beta, phi):
  """One SGD(1.0) REINFORCE-LOO step with KL (k1) in the reward."""
  log_pi = _np_log_softmax(theta)
  log_ref = np.log(_COUNTS / _COUNTS.sum(1, keepdims=True))
  log_ratio = log_pi - log_ref
  shaped = phi - beta * log_ratio
  num_samples = shaped.shape[1]
  advantages = shaped - (shaped.sum(1, keepdims=True) - shaped) / (
      num_samples - 1
  )
  pi = np.exp(log_pi)
  num_prompts = theta.shape[0]
  grad = np.zeros_like(log_pi)
  for p in range(num_prompts):
    for s in range(num_samples):
      onehot = np.eye(num_samples)[s]
      grad[p] -= advantages[p, s] * (onehot - pi[p]) / num_samples
  grad /= num_prompts
  loss = -(advantages * log_pi).mean(1).mean()
  return theta - grad, loss, log_ratio


@pytest.mark.parametrize(
    'transform,params', [('identity', {}), ('neg_exp', {'t': 3.0})]
)
def test_reinforce_step_matches_numpy(transform, params):
  beta = 0.3
  config = rl.RLConfig(
      beta=beta, transform=transform, transform_params=params, num_samples=4
  )
  state, metrics = _run_one_step(config, optax.sgd(1.0))
  calibrated = _np_calibrated()
  phi = np.asarray(transforms.make_transform(transform, **params)(calibrated))
  want_theta, want_loss, log_ratio = _np_reinforce_update(_THETA, beta, phi)
  np.testing.assert_allclose(state.params['logits'], want_theta, atol=1e-5)
  np.testing.assert_allclose(metrics['loss'], want_loss, atol=1e-5)
  np.testing.assert_allclose(metrics['kl'], log_ratio.mean(), atol=1e-5)
  np.testing.assert_allclose(metrics['kl_k1'], log_ratio.mean(), atol=1e-5)
  np.testing.assert_allclose(
      metrics['raw_reward_mean'], _REWARDS.mean(), atol=1e-6
  )
  np.testing.assert_allclose(
      metrics['calibrated_reward_mean'], calibrated.mean(), atol=1e-6
  )
  np.testing.assert_allclose(
      metrics['transformed_reward_mean'], phi.mean(), atol=1e-6
  )
  np.testing.assert_allclose(
      metrics['objective'], phi.mean() - beta * log_ratio.mean(), atol=1e-5
  )
  # Every response of the bandit appears in its own calibration table.
  assert float(metrics['tie_fraction']) == 1.0
  assert int(metrics['nonfinite_count']) == 0
  assert int(state.step) == 1


def test_raw_baseline_step_uses_raw_rewards():
  beta = 0.3
  config = rl.RLConfig(beta=beta, calibrate=False, num_samples=4)
  batch = bandit.make_batch(_problem())
  del batch['sorted_ref_rewards']
  state, metrics = _run_one_step(config, optax.sgd(1.0), batch=batch)
  want_theta, _, _ = _np_reinforce_update(_THETA, beta, _REWARDS)
  np.testing.assert_allclose(state.params['logits'], want_theta, atol=1e-5)
  assert 'calibrated_reward_mean' not in metrics
  np.testing.assert_allclose(
      metrics['transformed_reward_mean'], _REWARDS.mean(), atol=1e-6
  )


@pytest.mark.parametrize(
    'estimator,placement', [('k1', 'reward'), ('k2', 'loss')]
)
def test_ppo_one_epoch_equals_reinforce(estimator, placement):
  common = dict(
      beta=0.3, kl_estimator=estimator, kl_placement=placement, num_samples=4
  )
  reinforce, _ = _run_one_step(rl.RLConfig(**common), optax.sgd(0.5))
  ppo, _ = _run_one_step(
      rl.RLConfig(algorithm='ppo', ppo_epochs=1, **common), optax.sgd(0.5)
  )
  np.testing.assert_allclose(
      ppo.params['logits'], reinforce.params['logits'], atol=1e-6
  )


def test_ppo_epochs_match_sequential_updates():
  beta, epochs, epsilon, lr = 0.3, 3, 0.1, 2.0
  config = rl.RLConfig(
      beta=beta,
      algorithm='ppo',
      ppo_epochs=epochs,
      clip_epsilon=epsilon,
      num_samples=4,
  )
  state, metrics = _run_one_step(config, optax.sgd(lr))

  # Reference: the same updates written out with the loss functions.
  log_ref = jnp.log(jnp.asarray(_COUNTS / _COUNTS.sum(1, keepdims=True)))
  old = jax.nn.log_softmax(jnp.asarray(_THETA))
  phi = jnp.asarray(_np_calibrated(), jnp.float32)
  shaped = losses.kl_regularized_rewards(phi, old - log_ref, beta=beta)
  advantages = losses.leave_one_out_advantages(shaped)

  def loss(theta):
    logp = jax.nn.log_softmax(theta)[..., None]
    return jnp.mean(
        losses.ppo_clip_loss(
            logp,
            old[..., None],
            advantages,
            jnp.ones_like(logp),
            epsilon=epsilon,
        )
    )

  theta = jnp.asarray(_THETA)
  first_loss = loss(theta)
  for _ in range(epochs):
    theta = theta - lr * jax.grad(loss)(theta)
  np.testing.assert_allclose(state.params['logits'], theta, atol=1e-5)
  np.testing.assert_allclose(metrics['loss'], first_loss, atol=1e-6)
  # The clip must have been active: a single unclipped step differs.
  unclipped = jnp.asarray(_THETA) - epochs * lr * jax.grad(loss)(
      jnp.asarray(_THETA)
  )
  assert not np.allclose(state.params['logits'], unclipped, atol=1e-3)


# ---------------------------------------------------------------------------
# Errors, non-finite values, jit.


def test_nonfinite_reward_is_counted():
  def nan_reward(frozen, batch, samples):
    rewards = bandit.reward_fn(frozen, batch, samples)
    return rewards.at[0, 1].set(jnp.nan)

  config = rl.RLConfig(beta=0.3, num_samples=4)
  _, metrics = _run_one_step(config, optax.sgd(1.0), reward_fn=nan_reward)
  assert int(metrics['nonfinite_count']) >= 1


def test_step_rejects_missing_example_ids():
  batch = bandit.make_batch(_problem())
  del batch['example_ids']
  with pytest.raises(ValueError, match='example_ids'):
    _run_one_step(rl.RLConfig(beta=0.3, num_samples=4), optax.sgd(1.0), batch)


def test_step_rejects_sample_count_mismatch():
  with pytest.raises(ValueError, match='num_samples is 8'):
    _run_one_step(rl.RLConfig(beta=0.3, num_samples=8), optax.sgd(1.0))


def test_step_jit_equals_eager_with_sampling():
  problem = _problem()
  config = rl.RLConfig(beta=0.3, transform='exp', transform_params={'t': 2.0})
  # SGD, not Adam: Adam's first step maps a gradient of rounding size (the
  # leave-one-out advantages sum to zero) to +-lr, which would turn float
  # reordering between eager and jit into large differences.
  optimizer = optax.sgd(0.5)
  step = _step(config, optimizer, sample_fn=bandit.make_sample_fn(4))
  state = train.init_train_state(
      {'logits': jnp.asarray(_THETA)}, optimizer, jax.random.key(1)
  )
  batch, frozen = bandit.make_batch(problem), bandit.make_frozen(problem)
  eager_state, eager_metrics = step(state, batch, frozen)
  jit_state, jit_metrics = jax.jit(step)(state, batch, frozen)
  np.testing.assert_allclose(
      eager_state.params['logits'], jit_state.params['logits'], atol=1e-6
  )
  np.testing.assert_allclose(
      eager_metrics['loss'], jit_metrics['loss'], atol=1e-6
  )


def test_samples_depend_on_example_ids_only():
  # The same prompt at another batch position gets the same samples, so a
  # different split of the batch over devices draws the same numbers.
  sample_fn = bandit.make_sample_fn(16)
  params = {'logits': jnp.zeros((2, 64))}
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      jax.random.key(0), jnp.array([5, 9])
  )
  batch = {'prompt_index': jnp.array([0, 1])}
  both = sample_fn(params, batch, keys)['response']
  alone = sample_fn(params, {'prompt_index': jnp.array([1])}, keys[1:])
  np.testing.assert_array_equal(both[1], alone['response'][0])
