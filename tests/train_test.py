"""Tests for infalign_jax.train on one device (multi-device: tests/multidevice)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infalign_jax import train


def _quadratic_loss(params, batch, frozen, key):
  """0.5 * mean_b (w . x_b - y_b)^2 + frozen offset; reports a key draw."""
  predictions = batch['x'] @ params['w']
  loss = 0.5 * jnp.mean(jnp.square(predictions - batch['y'])) + frozen['c']
  return loss, {'draw': jax.random.uniform(key), 'count': jnp.int32(3)}


def _batch():
  x = np.array([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0], [1.0, 1.0]], np.float32)
  return {'x': x, 'y': np.array([1.0, 0.0, 2.0, -1.0], np.float32)}


def _state():
  return train.init_train_state(
      {'w': jnp.array([0.5, -0.5])}, optax.sgd(0.1), jax.random.key(0)
  )


def test_make_train_step_sgd_by_hand():
  step = jax.jit(train.make_train_step(_quadratic_loss, optax.sgd(0.1)))
  batch = _batch()
  state, metrics = step(_state(), batch, {'c': jnp.float32(2.0)})
  w = np.array([0.5, -0.5])
  residual = batch['x'] @ w - batch['y']
  grad = batch['x'].T @ residual / len(residual)
  np.testing.assert_allclose(state.params['w'], w - 0.1 * grad, rtol=1e-6)
  np.testing.assert_allclose(
      metrics['loss'], 0.5 * np.mean(residual**2) + 2.0, rtol=1e-6
  )
  np.testing.assert_allclose(
      metrics['grad_norm'], np.linalg.norm(grad), rtol=1e-6
  )
  assert int(metrics['nonfinite_count']) == 0
  assert int(state.step) == 1


def test_step_key_is_folded_with_step():
  step = jax.jit(train.make_train_step(_quadratic_loss, optax.sgd(0.1)))
  frozen = {'c': jnp.float32(0.0)}
  state, first = step(_state(), _batch(), frozen)
  _, second = step(state, _batch(), frozen)
  key = jax.random.key(0)
  np.testing.assert_allclose(
      first['draw'], jax.random.uniform(jax.random.fold_in(key, 0))
  )
  np.testing.assert_allclose(
      second['draw'], jax.random.uniform(jax.random.fold_in(key, 1))
  )


def test_nonfinite_gradient_is_counted():
  def sqrt_loss(params, batch, frozen, key):
    del batch, frozen, key
    return jnp.sum(jnp.sqrt(params['w'])), {}

  state = train.init_train_state(
      {'w': jnp.array([-1.0, 4.0, 0.0])}, optax.sgd(0.1), jax.random.key(0)
  )
  _, metrics = jax.jit(train.make_train_step(sqrt_loss, optax.sgd(0.1)))(
      state, {}, None
  )
  # Loss NaN (sqrt(-1)); gradients NaN at -1 and inf at 0.
  assert int(metrics['nonfinite_count']) == 3


def test_jit_train_step_donates_state_not_frozen():
  mesh = train.make_mesh(1)
  step = train.jit_train_step(
      train.make_train_step(_quadratic_loss, optax.sgd(0.1)), mesh
  )
  state = train.replicate_on_mesh(_state(), mesh)
  frozen = train.replicate_on_mesh({'c': jnp.float32(1.0)}, mesh)
  old_w = state.params['w']
  new_state, _ = step(state, train.shard_batch(_batch(), mesh), frozen)
  assert old_w.is_deleted()
  assert not frozen['c'].is_deleted()
  assert int(new_state.step) == 1


def test_jit_and_pmap_agree_on_one_device():
  loss_step = train.make_train_step(_quadratic_loss, optax.sgd(0.1))
  mesh = train.make_mesh(1)
  jit_step = train.jit_train_step(loss_step, mesh)
  pmap_step = train.pmap_train_step(
      train.make_train_step(
          _quadratic_loss, optax.sgd(0.1), axis_name=train.DATA_AXIS
      ),
      devices=jax.devices()[:1],
  )
  frozen = {'c': jnp.float32(0.5)}
  jit_state = train.replicate_on_mesh(_state(), mesh)
  pmap_state = train.replicate(_state(), 1)
  for _ in range(3):
    jit_state, jit_metrics = jit_step(
        jit_state, train.shard_batch(_batch(), mesh), frozen
    )
    pmap_state, pmap_metrics = pmap_step(
        pmap_state, train.split_batch(_batch(), 1), frozen
    )
  pmap_state = train.unreplicate(pmap_state)
  np.testing.assert_allclose(
      jit_state.params['w'], pmap_state.params['w'], atol=1e-6
  )
  pmap_metrics = train.unreplicate(pmap_metrics)
  np.testing.assert_allclose(
      jit_metrics['loss'], pmap_metrics['loss'], atol=1e-6
  )
  # Under pmap, integer metrics are averaged as float32.
  assert pmap_metrics['count'].dtype == jnp.float32
  assert float(pmap_metrics['count']) == 3.0


def test_replicate_split_unreplicate_shapes():
  tree = {'a': jnp.arange(3.0), 'key': jax.random.key(1)}
  replicated = train.replicate(tree, 2)
  assert replicated['a'].shape == (2, 3)
  assert replicated['key'].shape == (2,)
  back = train.unreplicate(replicated)
  np.testing.assert_array_equal(back['a'], tree['a'])
  split = train.split_batch({'x': jnp.arange(12).reshape(6, 2)}, 3)
  assert split['x'].shape == (3, 2, 2)


def test_split_batch_rejects_indivisible_batch():
  with pytest.raises(ValueError, match=r"\['x'\] has shape \(5, 2\)"):
    train.split_batch({'x': jnp.zeros((5, 2))}, 2)


def test_make_mesh_rejects_too_many_devices():
  with pytest.raises(ValueError, match='num_devices=1000 is invalid'):
    train.make_mesh(1000)


def test_jit_train_step_rejects_mesh_without_data_axis():
  mesh = jax.make_mesh((1,), ('model',))
  with pytest.raises(ValueError, match="lack the 'data' axis"):
    train.jit_train_step(lambda s, b, f: (s, {}), mesh)
