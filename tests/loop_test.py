"""Tests for infalign_jax.loop, in process, on a tiny quadratic problem."""

import json
import pathlib
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from infalign_jax import checkpointing
from infalign_jax import loop
from infalign_jax import metrics
from infalign_jax import train

_CONFIG_JSON = json.dumps({'problem': 'quadratic', 'learning_rate': 0.1})


def _loss_fn(params, batch, frozen, key):
  """Squared distance to a noisy target; NaN when the batch requests it."""
  target = batch['target'] + frozen * jax.random.normal(key, (3,))
  loss = jnp.sum((params['w'] - target) ** 2)
  loss = jnp.where(batch['poison'], jnp.nan, loss)
  return loss, {'distance': jnp.sqrt(loss)}


def _make_batch_fn(poison_position=None):
  def batch_fn(position):
    batch = {
        'target': jnp.asarray(
            [position % 5, 1.0, -0.5 * position], jnp.float32
        ),
        'poison': jnp.asarray(position == poison_position),
    }
    return batch, position + 1

  return batch_fn


def _init_state_fn():
  optimizer = optax.adam(0.1)
  return train.init_train_state(
      {'w': jnp.zeros((3,), jnp.float32)}, optimizer, jax.random.key(42)
  )


_TRAIN_STEP = jax.jit(
    train.make_train_step(_loss_fn, optax.adam(0.1)), donate_argnums=0
)


class RunTrainingTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = pathlib.Path(self.enter_context(tempfile.TemporaryDirectory()))

  def _run(self, workdir, num_steps, **kwargs):
    options = {
        'train_step': _TRAIN_STEP,
        'init_state_fn': _init_state_fn,
        'batch_fn': _make_batch_fn(),
        'frozen': jnp.float32(0.1),
        'config_json': _CONFIG_JSON,
        'save_every': 2,
        'log_every': 3,
    }
    options.update(kwargs)
    return loop.run_training(workdir=workdir, num_steps=num_steps, **options)

  def test_short_runs_equal_one_long_run(self):
    long_state = self._run(self.tmp / 'long', 8)
    for num_steps in (3, 5, 8):
      short_state = self._run(self.tmp / 'short', num_steps)
    self.assertEqual(int(short_state.step), 8)
    self.assertEqual(int(short_state.data_position), 8)
    np.testing.assert_array_equal(
        np.asarray(short_state.params['w']), np.asarray(long_state.params['w'])
    )
    np.testing.assert_array_equal(
        jax.random.key_data(short_state.key),
        jax.random.key_data(long_state.key),
    )
    # Each log step appears once, with the values of the long run.
    long_lines = metrics.read_jsonl(self.tmp / 'long' / 'metrics.jsonl')
    short_lines = metrics.read_jsonl(self.tmp / 'short' / 'metrics.jsonl')
    self.assertEqual([r['step'] for r in long_lines], [1, 2, 3, 4, 5, 6, 8])
    self.assertEqual([r['step'] for r in short_lines], [1, 2, 3, 4, 5, 6, 7, 8])
    long_loss = {r['step']: r['train/loss'] for r in long_lines}
    for record in short_lines:
      if record['step'] in long_loss:
        self.assertEqual(record['train/loss'], long_loss[record['step']])

  def test_metrics_cover_train_step_outputs(self):
    self._run(self.tmp, 2)
    record = metrics.read_jsonl(self.tmp / 'metrics.jsonl')[-1]
    for name in (
        'train/loss',
        'train/distance',
        'train/grad_norm',
        'train/nonfinite_count',
        'train/steps_per_second',
    ):
      self.assertIn(name, record)
    self.assertEqual(record['train/nonfinite_count'], 0)

  def test_logs_environment_and_progress(self):
    with self.assertLogs('absl', level='INFO') as logs:
      self._run(self.tmp, 4)
    text = '\n'.join(logs.output)
    self.assertIn(f'with JAX {jax.__version__}; process 0 of 1', text)
    self.assertIn(_CONFIG_JSON, text)
    self.assertRegex(
        text, r'step 4/4 \(100\.0%\): [0-9.e+]+ steps/s, ETA 0m00s'
    )

  def test_nonfinite_stops_before_checkpoint(self):
    # The batch at data position 2 is read by step 3.
    with self.assertRaisesRegex(
        loop.NonFiniteError,
        'at step 3. A re-run resumes from the ' 'checkpoint of step 2',
    ):
      self._run(
          self.tmp, 8, batch_fn=_make_batch_fn(poison_position=2), log_every=50
      )
    with checkpointing.RunCheckpointer(
        self.tmp / 'checkpoints', config_json=_CONFIG_JSON
    ) as checkpointer:
      self.assertEqual(checkpointer.steps, [2])
      restored = checkpointer.restore(
          checkpointing.abstract_state(_init_state_fn)
      )
    self.assertTrue(np.all(np.isfinite(np.asarray(restored.params['w']))))

  def test_nonfinite_without_checkpoint_says_so(self):
    with self.assertRaisesRegex(
        loop.NonFiniteError, 'at step 1. No checkpoint exists'
    ):
      self._run(self.tmp, 4, batch_fn=_make_batch_fn(poison_position=0))

  def test_other_config_rejected(self):
    self._run(self.tmp, 2)
    with self.assertRaisesRegex(
        checkpointing.IncompatibleCheckpointError, 'learning_rate'
    ):
      self._run(
          self.tmp,
          4,
          config_json=json.dumps(
              {'learning_rate': 0.2, 'problem': 'quadratic'}
          ),
      )

  def test_zero_steps_rejected(self):
    with self.assertRaisesRegex(ValueError, 'num_steps must be >= 1, got 0'):
      self._run(self.tmp, 0)


if __name__ == '__main__':
  absltest.main()
