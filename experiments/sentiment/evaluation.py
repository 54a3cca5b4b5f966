"""Evaluation of one policy against the reference policy on held-out prompts.

Notation: B held-out prompts, S policy samples per prompt, M reference samples
per prompt.

Every number is a mean over prompts of a per-prompt quantity, with the
standard error of that mean (sample standard deviation over prompts divided by
sqrt(B)). Win rates come from the library's unbiased estimators.
"""

from typing import Any

import numpy as np

from infalign_jax import procedures


def mean_and_standard_error(per_prompt: np.ndarray) -> tuple[float, float]:
  """Mean over prompts of a [B] array and the standard error of that mean."""
  per_prompt = np.asarray(per_prompt, np.float64)
  if per_prompt.ndim != 1 or per_prompt.size == 0:
    raise ValueError(
        f'Expected a non-empty [B] array, got shape {per_prompt.shape}.'
    )
  if per_prompt.size == 1:
    return float(per_prompt[0]), float('nan')
  standard_error = per_prompt.std(ddof=1) / np.sqrt(per_prompt.size)
  return float(per_prompt.mean()), float(standard_error)


def summarize(
    *,
    policy_rewards: np.ndarray,
    ref_rewards: np.ndarray,
    seq_log_ratios: np.ndarray,
    judge_scores: np.ndarray,
    procedure_n: int,
) -> dict[str, Any]:
  """Compute KL, win rates and the judge score with standard errors.

  Args:
    policy_rewards: [B, S] reward-model scores of the policy's samples.
    ref_rewards: [B, M] reward-model scores of reference samples.
    seq_log_ratios: [B, S] log pi(y|x) - log pi_ref(y|x) of each policy
      sample, summed over its tokens; its mean estimates KL(pi || pi_ref).
    judge_scores: [B, S] VADER compound score of each policy sample.
    procedure_n: N of the best-of-N and worst-of-N win rates.

  Returns:
    A flat dict: `kl`, `w1`, `bon`, `won`, `judge`, `reward`, each with a
    `_se` twin holding its standard error over prompts.
  """
  batch = policy_rewards.shape[0]
  for name, array in (
      ('ref_rewards', ref_rewards),
      ('seq_log_ratios', seq_log_ratios),
      ('judge_scores', judge_scores),
  ):
    if array.shape[0] != batch:
      raise ValueError(
          f'{name} has {array.shape[0]} prompts but policy_rewards has '
          f'{batch}; evaluate every array on the same prompts.'
      )
  summary = {}
  for name, per_sample in (
      ('kl', seq_log_ratios),
      ('judge', judge_scores),
      ('reward', policy_rewards),
  ):
    mean, standard_error = mean_and_standard_error(
        np.asarray(per_sample, np.float64).mean(axis=1)
    )
    summary[name] = mean
    summary[f'{name}_se'] = standard_error
  for name, procedure, n in (
      ('w1', 'standard', 1),
      ('bon', 'bon', procedure_n),
      ('won', 'won', procedure_n),
  ):
    estimate, standard_error = procedures.win_rate(
        np.asarray(policy_rewards, np.float32),
        np.asarray(ref_rewards, np.float32),
        procedure=procedure,
        n=n,
    )
    summary[name] = float(estimate)
    summary[f'{name}_se'] = float(standard_error)
  return summary
