"""The bandit check: CTRL on a categorical policy whose optimum is known.

Each of P prompts has K fixed responses with known rewards. The policy is a
categorical distribution over them (one table of logits [P, K], T = 1 token
per response), trained with the real RL step (`rl.make_rl_train_step`), the
real calibration (`batch['sorted_ref_rewards']`) and the real transforms,
through the shared training loop.

Why the comparison is exact. The reference policy puts mass c_k / M on
response k, with integer counts c_k >= 1 that sum to M. The calibration table
row of a prompt is each response's reward repeated c_k times, so the
empirical calibrated reward of the table equals the exact calibrated reward
under pi_ref, C_k = (sum_{j: r_j < r_k} c_j + c_k / 2) / M, with no sampling
error. The objective E_pi[Phi(C)] - beta * KL(pi || pi_ref) then has its
maximum at pi* ∝ pi_ref exp(Phi(C) / beta). With K in the hundreds, every
atom of pi_ref has mass O(1 / K), so C under pi_ref is close to
Uniform[0, 1]. The discrete optimum is then close to the calibrated-space
prediction, in which q(u) ∝ exp(Phi(u) / beta) on [0, 1]. KL and win rates of the trained
policy are computed exactly from the categorical distributions (rewards are
distinct, ties count one half), never from samples.

The report lists three numbers per metric: the calibrated-space prediction,
the exact discrete optimum pi* (which isolates the discretization error) and
the trained policy (which adds the optimization error).
"""

import dataclasses
import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from infalign_jax import analysis
from infalign_jax import loop
from infalign_jax import rl
from infalign_jax import train
from infalign_jax import transforms

REPORT_MARKDOWN = 'bandit_report.md'
REPORT_JSON = 'bandit_report.json'


# ---------------------------------------------------------------------------
# The problem.


@dataclasses.dataclass(frozen=True, kw_only=True)
class BanditProblem:
  """Rewards and reference policy of P prompts with K responses each.

  Attributes:
    rewards: [P, K] float32 rewards, distinct within each prompt.
    ref_counts: [P, K] int64 counts c_k >= 1 summing to M per prompt;
      pi_ref = c / M.
    sorted_ref_rewards: [P, M] float32 calibration table: the rewards of each
      prompt repeated by their counts, sorted ascending.
  """

  rewards: np.ndarray
  ref_counts: np.ndarray
  sorted_ref_rewards: np.ndarray

  @property
  def log_ref(self) -> np.ndarray:
    """[P, K] float32 log pi_ref."""
    total = self.ref_counts.sum(axis=1, keepdims=True)
    return np.log(self.ref_counts / total).astype(np.float32)

  @property
  def calibrated(self) -> np.ndarray:
    """[P, K] float64 exact calibrated rewards under pi_ref."""
    total = self.ref_counts.sum(axis=1, keepdims=True)
    order = np.argsort(self.rewards, axis=1)
    sorted_counts = np.take_along_axis(self.ref_counts, order, axis=1)
    below = np.cumsum(sorted_counts, axis=1) - sorted_counts
    sorted_cal = (below + 0.5 * sorted_counts) / total
    calibrated = np.empty_like(sorted_cal)
    np.put_along_axis(calibrated, order, sorted_cal, axis=1)
    return calibrated


def make_problem(
    *,
    num_prompts: int,
    num_responses: int,
    table_size: int,
    concentration: float,
    seed: int,
) -> BanditProblem:
  """Draw rewards and a reference policy for each prompt.

  Rewards are standard normal (redrawn until distinct in float32). The
  reference masses are 1 + Multinomial(M - K, Dirichlet(concentration)) over
  M, so every response has mass >= 1 / M and smaller `concentration` gives a
  more uneven pi_ref.
  """
  if num_responses < 2:
    raise ValueError(f'num_responses must be >= 2, got {num_responses}.')
  if table_size < num_responses:
    raise ValueError(
        f'table_size (M = {table_size}) must be >= num_responses (K = '
        f'{num_responses}), because each response needs a count >= 1.'
    )
  if not concentration > 0:
    raise ValueError(f'concentration must be > 0, got {concentration}.')
  rng = np.random.default_rng(seed)
  rewards = np.empty((num_prompts, num_responses), np.float32)
  counts = np.empty((num_prompts, num_responses), np.int64)
  for p in range(num_prompts):
    row = rng.standard_normal(num_responses).astype(np.float32)
    while len(np.unique(row)) < num_responses:
      row = rng.standard_normal(num_responses).astype(np.float32)
    rewards[p] = row
    weights = rng.dirichlet(np.full(num_responses, concentration))
    counts[p] = 1 + rng.multinomial(table_size - num_responses, weights)
  table = np.stack(
      [np.sort(np.repeat(rewards[p], counts[p])) for p in range(num_prompts)]
  )
  return BanditProblem(
      rewards=rewards, ref_counts=counts, sorted_ref_rewards=table
  )


