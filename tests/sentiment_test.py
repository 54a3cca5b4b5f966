"""Tests of the sentiment experiment: stages, prompts, report, end to end."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

from etils import epath
import jax
import numpy as np
import pytest

from experiments import common
from experiments.configs import sentiment as sentiment_config
from experiments.sentiment import prompts as prompts_lib
from experiments.sentiment import report as report_lib
from experiments.sentiment import stages
from infalign_jax import calibration
from infalign_jax import models
from infalign_jax import train as train_lib
from infalign_jax.data import fetch

# Prompts.


def test_prompts_take_opening_words():
  texts = [
      'A gorgeous, witty film that never stops.',
      'Dull.',
      'A gorgeous, witty film, again and again.',
      'Ridiculously overlong and pretentious nonsense from start to end.',
  ]
  prompts = prompts_lib.make_prompts(
      texts,
      num_words=3,
      min_continuation_words=2,
      max_prompt_bytes=30,
      count=10,
      seed=0,
      source='test texts',
  )
  assert sorted(prompts) == sorted(
      [
          'A gorgeous, witty ',
          'Ridiculously overlong and ',
      ]
  )


def test_prompts_respect_byte_limit():
  prompts = prompts_lib.make_prompts(
      ['Ridiculously overlong and pretentious nonsense.', 'It is a fine one.'],
      num_words=3,
      min_continuation_words=1,
      max_prompt_bytes=10,
      count=10,
      seed=0,
      source='test texts',
  )
  assert prompts == ['It is a ']


def test_prompts_none_left_raises():
  with pytest.raises(ValueError, match='No prompts remain in tiny/test'):
    prompts_lib.make_prompts(
        ['Too short.', 'Also short.'],
        num_words=3,
        min_continuation_words=2,
        max_prompt_bytes=30,
        count=4,
        seed=0,
        source='tiny/test',
    )


# Stages.


def test_stage_skipped_when_done(tmp_path):
  workdir = epath.Path(tmp_path)
  calls = []

  def body(directory):
    calls.append(directory)
    (directory / 'artifact.txt').write_text('x')
    return {'value': 1}

  first = stages.run_stage(workdir, 'a', {'k': 1}, {}, body)
  second = stages.run_stage(workdir, 'a', {'k': 1}, {}, body)
  assert len(calls) == 1
  assert second.identity == first.identity
  assert second.record['value'] == 1


def test_stage_identity_follows_inputs(tmp_path):
  workdir = epath.Path(tmp_path)
  upstream_a = stages.run_stage(workdir, 'up_a', 1, {}, lambda d: {})
  upstream_b = stages.run_stage(workdir, 'up_b', 2, {}, lambda d: {})
  with_a = stages.stage_identity('down', {}, {'up': upstream_a})
  with_b = stages.stage_identity('down', {}, {'up': upstream_b})
  assert with_a != with_b


def test_stage_interrupted_other_identity_cleared(tmp_path):
  workdir = epath.Path(tmp_path)
  directory = workdir / 'a'
  directory.mkdir(parents=True)
  (directory / stages.STARTED_FILE).write_text(json.dumps({'identity': 'old'}))
  (directory / 'stale.txt').write_text('left by another config')
  stages.run_stage(workdir, 'a', {'k': 1}, {}, lambda d: {})
  assert not (directory / 'stale.txt').exists()
  assert (directory / stages.DONE_FILE).exists()


def test_stage_failure_leaves_no_done(tmp_path):
  workdir = epath.Path(tmp_path)

  def body(directory):
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    stages.run_stage(workdir, 'a', {}, {}, body)
  assert not (workdir / 'a' / stages.DONE_FILE).exists()


# Report.


def _row(method, beta, kl, value, se):
  row = {'method': method, 'beta': beta, 't': None}
  for metric in ('kl', 'w1', 'bon', 'won', 'reward', 'judge'):
    row[metric] = value
    row[f'{metric}_se'] = se
  row['kl'] = kl
  row['kl_se'] = 0.01
  return row


def test_matched_kl_interpolates_baseline():
  rows = [
      _row('baseline', 0.1, 1.0, 0.7, 0.02),
      _row('exp', 0.1, 0.5, 0.7, 0.01),
  ]
  comparison = report_lib.compare_at_matched_kl(
      rows, challenger='exp', baseline='baseline', metric='bon', label='BoN'
  )
  (point,) = comparison['points']
  # The baseline curve runs from the reference (0, 0.5, se 0) to
  # (1.0, 0.7, se 0.02), so at KL 0.5 it is 0.6 with se 0.01.
  assert point['baseline'] == pytest.approx(0.6)
  assert point['baseline_se'] == pytest.approx(0.01)
  assert point['difference'] == pytest.approx(0.1)
  assert point['standard_errors'] == pytest.approx(0.1 / math.sqrt(2e-4))
  assert comparison['verdict'] == 'beat'


def test_matched_kl_outside_range_not_extrapolated():
  rows = [
      _row('baseline', 0.1, 0.2, 0.6, 0.02),
      _row('neg_exp', 0.1, 0.5, 0.7, 0.01),
  ]
  comparison = report_lib.compare_at_matched_kl(
      rows, challenger='neg_exp', baseline='baseline', metric='won', label='W'
  )
  assert comparison['points'] == []
  assert comparison['verdict'] == 'no_overlap'


def test_matched_kl_behind():
  rows = [
      _row('baseline', 0.1, 1.0, 0.9, 0.01),
      _row('exp', 0.1, 0.5, 0.6, 0.01),
  ]
  comparison = report_lib.compare_at_matched_kl(
      rows, challenger='exp', baseline='baseline', metric='bon', label='BoN'
  )
  assert comparison['verdict'] == 'behind'
  assert comparison['points'][0]['difference'] == pytest.approx(-0.1)


def test_matched_kl_behind_within_noise():
  rows = [
      _row('baseline', 0.1, 1.0, 0.7, 0.05),
      _row('exp', 0.1, 0.5, 0.59, 0.05),
  ]
  comparison = report_lib.compare_at_matched_kl(
      rows, challenger='exp', baseline='baseline', metric='bon', label='BoN'
  )
  # Baseline at KL 0.5: 0.6 with se 0.025, so z = -0.01 / 0.056 = -0.18.
  assert comparison['verdict'] == 'behind_within_noise'
  assert 'not everywhere by 2 standard errors' in comparison['statement']


def test_report_writes_table_and_plots(tmp_path):
  directory = epath.Path(tmp_path)
  rows = [
      _row('reference', None, 0.0, 0.5, 0.0),
      _row('baseline', 0.1, 0.4, 0.6, 0.02),
      _row('exp', 0.1, 0.3, 0.62, 0.02),
      _row('neg_exp', 0.1, 0.35, 0.58, 0.02),
  ]
  predictions = {
      'exp': {
          'beta': [1.0, 0.1],
          'kl': [0.05, 0.5],
          'w1': [0.55, 0.7],
          'bon': [0.56, 0.75],
          'won': [0.54, 0.65],
      }
  }
  payload = report_lib.write_report(
      directory,
      rows=rows,
      predictions=predictions,
      procedure_n=4,
      methods=('baseline', 'exp', 'neg_exp'),
      sections={'reward_model': {'accuracy': 0.8}},
  )
  assert payload['plots'] == [
      'w1_vs_kl.png',
      'bon4_vs_kl.png',
      'won4_vs_kl.png',
  ]
  for plot in payload['plots']:
    assert (directory / plot).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  markdown = (directory / 'report.md').read_text()
  assert '| exp | - | 0.1 |' in markdown
  assert 'exp against baseline on W_BoN,4' in markdown
  stored = json.loads((directory / 'report.json').read_text())
  assert len(stored['table']) == 4
  assert np.isclose(stored['table'][2]['bon'], 0.62)


# End to end on the real data.

REPO = epath.Path(__file__).parent.parent
DATA_DIR = REPO / 'data'
CONFIG_FILE = REPO / 'experiments' / 'configs' / 'sentiment.py'


needs_data = pytest.mark.skipif(
    not fetch.archive_path(DATA_DIR).is_file(),
    reason=(
        f'No VADER archive in {DATA_DIR}: run `make data` (or `python -m '
        'infalign_jax.data.fetch --data_dir=data`) to fetch it.'
    ),
)


def _command(workdir, variant='smoke'):
  return [
      sys.executable,
      '-m',
      'experiments.main',
      f'--config={CONFIG_FILE}:{variant}',
      f'--config.data.data_dir={DATA_DIR}',
      f'--workdir={workdir}',
  ]


def _environment(cache_dir):
  env = dict(os.environ)
  # Compiled executables are shared between the runs of this module.
  env['JAX_COMPILATION_CACHE_DIR'] = str(cache_dir)
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _table(workdir):
  report = json.loads((workdir / 'report' / 'report.json').read_text())
  return report['table']


@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory, compile_cache):
  workdir = epath.Path(tmp_path_factory.mktemp('smoke')) / 'run'
  start = time.time()
  result = subprocess.run(
      _command(workdir),
      env=_environment(compile_cache),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  seconds = time.time() - start
  assert result.returncode == 0, result.stderr[-4000:]
  return workdir, seconds, result.stderr


@needs_data
def test_smoke_end_to_end(smoke_run):
  workdir, seconds, log = smoke_run
  config = sentiment_config.get_config('smoke')
  del seconds  # Wall time depends on what else runs on the machine.
  summary = json.loads((workdir / 'summary.json').read_text())
  # The budget is 2 minutes on 2 cores. CPU time summed over stages and
  # threads stays steady on a busy machine, and with 2 cores busy the wall
  # time of an idle machine is at most about that sum.
  cpu_seconds = sum(s['cpu'] for s in summary['stage_seconds'].values())
  assert cpu_seconds < 120
  assert summary['experiment'] == 'sentiment'
  assert len(summary['final_params_sha256']) == 64
  assert 'report/report.md' in log
  table = _table(workdir)
  methods = [row['method'] for row in table]
  assert methods == ['reference'] + [
      method for _ in config.rl.kl_targets for method in config.rl.methods
  ]
  for row in table:
    for metric in ('w1', 'bon', 'won'):
      assert 0.0 <= row[metric] <= 1.0
    assert -1.0 <= row['judge'] <= 1.0
  # The reference against its own fresh samples: the log ratio of a policy
  # with itself is zero up to the cached and uncached forward passes'
  # rounding.
  assert abs(table[0]['kl']) < 1e-4
  for plot in ('w1_vs_kl.png', 'bon4_vs_kl.png', 'won4_vs_kl.png'):
    assert (workdir / 'report' / plot).exists()
  markdown = (workdir / 'report' / 'report.md').read_text()
  assert 'Did exp against baseline on W_BoN,4 win' in markdown or (
      'exp against baseline on W_BoN,4: no matched KL' in markdown
  )


@needs_data
def test_killed_pipeline_resumes_to_same_report(
    smoke_run, compile_cache, tmp_path
):
  reference_workdir, _, _ = smoke_run
  workdir = epath.Path(tmp_path) / 'run'
  process = subprocess.Popen(
      _command(workdir),
      env=_environment(compile_cache),
      cwd=REPO,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  # Kill once the first RL run has written a checkpoint: mid-pipeline, with
  # completed stages behind and a half-finished training stage.
  deadline = time.time() + 240
  marker = None
  while time.time() < deadline and process.poll() is None:
    found = list(workdir.glob('rl_*/checkpoints/*'))
    if found:
      marker = found[0]
      break
    time.sleep(0.2)
  assert marker is not None, 'the pipeline never reached an RL checkpoint'
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  assert not (workdir / 'report' / stages.DONE_FILE).exists()

  result = subprocess.run(
      _command(workdir),
      env=_environment(compile_cache),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'Stage reference_lm: complete, skipped' in result.stderr
  assert 'Stage calibration: complete, skipped' in result.stderr
  assert _table(workdir) == _table(reference_workdir)


@needs_data
def test_other_config_workdir_rejected(smoke_run):
  workdir, _, _ = smoke_run
  config = sentiment_config.get_config('smoke')
  config.rl.kl_targets = (0.3,)
  from experiments import sentiment  # pylint: disable=g-import-not-at-top

  with pytest.raises(
      ValueError, match='contains a run made with another config'
  ):
    common.run_experiment(sentiment.run, config, str(workdir))


@pytest.mark.parametrize(
    'field', ['reference_policy', 'reward_model', 'prompts']
)
@needs_data
def test_table_for_other_setup_rejected(smoke_run, field):
  from experiments.sentiment import ctrl  # pylint: disable=g-import-not-at-top

  workdir, _, _ = smoke_run
  directory = workdir / 'calibration'
  table = ctrl.calibration.CalibrationTable.load(directory / ctrl.TABLE_FOLDER)
  identity = dict(table.identity)
  identity.pop('M')
  ctrl.load_calibration_table(directory, identity)  # The matching setup.
  identity[field] = 'another ' + field
  with pytest.raises(ValueError, match=f'{field}: table has'):
    ctrl.load_calibration_table(directory, identity)


def _smoke_config(data_dir):
  config = sentiment_config.get_config('smoke')
  config.data.data_dir = str(data_dir)
  # These tests run in the pytest process: leave its JAX settings alone.
  config.disable_most_optimizations = False
  config.compilation_cache = False
  return config


def test_missing_archive_rejected(tmp_path):
  from experiments import sentiment  # pylint: disable=g-import-not-at-top

  config = _smoke_config(tmp_path / 'empty_data')
  with pytest.raises(FileNotFoundError, match='infalign_jax.data.fetch'):
    sentiment.run(config, epath.Path(tmp_path) / 'run')


def test_damaged_archive_rejected(tmp_path):
  from experiments import sentiment  # pylint: disable=g-import-not-at-top

  data_dir = tmp_path / 'data'
  path = fetch.archive_path(data_dir)
  path.parent.mkdir(parents=True)
  path.write_bytes(b'not a gzip archive')
  config = _smoke_config(data_dir)
  with pytest.raises(ValueError, match=str(path)):
    sentiment.run(config, epath.Path(tmp_path) / 'run')


@needs_data
def test_no_prompts_after_filtering_rejected(smoke_run, tmp_path):
  from experiments import sentiment  # pylint: disable=g-import-not-at-top

  smoke_workdir, _, _ = smoke_run
  workdir = epath.Path(tmp_path) / 'run'
  # The completed data stage of the smoke run is reused (same identity), so
  # the pipeline reaches the prompts stage at once.
  shutil.copytree(smoke_workdir / 'data', workdir / 'data')
  config = _smoke_config(DATA_DIR)
  config.prompts.num_words = 500
  with pytest.raises(ValueError, match='No prompts remain in movie_reviews'):
    sentiment.run(config, workdir)
  assert not (workdir / 'prompts' / stages.DONE_FILE).exists()


def _two_steps(trainer, params, frozen=None):
  """Run two compiled steps of `trainer` from `params`; return the metrics."""
  state = train_lib.init_train_state(
      params, trainer.optimizer, jax.random.key(0)
  )
  step = jax.jit(trainer.train_step)
  history = []
  for position in (0, trainer.batch_size):
    state, metrics = step(state, trainer.batch_fn(position), frozen)
    history.append(jax.device_get(metrics))
  assert int(state.step) == 2
  return history


# NOTE: about 3 minutes on a busy 2-core CPU, most of it compiling the
# width-512, 8-layer model; hence `make test-slow` only.
@pytest.mark.slow
def test_large_config_trainers_run_two_steps():
  from experiments.sentiment import ctrl  # pylint: disable=g-import-not-at-top
  from experiments.sentiment import policy  # pylint: disable=g-import-not-at-top
  from experiments.sentiment import training  # pylint: disable=g-import-not-at-top

  config = sentiment_config.get_config('large')
  config.lm.batch_size = 2
  config.reward.batch_size = 2
  config.rl.batch_prompts = 2
  config.rl.samples_per_prompt = 2
  examples = [
      {'text': 'A gorgeous, witty film.', 'mean_rating': 2.5},
      {'text': 'Dull and overlong.', 'mean_rating': -2.0},
  ]
  lm_params = models.init_lm(jax.random.key(1), policy.lm_config(config))
  reward_params = models.init_reward_model(
      jax.random.key(2), policy.reward_config(config)
  )
  lm_trainer = training.make_lm_trainer(config, [e['text'] for e in examples])
  reward_trainer = training.make_reward_trainer(config, examples)
  prompts = ['The film is ', 'It never ']
  table = calibration.CalibrationTable.build(
      np.linspace(-1.0, 1.0, 8)[None, :].repeat(2, axis=0),
      np.arange(2),
      {'reference_policy': 'untrained', 'reward_model': 'untrained'},
  )
  policy_trainer = ctrl.make_policy_trainer(
      config,
      method='exp',
      beta=0.1,
      t=5.0,
      prompts=prompts,
      table=table,
      reward_scale=1.0,
  )

  _run_large_trainers(
      lm_trainer, reward_trainer, policy_trainer, lm_params, reward_params
  )


def _run_large_trainers(
    lm_trainer, reward_trainer, policy_trainer, lm_params, reward_params
):
  for trainer, params, frozen in (
      (lm_trainer, lm_params, None),
      (reward_trainer, reward_params, None),
      (
          policy_trainer,
          lm_params,
          {'reference': lm_params, 'reward_model': reward_params},
      ),
  ):
    for metrics in _two_steps(trainer, params, frozen):
      assert np.isfinite(metrics['loss'])
      assert metrics['nonfinite_count'] == 0


@pytest.mark.parametrize(
    ('group', 'name', 'value', 'message'),
    [
        ('rl', 'kl_targets', (), 'kl_targets must list'),
        ('calibration', 'num_samples', 1, 'must be at least 2'),
        ('rl', 'steps', -1, r'config\.rl\.steps must be a positive'),
        ('evaluation', 'samples_per_prompt', 2, 'need at least N samples'),
        ('evaluation', 'batch_prompts', 0, 'batch_prompts must be'),
    ],
)
def test_invalid_config_rejected_before_stages(
    tmp_path, group, name, value, message
):
  from experiments import sentiment  # noqa: PLC0415

  config = sentiment_config.get_config('smoke')
  config[group][name] = value
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=message):
    common.run_experiment(sentiment.run, config, str(workdir))
  # Nothing is left behind, so the corrected command can start there.
  assert not workdir.exists()


def test_variant_configs_are_valid():
  from experiments.sentiment import pipeline  # noqa: PLC0415

  for variant in (None, 'smoke', 'large'):
    pipeline.validate_config(sentiment_config.get_config(variant))


def test_save_params_overwrites_left_over_file(tmp_path):
  from experiments.sentiment import policy  # noqa: PLC0415

  directory = epath.Path(tmp_path)
  # A run killed after saving but before done.json leaves params behind;
  # the redone stage must be able to save again.
  policy.save_params(directory, {'w': np.zeros(3, np.float32)})
  policy.save_params(directory, {'w': np.ones(3, np.float32)})
  restored = policy.load_params(directory)
  np.testing.assert_array_equal(restored['w'], np.ones(3, np.float32))
