"""The sentiment pipeline: every stage in order, each resumable.

Stages and their workdir folders:

  data/                  the dataset's splits as JSON
  reference_lm/          the reference LM (checkpoints, params, samples)
  reward_model/          the reward model and its held-out accuracy
  prompts/               train prompts (RL, calibration) and held-out prompts
  calibration/           the calibration table of the train prompts
  reference_samples/     reward-model scores of reference samples, held out
  rl_<method>_kl<k>/     one KL-regularized RL run from the reference LM
  eval_<run>/            evaluation of one policy on held-out prompts
  report/                report.md, report.json and the PNG plots
"""

import hashlib
import json
import math
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from experiments.sentiment import corpus
from experiments.sentiment import ctrl
from experiments.sentiment import policy
from experiments.sentiment import prompts as prompts_lib
from experiments.sentiment import report as report_lib
from experiments.sentiment import stages
from experiments.sentiment import training
from infalign_jax import analysis

# Betas of the calibrated-space prediction curves in the plots.
_PREDICTION_BETAS = tuple(np.geomspace(0.01, 10.0, 40).tolist())
# Grid nodes of the calibrated-space integrals behind the plotted curves.
_GRID = 1025


def _run_name(method: str, kl_target: float) -> str:
  return f'rl_{method}_kl{kl_target:g}'