# ---------------------------------------------------------------------------
# The categorical policy, as the four functions of the RL step.


def make_sample_fn(num_samples: int):
  """Return a `sample_fn` drawing `num_samples` responses per prompt."""

  def sample_fn(params, batch, keys):
    logits = params['logits'][batch['prompt_index']]

    def sample_prompt(key, row):
      return jax.random.categorical(key, row, shape=(num_samples,))

    responses = jax.vmap(sample_prompt)(keys, logits)
    mask = jnp.ones((*responses.shape, 1), jnp.float32)
    return {'response': responses, 'mask': mask}

  return sample_fn


def _gather_logprobs(logits, responses):
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logprobs, responses, axis=1)[..., None]


def logprob_fn(params, batch, samples):
  """Return log pi of the sampled responses, [B, S, 1]."""
  logits = params['logits'][batch['prompt_index']]
  return _gather_logprobs(logits, samples['response'])


def ref_logprob_fn(frozen, batch, samples):
  """Return log pi_ref of the sampled responses, [B, S, 1]."""
  return _gather_logprobs(
      frozen['log_ref'][batch['prompt_index']], samples['response']
  )


def reward_fn(frozen, batch, samples):
  """Return the known rewards of the sampled responses, [B, S]."""
  rewards = frozen['rewards'][batch['prompt_index']]
  return jnp.take_along_axis(rewards, samples['response'], axis=1)


def make_batch(problem: BanditProblem) -> dict[str, np.ndarray]:
  """Return the batch of every step: all prompts with their table rows."""
  num_prompts = problem.rewards.shape[0]
  return {
      'example_ids': np.arange(num_prompts, dtype=np.int32),
      'prompt_index': np.arange(num_prompts, dtype=np.int32),
      'sorted_ref_rewards': problem.sorted_ref_rewards,
  }


def make_frozen(problem: BanditProblem) -> dict[str, jax.Array]:
  return {
      'log_ref': jnp.asarray(problem.log_ref),
      'rewards': jnp.asarray(problem.rewards),
  }


# ---------------------------------------------------------------------------
# Exact metrics of categorical policies, and the calibrated-space prediction.


def _best_of_n(probs: np.ndarray, n: int) -> np.ndarray:
  """Distribution of the best of n draws; atoms sorted by reward ascending."""
  cdf = np.clip(np.cumsum(probs, axis=-1), 0.0, 1.0)
  return cdf**n - np.clip(cdf - probs, 0.0, 1.0) ** n


def _worst_of_n(probs: np.ndarray, n: int) -> np.ndarray:
  cdf = np.clip(np.cumsum(probs, axis=-1), 0.0, 1.0)
  return (1.0 - np.clip(cdf - probs, 0.0, 1.0)) ** n - (1.0 - cdf) ** n


def _win_rate(probs: np.ndarray, ref_probs: np.ndarray) -> np.ndarray:
  """P(y1 beats y2) + 1/2 P(tie), atoms sorted ascending, distinct rewards."""
  below = np.cumsum(ref_probs, axis=-1) - ref_probs
  return np.sum(probs * (below + 0.5 * ref_probs), axis=-1)


