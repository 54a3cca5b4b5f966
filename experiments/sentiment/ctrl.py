"""The CTRL stages: calibration table, RL runs and their evaluation.

Notation: B prompts, S policy samples per prompt, M reference samples per
prompt, L continuation tokens.
"""

from collections.abc import Mapping, Sequence
import json
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments.sentiment import evaluation
from experiments.sentiment import policy
from experiments.sentiment import training
from infalign_jax import analysis
from infalign_jax import calibration
from infalign_jax import rl
from infalign_jax import sampling
from infalign_jax import transforms
from infalign_jax.data import judge

TABLE_FOLDER = 'table'
# Key tags folded into the config seed, one per stage, so stages draw
# independent random numbers.
_CALIBRATION_TAG = 10
_REFERENCE_EVAL_TAG = 11
_RL_TAG = 12
_EVAL_TAG = 13


def table_identity(
    *,
    reference_policy: str,
    reward_model: str,
    prompts: Sequence[str],
    seed: int,
) -> dict[str, Any]:
  """Identity record of a calibration table (M is added by the table)."""
  return {
      'reference_policy': reference_policy,
      'reward_model': reward_model,
      'prompts': calibration.prompts_fingerprint(prompts),
      'seed': seed,
  }


def _reward_extra(reward_params, config):
  shape = policy.reward_config(config)

  def extra(prompt_tokens, prompt_lengths, sample):
    return {
        'rewards': policy.reward_of_completions_jit(
            reward_params,
            prompt_tokens,
            prompt_lengths,
            sample.tokens,
            sample.mask,
            shape=shape,
        )
    }

  return extra


def build_calibration_table(
    directory: epath.Path,
    config: ml_collections.ConfigDict,
    *,
    reference_params: Any,
    reward_params: Any,
    prompts: Sequence[str],
    identity: Mapping[str, Any],
) -> dict[str, Any]:
  """Sample M continuations per train prompt, score, sort and save."""
  outputs = policy.sample_batches(
      stage='calibration',
      key=jax.random.fold_in(jax.random.key(config.seed), _CALIBRATION_TAG),
      params=reference_params,
      config=config,
      prompts=prompts,
      num_samples=config.calibration.num_samples,
      batch_prompts=config.calibration.batch_prompts,
      extra_fn=_reward_extra(reward_params, config),
  )
  rewards = outputs['rewards']
  table = calibration.CalibrationTable.build(
      rewards, np.arange(len(prompts)), identity
  )
  table.save(directory / TABLE_FOLDER, overwrite=True)
  return {
      'fingerprint': table.fingerprint,
      'num_prompts': len(prompts),
      'num_samples': table.num_reference,
      'reward_mean': float(rewards.mean()),
      'reward_std': float(rewards.std()),
      'tied_fraction': float(
          np.mean(np.diff(table.sorted_rewards, axis=1) == 0)
      ),
  }


def load_calibration_table(
    directory: epath.Path, identity: Mapping[str, Any]
) -> calibration.CalibrationTable:
  """Load the table and check it was made for this setup.

  Raises:
    ValueError: the table was made for another reference policy, reward
      model or prompt set (naming the differing fields).
  """
  return calibration.CalibrationTable.load(
      directory / TABLE_FOLDER, expected_identity=identity
  )


def sample_reference_for_evaluation(
    directory: epath.Path,
    config: ml_collections.ConfigDict,
    *,
    reference_params: Any,
    reward_params: Any,
    prompts: Sequence[str],
) -> dict[str, Any]:
  """Score M reference continuations per held-out prompt."""
  outputs = policy.sample_batches(
      stage='reference samples',
      key=jax.random.fold_in(jax.random.key(config.seed), _REFERENCE_EVAL_TAG),
      params=reference_params,
      config=config,
      prompts=prompts,
      num_samples=config.evaluation.ref_samples_per_prompt,
      batch_prompts=config.evaluation.batch_prompts,
      extra_fn=_reward_extra(reward_params, config),
  )
  np.save(directory / 'ref_rewards.npy', outputs['rewards'])
  return {'reward_mean': float(outputs['rewards'].mean())}