_POSITIVE_INT_FIELDS = (
    'lm.steps',
    'lm.batch_size',
    'reward.steps',
    'reward.batch_size',
    'prompts.num_words',
    'prompts.num_train',
    'prompts.num_eval',
    'prompts.continuation_length',
    'calibration.batch_prompts',
    'rl.steps',
    'rl.batch_prompts',
    'evaluation.batch_prompts',
)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Reject config values that would fail late or give a meaningless report.

  Raises:
    ValueError: naming the config field, its value and what is allowed.
  """
  for field in _POSITIVE_INT_FIELDS:
    group, name = field.split('.')
    value = config[group][name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(
          f'config.{field} must be a positive integer, got {value!r}.'
      )
  if not config.rl.kl_targets or any(
      not target > 0 for target in config.rl.kl_targets
  ):
    raise ValueError(
        'config.rl.kl_targets must list one or more positive KL values in '
        f'nats, got {tuple(config.rl.kl_targets)!r}.'
    )
  if config.calibration.num_samples < 2:
    raise ValueError(
        'config.calibration.num_samples (M) must be at least 2, because with '
        'one reference sample the calibrated reward is only 0, 1/2 or 1; got '
        f'{config.calibration.num_samples}.'
    )
  n = config.evaluation.procedure_n
  for field in ('samples_per_prompt', 'ref_samples_per_prompt'):
    if config.evaluation[field] < n:
      raise ValueError(
          f'config.evaluation.{field}={config.evaluation[field]} is below '
          f'config.evaluation.procedure_n={n}; the BoN and WoN estimators '
          'need at least N samples per prompt.'
      )


def run(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
  """Run (or resume) every stage and return the summary fields."""
  validate_config(config)
  workdir = epath.Path(workdir)
  data_dir = config.data.data_dir
  archive_sha256 = corpus.archive_sha256(data_dir)
  _configure_compilation(config, workdir)

  data = stages.run_stage(
      workdir,
      'data',
      {'archive_sha256': archive_sha256},
      {},
      lambda d: corpus.build_splits(data_dir, d),
  )
  train_examples = corpus.read_split(data.directory, 'train')
  validation_examples = corpus.read_split(data.directory, 'validation')
  test_examples = corpus.read_split(data.directory, 'test')

  prompts = stages.run_stage(
      workdir,
      'prompts',
      {'prompts': config.prompts, 'seed': config.seed},
      {'data': data},
      lambda d: _make_prompts(d, config, train_examples, test_examples),
  )
  prompt_sets = json.loads((prompts.directory / 'prompts.json').read_text())

  lm_subsets = tuple(config.data.lm_subsets)
  reference = stages.run_stage(
      workdir,
      'reference_lm',
      _slice(config, 'lm', 'data', 'prompts', 'seed'),
      {'data': data, 'prompts': prompts},
      lambda d: training.train_reference_lm(
          d,
          config,
          [e['text'] for e in train_examples if e['subset'] in lm_subsets],
          [e['text'] for e in validation_examples if e['subset'] in lm_subsets][
              : config.lm.num_eval_texts
          ],
          prompt_sets['eval'][: config.lm.num_samples],
      ),
  )
  reference_params = policy.as_jnp(policy.load_params(reference.directory))
  reward_subsets = tuple(config.data.reward_subsets)
  init_from_reference = config.reward.init_from_reference
  reward = stages.run_stage(
      workdir,
      'reward_model',
      _slice(config, 'lm', 'reward', 'data', 'seed'),
      {'data': data, 'reference_lm': reference}
      if init_from_reference
      else {'data': data},
      lambda d: training.train_reward_model(
          d,
          config,
          [e for e in train_examples if e['subset'] in reward_subsets],
          test_examples,
          reference_params if init_from_reference else None,
      ),
  )
  reward_params = policy.as_jnp(policy.load_params(reward.directory))

  identity = ctrl.table_identity(
      reference_policy=reference.identity,
      reward_model=reward.identity,
      prompts=prompt_sets['train'],
      seed=config.seed,
  )
  table_stage = stages.run_stage(
      workdir,
      'calibration',
      _slice(config, 'calibration', 'prompts', 'seed'),
      {'reference_lm': reference, 'reward_model': reward, 'prompts': prompts},
      lambda d: ctrl.build_calibration_table(
          d,
          config,
          reference_params=reference_params,
          reward_params=reward_params,
          prompts=prompt_sets['train'],
          identity=identity,
      ),
  )
  table = ctrl.load_calibration_table(table_stage.directory, identity)
  reference_samples = stages.run_stage(
      workdir,
      'reference_samples',
      _slice(config, 'evaluation', 'prompts', 'seed'),
      {'reference_lm': reference, 'reward_model': reward, 'prompts': prompts},
      lambda d: ctrl.sample_reference_for_evaluation(
          d,
          config,
          reference_params=reference_params,
          reward_params=reward_params,
          prompts=prompt_sets['eval'],
      ),
  )
  ref_rewards = np.load(reference_samples.directory / 'ref_rewards.npy')

  transform_stage = stages.run_stage(
      workdir,
      'transforms',
      _slice(config, 'rl'),
      {},
      lambda d: _choose_transforms(config),
  )
  chosen_t = transform_stage.record['chosen_t']
  chosen_betas = transform_stage.record['betas']
  logging.info(
      'Chosen by analysis: t %s, beta per KL target %s', chosen_t, chosen_betas
  )
  evaluation_inputs = {
      'reference_lm': reference,
      'reward_model': reward,
      'prompts': prompts,
      'reference_samples': reference_samples,
  }
  evaluation_slice = _slice(config, 'evaluation', 'prompts', 'seed')
  rows = []
  reference_eval = stages.run_stage(
      workdir,
      'eval_reference',
      evaluation_slice,
      evaluation_inputs,
      lambda d: ctrl.evaluate_policy(
          d,
          config,
          params=reference_params,
          reference_params=reference_params,
          reward_params=reward_params,
          prompts=prompt_sets['eval'],
          ref_rewards=ref_rewards,
      ),
  )
  rows.append(_row('reference', None, None, reference_eval))

  run_hashes = []
  total_steps = reference.record['steps'] + reward.record['steps']
  for target_index, kl_target in enumerate(config.rl.kl_targets):
    for method in config.rl.methods:
      name = _run_name(method, kl_target)
      t = chosen_t[method]
      beta = chosen_betas[method][target_index]
      rl_stage = stages.run_stage(
          workdir,
          name,
          {
              'rl': config.rl,
              'prompts': config.prompts,
              'seed': config.seed,
              'method': method,
              'beta': beta,
              't': t,
          },
          {
              'calibration': table_stage,
              'reference_lm': reference,
              'reward_model': reward,
              'prompts': prompts,
          },
          lambda d, method=method, beta=beta, t=t: ctrl.train_policy(
              d,
              config,
              method=method,
              beta=beta,
              t=t,
              reference_params=reference_params,
              reward_params=reward_params,
              prompts=prompt_sets['train'],
              table=table,
              reward_scale=_reward_scale(config, table_stage),
          ),
      )
      run_hashes.append(rl_stage.record['params_sha256'])
      total_steps += rl_stage.record['steps']
      eval_stage = stages.run_stage(
          workdir,
          f'eval_{name}',
          evaluation_slice,
          {**evaluation_inputs, 'policy': rl_stage},
          lambda d, rl_stage=rl_stage: ctrl.evaluate_policy(
              d,
              config,
              params=policy.as_jnp(policy.load_params(rl_stage.directory)),
              reference_params=reference_params,
              reward_params=reward_params,
              prompts=prompt_sets['eval'],
              ref_rewards=ref_rewards,
          ),
      )
      rows.append(_row(method, beta, t, eval_stage, kl_target=kl_target))

  sections = {
      'reference_lm': {
          key: reference.record[key]
          for key in ('validation_bits_per_byte', 'steps', 'samples')
      },
      'reward_model': {
          key: reward.record[key]
          for key in (
              'texts',
              'pairs',
              'min_rating_gap',
              'reward_model_accuracy',
              'vader_accuracy',
              'steps',
          )
      },
      'calibration_table': {
          key: table_stage.record[key]
          for key in (
              'num_prompts',
              'num_samples',
              'reward_mean',
              'reward_std',
              'tied_fraction',
          )
      },
      'transform_parameters': {
          'chosen_t': chosen_t,
          'kl_budget': config.rl.kl_budget,
          'procedure_n': config.rl.procedure_n,
      },
  }
  report_stage = stages.run_stage(
      workdir,
      'report',
      {'methods': config.rl.methods, 'n': config.evaluation.procedure_n},
      _eval_inputs(workdir, config),
      lambda d: report_lib.write_report(
          d,
          rows=rows,
          predictions=_predictions(config, chosen_t),
          procedure_n=config.evaluation.procedure_n,
          methods=config.rl.methods,
          sections=sections,
      )['comparisons'],
  )
  report_path = report_stage.directory / 'report.md'
  logging.info('Report: %s', report_path)
  combined = hashlib.sha256(''.join(run_hashes).encode()).hexdigest()
  return {
      'final_step': total_steps,
      'final_params_sha256': combined,
      'report': str(report_path),
      'stage_seconds': _stage_seconds(workdir),
  }


def _configure_compilation(config, workdir: epath.Path) -> None:
  if config.disable_most_optimizations:
    jax.config.update('jax_disable_most_optimizations', True)
  if config.compilation_cache and not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', str(workdir / 'jax_cache'))
    # Tiny programs too: the pipeline compiles many of them.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def _slice(config: ml_collections.ConfigDict, *names: str) -> dict[str, Any]:
  return {name: config[name] for name in names}


def _row(
    method, beta, t, stage: stages.StageResult, kl_target=None
) -> dict[str, Any]:
  row = {'method': method, 'kl_target': kl_target, 'beta': beta, 't': t}
  for key, value in stage.record.items():
    if key not in ('examples', 'seconds', 'cpu_seconds'):
      row[key] = value
  return row


def _eval_inputs(workdir, config) -> dict[str, stages.StageResult]:
  """Completed evaluation stages, as inputs of the report stage."""
  names = ['eval_reference'] + [
      f'eval_{_run_name(method, kl_target)}'
      for kl_target in config.rl.kl_targets
      for method in config.rl.methods
  ]
  inputs = {}
  for name in names:
    done = json.loads((workdir / name / stages.DONE_FILE).read_text())
    inputs[name] = stages.StageResult(
        name=name,
        directory=workdir / name,
        identity=done['identity'],
        record=done['record'],
    )
  return inputs


def _reward_scale(config, table_stage: stages.StageResult) -> float:
  """Divisor of the baseline's raw reward.

  It brings the raw reward's spread on reference samples to that of a
  calibrated reward, Uniform[0, 1], whose standard deviation is 1/sqrt(12).
  """
  if not config.rl.normalize_baseline_reward:
    return 1.0
  return max(table_stage.record['reward_std'], 1e-6) * math.sqrt(12.0)


def _choose_transforms(config):
  chosen_t = ctrl.choose_transform_parameters(config)
  return {'chosen_t': chosen_t, 'betas': ctrl.choose_betas(config, chosen_t)}


def _make_prompts(directory, config, train_examples, test_examples):
  sets = {}
  for split, examples, count in (
      ('train', train_examples, config.prompts.num_train),
      ('eval', test_examples, config.prompts.num_eval),
  ):
    texts = [e['text'] for e in examples if e['subset'] == 'movie_reviews']
    sets[split] = prompts_lib.make_prompts(
        texts,
        num_words=config.prompts.num_words,
        min_continuation_words=config.prompts.min_continuation_words,
        max_prompt_bytes=config.prompts.max_prompt_bytes,
        count=count,
        seed=config.seed,
        source=f'movie_reviews/{"train" if split == "train" else "test"}',
    )
  (directory / 'prompts.json').write_text(json.dumps(sets, indent=2))
  return {
      'num_train': len(sets['train']),
      'num_eval': len(sets['eval']),
      'train_fingerprint': policy.fingerprint(sets['train']),
      'eval_fingerprint': policy.fingerprint(sets['eval']),
  }


def _predictions(config, chosen_t) -> dict[str, dict[str, list[float]]]:
  """Calibrated-space curves over beta of each calibrated method."""
  n = config.evaluation.procedure_n
  predictions = {}
  for method in config.rl.methods:
    if method == 'baseline':
      continue
    transform = ctrl.method_transform(method, chosen_t[method])
    betas = np.asarray(_PREDICTION_BETAS)
    curve = {
        'beta': betas,
        'kl': analysis.kl(transform, betas, num_points=_GRID),
        'w1': analysis.win_rate(transform, betas, num_points=_GRID),
        'bon': analysis.win_rate(
            transform, betas, procedure='bon', n=n, num_points=_GRID
        ),
        'won': analysis.win_rate(
            transform, betas, procedure='won', n=n, num_points=_GRID
        ),
    }
    curve = {key: np.asarray(value).tolist() for key, value in curve.items()}
    predictions[method] = curve
  return predictions


def _stage_seconds(workdir: epath.Path) -> dict[str, dict[str, float]]:
  seconds = {}
  for done in sorted(workdir.glob(f'*/{stages.DONE_FILE}')):
    record = json.loads(done.read_text())['record']
    seconds[done.parent.name] = {
        'wall': record.get('seconds'),
        'cpu': record.get('cpu_seconds'),
    }
  return seconds
