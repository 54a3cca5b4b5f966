"""Tests for the experiment runner's workdir and summary bookkeeping."""

import hashlib
import json
import shutil
import tempfile

from absl.testing import absltest
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common


def _config(**overrides):
  config = ml_collections.ConfigDict({'experiment': 'fake', 'steps': 3})
  config.update(overrides)
  return config


def _ok_run(config, workdir):
  (workdir / 'artifact.txt').write_text(str(config.steps))
  return {'final_step': config.steps, 'final_params_sha256': None}


class _TempdirTestCase(absltest.TestCase):

  def _tempdir(self):
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


class RunExperimentTest(_TempdirTestCase):

  def test_writes_config_and_summary(self):
    workdir = self._tempdir()
    summary = common.run_experiment(_ok_run, _config(), workdir)
    self.assertEqual(summary['final_step'], 3)
    on_disk = json.loads(open(f'{workdir}/summary.json').read())
    self.assertEqual(on_disk['final_step'], 3)
    self.assertEqual(on_disk['experiment'], 'fake')
    recorded = json.loads(open(f'{workdir}/config.json').read())
    self.assertEqual(recorded, {'experiment': 'fake', 'steps': 3})

  def test_same_config_resumes(self):
    workdir = self._tempdir()
    common.run_experiment(_ok_run, _config(), workdir)
    summary = common.run_experiment(_ok_run, _config(), workdir)
    self.assertEqual(summary['final_step'], 3)

  def test_other_config_rejected(self):
    workdir = self._tempdir()
    common.run_experiment(_ok_run, _config(), workdir)
    with self.assertRaisesRegex(ValueError, r"another config.*\['steps'\]"):
      common.run_experiment(_ok_run, _config(steps=4), workdir)

  def test_failed_first_start_leaves_workdir_free(self):
    workdir = self._tempdir() + '/run'

    def invalid_run(config, workdir):
      raise ValueError(f'steps must be >= 1, got {config.steps}')

    with self.assertRaisesRegex(ValueError, 'steps must be'):
      common.run_experiment(invalid_run, _config(steps=-1), workdir)
    summary = common.run_experiment(_ok_run, _config(), workdir)
    self.assertEqual(summary['final_step'], 3)

  def test_invalid_input_after_artifacts_frees_workdir(self):
    workdir = self._tempdir()

    def late_invalid_run(config, workdir):
      (workdir / 'stage_one.txt').write_text('done')
      raise ValueError('config.evaluation.samples_per_prompt is too small')

    with self.assertRaisesRegex(ValueError, 'too small'):
      common.run_experiment(late_invalid_run, _config(), workdir)
    summary = common.run_experiment(_ok_run, _config(steps=5), workdir)
    self.assertEqual(summary['final_step'], 5)

  def test_failure_after_artifacts_keeps_config(self):
    workdir = self._tempdir()

    def crashing_run(config, workdir):
      (workdir / 'partial.txt').write_text('half')
      raise RuntimeError('killed')

    with self.assertRaisesRegex(RuntimeError, 'killed'):
      common.run_experiment(crashing_run, _config(), workdir)
    with self.assertRaisesRegex(ValueError, 'another config'):
      common.run_experiment(_ok_run, _config(steps=5), workdir)

  def test_missing_summary_keys_rejected(self):
    workdir = self._tempdir()
    with self.assertRaisesRegex(KeyError, 'final_params_sha256'):
      common.run_experiment(lambda c, w: {'final_step': 0}, _config(), workdir)


class ParamsSha256Test(_TempdirTestCase):

  def test_hashes_leaf_bytes_in_tree_order(self):
    params = {'b': jnp.arange(3, dtype=jnp.float32), 'a': jnp.ones((2, 2))}
    expected = hashlib.sha256()
    # Dict leaves are flattened in sorted key order: 'a' before 'b'.
    expected.update(np.ones((2, 2), np.float32).tobytes())
    expected.update(np.arange(3, dtype=np.float32).tobytes())
    self.assertEqual(common.params_sha256(params), expected.hexdigest())

  def test_changes_with_one_bit(self):
    params = {'w': jnp.zeros(4)}
    changed = {'w': jnp.zeros(4).at[2].set(1e-30)}
    self.assertNotEqual(
        common.params_sha256(params), common.params_sha256(changed)
    )


if __name__ == '__main__':
  absltest.main()