def exact_metrics(
    log_pi: np.ndarray, log_ref: np.ndarray, rewards: np.ndarray, *, n: int
) -> dict[str, float]:
  """KL and win rates of pi against pi_ref, averaged over prompts.

  Args:
    log_pi: [P, K] log-probabilities of the policy.
    log_ref: [P, K] log-probabilities of the reference policy.
    rewards: [P, K] distinct rewards of each prompt.
    n: N of best-of-N and worst-of-N.

  Returns:
    'kl' = KL(pi || pi_ref); 'win_rate' (standard), 'bon_win_rate',
    'won_win_rate': win rate of the procedure applied to pi over the same
    procedure applied to pi_ref. All exact, in float64.
  """
  log_pi = np.asarray(log_pi, np.float64)
  log_ref = np.asarray(log_ref, np.float64)
  log_pi = log_pi - np.logaddexp.reduce(log_pi, axis=-1, keepdims=True)
  log_ref = log_ref - np.logaddexp.reduce(log_ref, axis=-1, keepdims=True)
  pi, ref = np.exp(log_pi), np.exp(log_ref)
  kl = np.sum(pi * (log_pi - log_ref), axis=-1)
  order = np.argsort(rewards, axis=-1)
  pi = np.take_along_axis(pi, order, axis=-1)
  ref = np.take_along_axis(ref, order, axis=-1)
  return {
      'kl': float(kl.mean()),
      'win_rate': float(_win_rate(pi, ref).mean()),
      'bon_win_rate': float(
          _win_rate(_best_of_n(pi, n), _best_of_n(ref, n)).mean()
      ),
      'won_win_rate': float(
          _win_rate(_worst_of_n(pi, n), _worst_of_n(ref, n)).mean()
      ),
  }


def optimal_log_policy(
    problem: BanditProblem, transform: transforms.Transform, beta: float
) -> np.ndarray:
  """Return log pi* = log pi_ref + Phi(C) / beta - log Z, [P, K] float64."""
  phi = np.asarray(transform(jnp.asarray(problem.calibrated)), np.float64)
  logits = problem.log_ref.astype(np.float64) + phi / beta
  return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def calibrated_space_prediction(
    transform: transforms.Transform, beta: float, *, n: int
) -> dict[str, float]:
  """KL and win rates of q(u) ∝ exp(Phi(u) / beta) on [0, 1].

  Evaluated by `infalign_jax.analysis.predict`, renamed to the keys of
  `exact_metrics`.
  """
  prediction = analysis.predict(transform, beta, n)
  return {
      'kl': float(prediction['kl']),
      'win_rate': float(prediction['win_rate_standard']),
      'bon_win_rate': float(prediction['win_rate_bon']),
      'won_win_rate': float(prediction['win_rate_won']),
  }


# ---------------------------------------------------------------------------
# The experiment.

_METRICS = ('kl', 'win_rate', 'bon_win_rate', 'won_win_rate')


def _rl_config(config: ml_collections.ConfigDict, method) -> rl.RLConfig:
  return rl.RLConfig(
      beta=method.beta,
      transform=method.transform,
      transform_params=dict(method.transform_params),
      calibrate=True,
      algorithm=config.algorithm,
      kl_estimator=config.kl_estimator,
      kl_placement=config.kl_placement,
      num_samples=config.num_samples,
      ppo_epochs=config.ppo_epochs,
      clip_epsilon=config.clip_epsilon,
  )


def _train_method(
    config: ml_collections.ConfigDict,
    method,
    problem: BanditProblem,
    workdir: epath.Path,
) -> train.TrainState:
  rl_config = _rl_config(config, method)
  schedule = optax.cosine_decay_schedule(
      config.learning_rate, config.num_steps, alpha=config.final_lr_fraction
  )
  optimizer = optax.adam(schedule, b1=config.adam_b1, b2=config.adam_b2)
  step = rl.make_rl_train_step(
      rl_config,
      optimizer,
      sample_fn=make_sample_fn(config.num_samples),
      logprob_fn=logprob_fn,
      ref_logprob_fn=ref_logprob_fn,
      reward_fn=reward_fn,
  )
  num_devices = jax.device_count()
  if config.num_prompts % num_devices:
    num_devices = 1
  mesh = train.make_mesh(num_devices)
  compiled = train.jit_train_step(step, mesh)
  # Placed on the devices once: a host batch would be copied every step.
  batch = train.shard_batch(make_batch(problem), mesh)
  frozen = train.replicate_on_mesh(make_frozen(problem), mesh)

  def init_state():
    params = {'logits': jnp.asarray(problem.log_ref)}
    key = jax.random.key(config.seed + 1)
    return train.init_train_state(params, optimizer, key)

  def batch_fn(position):
    return batch, position + config.num_prompts

  table_sha = common.params_sha256(problem.sorted_ref_rewards)
  return loop.run_training(
      workdir=workdir,
      train_step=compiled,
      init_state_fn=init_state,
      batch_fn=batch_fn,
      num_steps=config.num_steps,
      config_json=json.dumps(
          {'bandit': config.to_dict(), 'method': method.to_dict()},
          sort_keys=True,
          default=str,
      ),
      frozen=frozen,
      table_identity={'kind': 'bandit_exact_table', 'sha256': table_sha},
      save_every=config.save_every,
      log_every=config.log_every,
  )