def choose_transform_parameters(
    config: ml_collections.ConfigDict,
) -> dict[str, float | None]:
  """t of each method: choose_t at the KL budget for exp and neg_exp."""
  n = config.rl.procedure_n
  chosen = {}
  for method in config.rl.methods:
    if method == 'exp':
      chosen[method] = float(analysis.choose_t('bon', n, config.rl.kl_budget))
    elif method == 'neg_exp':
      chosen[method] = float(analysis.choose_t('won', n, config.rl.kl_budget))
    elif method in ('baseline', 'identity'):
      chosen[method] = None
    else:
      raise ValueError(
          f'Unknown method {method!r} in config.rl.methods; use baseline, '
          'identity, exp or neg_exp.'
      )
  return chosen


def method_transform_params(method: str, t: float | None) -> dict[str, Any]:
  """Parameters of a method's transform for `make_transform` and RLConfig.

  exp is normalized to [0, 1], (e^{t u} - 1) / (e^t - 1): the same policies
  at beta / (e^t - 1), so its beta and rewards share the scale of the other
  methods and one learning rate suits every run.
  """
  if t is None:
    return {}
  if method == 'exp':
    return {'t': t, 'normalize': True}
  return {'t': t}


def method_transform(method: str, t: float | None) -> transforms.Transform:
  """Make the transform Phi of a method (the identity for the baseline)."""
  if method in ('baseline', 'identity'):
    return transforms.make_transform('identity')
  return transforms.make_transform(method, **method_transform_params(method, t))


def choose_betas(
    config: ml_collections.ConfigDict, chosen_t: Mapping[str, float | None]
) -> dict[str, list[float]]:
  """KL weight of each method at each of `config.rl.kl_targets`.

  Beta is where the calibrated-space analysis puts the method's KL at the
  target, so the sweep spans the same KL range for every transform whatever
  its scale (exp(t u) with t = 12 reaches e^12). The baseline uses the
  identity's beta, because its raw reward is scaled to the spread of a
  calibrated reward (`reward_scale`).
  """
  betas = {}
  for method in config.rl.methods:
    transform = method_transform(method, chosen_t[method])
    betas[method] = [
        float(analysis.beta_for_kl(transform, target))
        for target in config.rl.kl_targets
    ]
  return betas


def make_policy_trainer(
    config: ml_collections.ConfigDict,
    *,
    method: str,
    beta: float,
    t: float | None,
    prompts: Sequence[str],
    table: calibration.CalibrationTable,
    reward_scale: float,
) -> training.Trainer:
  """Build the RL step, optimizer and batches of one (method, beta) run.

  The step's `frozen` argument is {'reference': reference LM parameters,
  'reward_model': reward-model parameters}.
  """
  shape = policy.lm_config(config)
  prompt_tokens, prompt_lengths = policy.encode_prompts(prompts, config)
  if config.rl.batch_prompts > len(prompts):
    raise ValueError(
        f'config.rl.batch_prompts={config.rl.batch_prompts} exceeds the '
        f'{len(prompts)} train prompts; lower it or raise '
        'config.prompts.num_train.'
    )
  calibrate = method != 'baseline'
  rl_config = rl.RLConfig(
      beta=beta,
      transform='identity' if method == 'baseline' else method,
      transform_params=method_transform_params(method, t),
      calibrate=calibrate,
      algorithm=config.rl.loss,
      num_samples=config.rl.samples_per_prompt,
  )
  reward_shape = policy.reward_config(config)
  # The baseline's raw reward is divided by this scale; calibrated rewards
  # are already in [0, 1].
  scale = 1.0 if calibrate else reward_scale

  def batch_fn(position):
    rows = (position + np.arange(config.rl.batch_prompts)) % len(prompts)
    batch = {
        'example_ids': rows.astype(np.int32),
        'prompt_tokens': prompt_tokens[rows],
        'prompt_lengths': prompt_lengths[rows],
    }
    if calibrate:
      batch['sorted_ref_rewards'] = table.rows(rows)
    return batch

  def sample_fn(params, batch, keys):
    sample = policy.sample_per_prompt(
        keys,
        params,
        shape,
        batch['prompt_tokens'],
        batch['prompt_lengths'],
        num_samples=config.rl.samples_per_prompt,
        max_new_tokens=config.prompts.continuation_length,
    )
    return {'tokens': sample.tokens, 'mask': sample.mask}

  def completion_logprobs(params, batch, samples):
    return sampling.completion_logprobs(
        params,
        shape,
        batch['prompt_tokens'],
        batch['prompt_lengths'],
        samples['tokens'],
        samples['mask'],
    )

  def reward_fn(frozen, batch, samples):
    rewards = policy.reward_of_completions(
        frozen['reward_model'],
        batch['prompt_tokens'],
        batch['prompt_lengths'],
        samples['tokens'],
        samples['mask'],
        shape=reward_shape,
    )
    return rewards / scale

  optimizer = optax.adam(config.rl.learning_rate)
  train_step = rl.make_rl_train_step(
      rl_config,
      optimizer,
      sample_fn=sample_fn,
      logprob_fn=completion_logprobs,
      ref_logprob_fn=lambda frozen, batch, samples: completion_logprobs(
          frozen['reference'], batch, samples
      ),
      reward_fn=reward_fn,
  )
  return training.Trainer(
      train_step=train_step,
      optimizer=optimizer,
      batch_fn=batch_fn,
      batch_size=config.rl.batch_prompts,
  )


