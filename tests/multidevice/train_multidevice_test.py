"""jit over an 8-device mesh, pmap on 8 devices and one device agree.

Run in its own process with 8 host CPU devices (the Makefile sets it):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      .venv/bin/python -m pytest tests/multidevice
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import bandit
from infalign_jax import rl
from infalign_jax import train

_NUM_DEVICES = 8
_NUM_STEPS = 3
_NUM_SAMPLES = 8
# SGD, because Adam's first step maps a gradient of rounding size to +-lr,
# which would amplify the float reordering between device layouts.
_OPTIMIZER = optax.sgd(0.5)


@pytest.fixture(scope='module', autouse=True)
def _require_devices():
  if jax.device_count() < _NUM_DEVICES:
    pytest.fail(
        f'These tests need {_NUM_DEVICES} devices, found '
        f'{jax.device_count()}. Run them with XLA_FLAGS='
        f'--xla_force_host_platform_device_count={_NUM_DEVICES}.'
    )


def _problem():
  return bandit.make_problem(
      num_prompts=16,
      num_responses=32,
      table_size=256,
      concentration=1.0,
      seed=3,
  )


def _rl_config(algorithm):
  return rl.RLConfig(
      beta=0.2,
      transform='exp',
      transform_params={'t': 3.0},
      algorithm=algorithm,
      num_samples=_NUM_SAMPLES,
      ppo_epochs=2,
  )


def _make_step(algorithm, axis_name=None):
  return rl.make_rl_train_step(
      _rl_config(algorithm),
      _OPTIMIZER,
      sample_fn=bandit.make_sample_fn(_NUM_SAMPLES),
      logprob_fn=bandit.logprob_fn,
      ref_logprob_fn=bandit.ref_logprob_fn,
      reward_fn=bandit.reward_fn,
      axis_name=axis_name,
  )


def _initial_state(problem):
  params = {'logits': jnp.asarray(problem.log_ref)}
  return train.init_train_state(params, _OPTIMIZER, jax.random.key(7))


@functools.cache
def _jit_step(algorithm, num_devices):
  """Return the mesh and the compiled step, built once per test module."""
  mesh = train.make_mesh(num_devices)
  return mesh, train.jit_train_step(_make_step(algorithm), mesh)


def _run_jit(algorithm, num_devices):
  problem = _problem()
  mesh, step = _jit_step(algorithm, num_devices)
  state = train.replicate_on_mesh(_initial_state(problem), mesh)
  batch = train.shard_batch(bandit.make_batch(problem), mesh)
  frozen = train.replicate_on_mesh(bandit.make_frozen(problem), mesh)
  metrics = []
  for _ in range(_NUM_STEPS):
    state, step_metrics = step(state, batch, frozen)
    metrics.append(jax.device_get(step_metrics))
  return jax.device_get(state.params), metrics


def _run_pmap(algorithm, num_devices):
  problem = _problem()
  step = train.pmap_train_step(
      _make_step(algorithm, axis_name=train.DATA_AXIS),
      devices=jax.devices()[:num_devices],
  )
  state = train.replicate(_initial_state(problem), num_devices)
  batch = train.split_batch(bandit.make_batch(problem), num_devices)
  frozen = bandit.make_frozen(problem)
  metrics = []
  for _ in range(_NUM_STEPS):
    state, step_metrics = step(state, batch, frozen)
    metrics.append(jax.device_get(train.unreplicate(step_metrics)))
  params = jax.device_get(state.params)
  # Every device must hold the same parameters.
  np.testing.assert_array_equal(
      params['logits'],
      np.broadcast_to(params['logits'][:1], params['logits'].shape),
  )
  return train.unreplicate(params), metrics


def _check_same_run(runs, reference, reference_metrics):
  for name, (params, metrics) in runs.items():
    np.testing.assert_allclose(
        params['logits'],
        reference['logits'],
        atol=1e-5,
        rtol=0,
        err_msg=f'{name} vs jit on 1 device',
    )
    for got, want in zip(metrics, reference_metrics, strict=True):
      for key in ('loss', 'kl', 'raw_reward_mean', 'calibrated_reward_mean'):
        np.testing.assert_allclose(
            got[key],
            want[key],
            atol=1e-5,
            rtol=1e-5,
            err_msg=f'{name}: metric {key}',
        )
      assert int(got['nonfinite_count']) == 0


def test_jit_and_pmap_agree_after_three_steps():
  reference, reference_metrics = _run_jit('reinforce', 1)
  initial = _problem().log_ref
  assert np.max(np.abs(reference['logits'] - initial)) > 1e-3
  runs = {
      'jit on 8 devices': _run_jit('reinforce', _NUM_DEVICES),
      'pmap on 8 devices': _run_pmap('reinforce', _NUM_DEVICES),
      'pmap on 1 device': _run_pmap('reinforce', 1),
  }
  _check_same_run(runs, reference, reference_metrics)


def test_ppo_jit_and_pmap_agree():
  # PPO runs its inner epochs in a lax.scan; the cross-device mean must
  # happen in every epoch.
  reference, reference_metrics = _run_jit('ppo', 1)
  runs = {
      'jit on 8 devices': _run_jit('ppo', _NUM_DEVICES),
      'pmap on 8 devices': _run_pmap('ppo', _NUM_DEVICES),
  }
  _check_same_run(runs, reference, reference_metrics)


def test_jit_step_shards_batch_and_donates_state():
  problem = _problem()
  mesh, step = _jit_step('reinforce', _NUM_DEVICES)
  state = train.replicate_on_mesh(_initial_state(problem), mesh)
  batch = train.shard_batch(bandit.make_batch(problem), mesh)
  frozen = train.replicate_on_mesh(bandit.make_frozen(problem), mesh)
  assert len(batch['sorted_ref_rewards'].addressable_shards) == _NUM_DEVICES
  shard_shape = batch['sorted_ref_rewards'].addressable_shards[0].data.shape
  assert shard_shape == (16 // _NUM_DEVICES, 256)
  old_logits = state.params['logits']
  new_state, _ = step(state, batch, frozen)
  assert old_logits.is_deleted()
  assert not frozen['log_ref'].is_deleted()
  assert new_state.params['logits'].sharding.is_fully_replicated
  assert int(new_state.step) == 1


def test_shard_batch_rejects_indivisible_batch():
  mesh = train.make_mesh(_NUM_DEVICES)
  with pytest.raises(ValueError, match='not divisible by the 8 devices'):
    train.shard_batch({'x': np.zeros((12, 3))}, mesh)
