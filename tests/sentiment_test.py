"""Tests of the sentiment experiment: stages, prompts, report, end to end."""

import json
import math

import numpy as np
import pytest
from etils import epath

from experiments.sentiment import prompts as prompts_lib
from experiments.sentiment import report as report_lib
from experiments.sentiment import stages


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
  assert sorted(prompts) == sorted([
      'A gorgeous, witty ',
      'Ridiculously overlong and ',
  ])


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
  assert '| exp | 0.100 |' in markdown
  assert 'exp against baseline on W_BoN,4' in markdown
  stored = json.loads((directory / 'report.json').read_text())
  assert len(stored['table']) == 4
  assert np.isclose(stored['table'][2]['bon'], 0.62)