def train_policy(
    directory: epath.Path,
    config: ml_collections.ConfigDict,
    *,
    method: str,
    beta: float,
    t: float | None,
    reference_params: Any,
    reward_params: Any,
    prompts: Sequence[str],
    table: calibration.CalibrationTable,
    reward_scale: float,
) -> dict[str, Any]:
  """Run KL-regularized RL from the reference policy for one (method, beta)."""
  trainer = make_policy_trainer(
      config,
      method=method,
      beta=beta,
      t=t,
      prompts=prompts,
      table=table,
      reward_scale=reward_scale,
  )
  key = jax.random.fold_in(jax.random.key(config.seed), _RL_TAG)
  logging.info(
      'Stage %s: %d RL steps (method %s, beta %g, t %s).',
      directory.name,
      config.rl.steps,
      method,
      beta,
      t,
  )
  run_config = {'method': method, 'beta': beta, 't': t, **config.rl.to_dict()}
  state = training.run_trainer(
      directory,
      trainer,
      # A copy, because the train step donates the state's buffers.
      init_params_fn=lambda key: jax.tree.map(jnp.copy, reference_params),
      key=key,
      num_steps=config.rl.steps,
      config_json=json.dumps(run_config, sort_keys=True, default=str),
      checkpoint_every=config.rl.checkpoint_every,
      frozen={'reference': reference_params, 'reward_model': reward_params},
      table_identity=table.identity if method != 'baseline' else None,
  )
  params_sha256 = policy.save_params(directory, state.params)
  return {'steps': int(state.step), 'params_sha256': params_sha256}


def evaluate_policy(
    directory: epath.Path,
    config: ml_collections.ConfigDict,
    *,
    params: Any,
    reference_params: Any,
    reward_params: Any,
    prompts: Sequence[str],
    ref_rewards: np.ndarray,
) -> dict[str, Any]:
  """Evaluate a policy on held-out prompts against the reference samples."""
  shape = policy.lm_config(config)
  reward_extra = _reward_extra(reward_params, config)

  def extra(prompt_tokens, prompt_lengths, sample):
    ref_logprobs = policy.completion_logprobs_jit(
        reference_params,
        shape,
        prompt_tokens,
        prompt_lengths,
        sample.tokens,
        sample.mask,
    )
    return {
        'ref_logprobs': ref_logprobs,
        **reward_extra(prompt_tokens, prompt_lengths, sample),
    }

  outputs = policy.sample_batches(
      stage=f'evaluate {directory.name}',
      key=jax.random.fold_in(jax.random.key(config.seed), _EVAL_TAG),
      params=params,
      config=config,
      prompts=prompts,
      num_samples=config.evaluation.samples_per_prompt,
      batch_prompts=config.evaluation.batch_prompts,
      extra_fn=extra,
  )
  mask = outputs['mask'].astype(bool)
  seq_log_ratios = np.where(
      mask, outputs['logprobs'] - outputs['ref_logprobs'], 0.0
  ).sum(axis=-1)
  continuations = policy.decode_continuations(outputs['tokens'], mask)
  judged = judge.vader_compound(
      [
          prompt + text
          for prompt, texts in zip(prompts, continuations, strict=True)
          for text in texts
      ]
  ).reshape(seq_log_ratios.shape)
  summary = evaluation.summarize(
      policy_rewards=outputs['rewards'],
      ref_rewards=ref_rewards,
      seq_log_ratios=seq_log_ratios,
      judge_scores=judged,
      procedure_n=config.evaluation.procedure_n,
  )
  examples = [
      prompts[i] + continuations[i][0] for i in range(min(4, len(prompts)))
  ]
  return {**summary, 'examples': examples}
