"""Tests for infalign_jax.checkpointing against real Orbax checkpoints."""

import json
import pathlib
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax

from infalign_jax import checkpointing
from infalign_jax import train

_CONFIG = json.dumps({'model': {'width': 4}, 'learning_rate': 0.1})
_TABLE = {'reference': 'ref-v1', 'num_reference_samples': 8, 'seed': 3}


def _make_init_fn(width=4, extra_leaf=False):
  def init_state_fn():
    params = {
        'w': jnp.arange(3 * width, dtype=jnp.float32).reshape(3, width),
        'b': jnp.zeros((width,), jnp.float32),
    }
    if extra_leaf:
      params['c'] = jnp.ones((2,), jnp.float32)
    return train.init_train_state(
        params, optax.adam(0.1), jax.random.key(7), data_position=5
    )

  return init_state_fn


def _trained_state():
  """A state whose optimizer moments and key are not their initial values."""
  state = _make_init_fn()()
  optimizer = optax.adam(0.1)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return state.replace(
      step=jnp.asarray(3, jnp.int32),
      params=optax.apply_updates(state.params, updates),
      opt_state=opt_state,
      key=jax.random.split(state.key)[0],
      data_position=jnp.asarray(11, jnp.int32),
  )


class RunCheckpointerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    self.root = epath.Path(tmp) / 'checkpoints'

  def _save(self, state, step, *, config_json=_CONFIG, table=_TABLE):
    with checkpointing.RunCheckpointer(
        self.root, config_json=config_json, table_identity=table
    ) as ckpt:
      ckpt.save(step, state)

  def test_round_trip_is_bitwise(self):
    state = _trained_state()
    self._save(state, 3)
    with checkpointing.RunCheckpointer(
        self.root, config_json=_CONFIG, table_identity=_TABLE
    ) as ckpt:
      restored, was_restored = ckpt.restore_or_init(_make_init_fn())
    self.assertTrue(was_restored)
    self.assertIsInstance(restored, train.TrainState)
    expected = jax.tree_util.tree_flatten_with_path(
        state.replace(key=jax.random.key_data(state.key))
    )[0]
    actual = jax.tree_util.tree_leaves(
        restored.replace(key=jax.random.key_data(restored.key))
    )
    self.assertLen(actual, len(expected))
    for (path, want), got in zip(expected, actual, strict=True):
      np.testing.assert_array_equal(
          np.asarray(got), np.asarray(want), err_msg=str(path)
      )
      self.assertEqual(np.asarray(got).dtype, np.asarray(want).dtype)

  def test_typed_key_round_trip(self):
    state = _trained_state()
    self._save(state, 3)
    with checkpointing.RunCheckpointer(
        self.root, config_json=_CONFIG, table_identity=_TABLE
    ) as ckpt:
      restored = ckpt.restore(checkpointing.abstract_state(_make_init_fn()))
    self.assertTrue(
        jax.dtypes.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
    )
    self.assertEqual(
        jax.random.key_impl(restored.key), jax.random.key_impl(state.key)
    )
    # The restored key draws the same numbers as the saved one.
    np.testing.assert_array_equal(
        jax.random.uniform(restored.key, (4,)),
        jax.random.uniform(state.key, (4,)),
    )

  def test_restore_places_leaves_on_given_sharding(self):
    self._save(_trained_state(), 3)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with checkpointing.RunCheckpointer(
        self.root, config_json=_CONFIG, table_identity=_TABLE
    ) as ckpt:
      restored = ckpt.restore(
          checkpointing.abstract_state(_make_init_fn(), sharding)
      )
    for leaf in jax.tree.leaves(restored):
      self.assertTrue(leaf.sharding.is_equivalent_to(sharding, leaf.ndim))

  def test_empty_directory_inits(self):
    with checkpointing.RunCheckpointer(self.root, config_json=_CONFIG) as ckpt:
      self.assertIsNone(ckpt.latest_step)
      state, was_restored = ckpt.restore_or_init(_make_init_fn())
    self.assertFalse(was_restored)
    self.assertEqual(int(state.step), 0)
    self.assertEqual(int(state.data_position), 5)

  def test_keep_policy_keeps_last_and_every_kth(self):
    state = _make_init_fn()()
    with checkpointing.RunCheckpointer(
        self.root, config_json=_CONFIG, keep_last=2, keep_every=4
    ) as ckpt:
      for step in range(1, 10):
        ckpt.save(step, state.replace(step=jnp.asarray(step, jnp.int32)))
      ckpt.wait()
      self.assertEqual(ckpt.steps, [4, 8, 9])
    on_disk = sorted(int(p.name) for p in self.root.iterdir() if p.is_dir())
    self.assertEqual(on_disk, [4, 8, 9])

  def test_other_config_rejected(self):
    self._save(_trained_state(), 3)
    other = json.dumps({'model': {'width': 4}, 'learning_rate': 0.2})
    with checkpointing.RunCheckpointer(
        self.root, config_json=other, table_identity=_TABLE
    ) as ckpt:
      with self.assertRaisesRegex(
          checkpointing.IncompatibleCheckpointError,
          r'another config.*learning_rate: checkpoint has 0\.1, run has 0\.2',
      ):
        ckpt.restore_or_init(_make_init_fn())

  def test_other_table_rejected(self):
    self._save(_trained_state(), 3)
    with checkpointing.RunCheckpointer(
        self.root, config_json=_CONFIG, table_identity={**_TABLE, 'seed': 4}
    ) as ckpt:
      with self.assertRaisesRegex(
          checkpointing.IncompatibleCheckpointError,
          'another calibration table.*seed',
      ):
        ckpt.restore_or_init(_make_init_fn())

  def test_shape_mismatch_names_leaf(self):
    self._save(_trained_state(), 3)
    with checkpointing.RunCheckpointer(
        self.root, config_json=_CONFIG, table_identity=_TABLE
    ) as ckpt:
      with self.assertRaisesRegex(
          checkpointing.IncompatibleCheckpointError,
          r'params/w: checkpoint has float32\[3, 4\], run expects '
          r'float32\[3, 5\]',
      ):
        ckpt.restore_or_init(_make_init_fn(width=5))

  def test_structure_mismatch_names_leaf(self):
    self._save(_trained_state(), 3)
    with checkpointing.RunCheckpointer(
        self.root, config_json=_CONFIG, table_identity=_TABLE
    ) as ckpt:
      with self.assertRaisesRegex(
          checkpointing.IncompatibleCheckpointError,
          'params/c: in the run but not in the checkpoint',
      ):
        ckpt.restore_or_init(_make_init_fn(extra_leaf=True))

  def test_truncated_array_files_raise_clear_error(self):
    self._save(_trained_state(), 3)
    data_files = [
        path
        for path in pathlib.Path(self.root / '3').rglob('*')
        if path.is_file() and path.parent.name == 'd'
    ]
    self.assertNotEmpty(data_files)
    for path in data_files:
      path.write_bytes(path.read_bytes()[:7])
    with checkpointing.RunCheckpointer(
        self.root, config_json=_CONFIG, table_identity=_TABLE
    ) as ckpt:
      with self.assertRaisesRegex(
          checkpointing.CorruptCheckpointError,
          f'{self.root / "3"} is truncated or corrupted.*Delete',
      ):
        ckpt.restore_or_init(_make_init_fn())

  def test_garbled_metadata_raises_clear_error(self):
    self._save(_trained_state(), 3)
    (self.root / '3' / 'state' / '_METADATA').write_text('{"tree_meta')
    with checkpointing.RunCheckpointer(
        self.root, config_json=_CONFIG, table_identity=_TABLE
    ) as ckpt:
      with self.assertRaisesRegex(
          checkpointing.CorruptCheckpointError,
          f'{self.root / "3"} is truncated or corrupted.*Delete',
      ):
        ckpt.restore_or_init(_make_init_fn())

  def test_invalid_keep_last_rejected(self):
    with self.assertRaisesRegex(ValueError, 'keep_last must be >= 1, got 0'):
      checkpointing.RunCheckpointer(self.root, config_json='{}', keep_last=0)


if __name__ == '__main__':
  absltest.main()