def _format_markdown(rows: list[dict[str, Any]], config) -> str:
  lines = [
      '# Bandit check: trained policy against the calibrated-space analysis',
      '',
      f'{config.num_prompts} prompts, K = {config.num_responses} responses, '
      f'M = {config.table_size} table entries, {config.num_steps} steps of '
      f'{config.algorithm} with S = {config.num_samples}, N = {config.n}. '
      f'Tolerance on |trained - predicted|: {config.tolerance}.',
      '',
      '| method | beta | metric | predicted | exact optimum | trained | '
      '\\|trained - predicted\\| | checked | pass |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  for row in rows:
    for metric in _METRICS:
      error = abs(row['trained'][metric] - row['predicted'][metric])
      checked = metric in row['checked_metrics']
      lines.append(
          f"| {row['name']} | {row['beta']:g} | {metric} | "
          f"{row['predicted'][metric]:.4f} | "
          f"{row['optimum'][metric]:.4f} | {row['trained'][metric]:.4f} | "
          f"{error:.4f} | {'yes' if checked else 'no'} | "
          f"{('yes' if error <= config.tolerance else 'NO') if checked else ''}"
          ' |'
      )
  return '\n'.join(lines) + '\n'


def _write_text_atomic(path: epath.Path, text: str) -> None:
  """Write `text` to `path` through a temporary file and a rename."""
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  tmp.write_text(text)
  os.replace(tmp, path)


def run(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
  """Train one policy per method and compare it with the prediction.

  Writes `bandit_report.md` and `bandit_report.json` in `workdir`, and one
  training stage (checkpoints, metrics) per method in `workdir/<name>`.

  Returns:
    `final_step`, `final_params_sha256` (over the logits of every method, in
    config order), `passed` (every checked metric within `config.tolerance`),
    `max_checked_error` and the comparison rows.
  """
  workdir = epath.Path(workdir)
  problem = make_problem(
      num_prompts=config.num_prompts,
      num_responses=config.num_responses,
      table_size=config.table_size,
      concentration=config.ref_concentration,
      seed=config.seed,
  )
  rows = []
  final_params = {}
  final_step = 0
  for method in config.methods:
    transform = transforms.make_transform(
        method.transform, **dict(method.transform_params)
    )
    state = _train_method(config, method, problem, workdir / method.name)
    final_step = int(state.step)
    logits = np.asarray(jax.device_get(state.params['logits']))
    final_params[method.name] = logits
    row = {
        'name': method.name,
        'transform': repr(transform),
        'beta': method.beta,
        'checked_metrics': list(method.checked_metrics),
        'predicted': calibrated_space_prediction(
            transform, method.beta, n=config.n
        ),
        'optimum': exact_metrics(
            optimal_log_policy(problem, transform, method.beta),
            problem.log_ref,
            problem.rewards,
            n=config.n,
        ),
        'trained': exact_metrics(
            jax.nn.log_softmax(logits, axis=-1),
            problem.log_ref,
            problem.rewards,
            n=config.n,
        ),
    }
    row['errors'] = {
        metric: abs(row['trained'][metric] - row['predicted'][metric])
        for metric in _METRICS
    }
    logging.info('Bandit method %s: %s', method.name, row)
    rows.append(row)

  max_error = max(
      row['errors'][metric] for row in rows for metric in row['checked_metrics']
  )
  passed = bool(max_error <= config.tolerance)
  report = {
      'passed': passed,
      'max_checked_error': max_error,
      'tolerance': config.tolerance,
      'rows': rows,
  }
  common.write_json_atomic(workdir / REPORT_JSON, report)
  _write_text_atomic(workdir / REPORT_MARKDOWN, _format_markdown(rows, config))
  if not passed:
    logging.warning(
        'Bandit check failed: max error %.4f > tolerance %.4f; see %s.',
        max_error,
        config.tolerance,
        workdir / REPORT_MARKDOWN,
    )
  return {
      'final_step': final_step,
      'final_params_sha256': common.params_sha256(final_params),
      'passed': passed,
      'max_checked_error': max_error,
      'rows': rows,
  }
