"""Supervised losses: next-token prediction and reward-model fitting.

Notation: B sequences (or preference pairs), T tokens, V vocabulary.

Each `*_loss` function maps arrays to per-example (or per-token) float32
losses and leaves the reduction to the caller. Each `make_*_loss_fn` factory
wraps one of them, with the model, into a
`loss_fn(params, batch, frozen, key) -> (loss, metrics)` for
`train.make_train_step`. The models have no dropout, so these loss functions
ignore `frozen` and `key`. The scalar loss is a mean over the batch passed to
the loss function. Under `jax.jit` over a mesh that is the global batch.
Under `jax.pmap` each device averages its own shard and the step averages
the devices, which weighs tokens differently when shards contain different
numbers of valid tokens.
"""

import math

import jax
import jax.numpy as jnp

from infalign_jax import models
from infalign_jax import train

__all__ = (
    'bradley_terry_loss',
    'make_bradley_terry_loss_fn',
    'make_lm_loss_fn',
    'make_rating_regression_loss_fn',
    'next_token_loss',
    'rating_regression_loss',
)


def _check_batch_keys(batch, required: tuple[str, ...], loss_name: str):
  missing = [name for name in required if name not in batch]
  if missing:
    raise ValueError(
        f'{loss_name} batch is missing {missing}; it needs the keys '
        f'{list(required)}.'
    )


def next_token_loss(
    logits: jax.Array, tokens: jax.Array, mask: jax.Array
) -> jax.Array:
  """Per-token negative log-likelihood of each next token.

  .. math::
    \\ell_{b,t} = -\\log \\mathrm{softmax}(\\mathrm{logits}_{b,t})
    [\\mathrm{tokens}_{b,t+1}]

  Args:
    logits: [B, T, V] logits; position t predicts token t + 1.
    tokens: [B, T] int token ids.
    mask: [B, T] bool, True on valid tokens (a right-padded prefix).

  Returns:
    [B, T - 1] float32 losses in nats, 0 where the target token
    `tokens[:, t + 1]` is masked out.
  """
  if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
    raise ValueError(
        f'logits shape {logits.shape} must be [B, T, V] with [B, T] equal to '
        f'tokens shape {tokens.shape}.'
    )
  if mask.shape != tokens.shape:
    raise ValueError(
        f'mask shape {mask.shape} does not match tokens shape {tokens.shape}.'
    )

  logprobs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = tokens[:, 1:, None].astype(jnp.int32)
  target_logprobs = jnp.take_along_axis(logprobs, targets, axis=-1)[..., 0]
  return jnp.where(mask[:, 1:], -target_logprobs, 0.0)


def rating_regression_loss(scores: jax.Array, ratings: jax.Array) -> jax.Array:
  """Per-example squared error of reward scores against mean ratings.

  Args:
    scores: [B] reward-model scores.
    ratings: [B] target ratings (for example the mean human rating).

  Returns:
    [B] float32 values (scores - ratings)^2.
  """
  if scores.shape != ratings.shape or scores.ndim != 1:
    raise ValueError(
        f'scores and ratings must both have shape [B], got {scores.shape} '
        f'and {ratings.shape}.'
    )
  error = scores.astype(jnp.float32) - ratings.astype(jnp.float32)
  return jnp.square(error)


def bradley_terry_loss(
    chosen_scores: jax.Array, rejected_scores: jax.Array
) -> jax.Array:
  """Per-pair Bradley-Terry negative log-likelihood.

  Under the Bradley-Terry model the chosen response is preferred with
  probability sigmoid(chosen - rejected), so the loss is

  .. math::
    \\ell_b = -\\log \\sigma(c_b - r_b) = \\mathrm{softplus}(r_b - c_b),

  computed with softplus, which stays finite for any score gap.

  Args:
    chosen_scores: [B] scores of the preferred responses.
    rejected_scores: [B] scores of the other responses.

  Returns:
    [B] float32 losses in nats; log 2 for equal scores.
  """
  if chosen_scores.shape != rejected_scores.shape or chosen_scores.ndim != 1:
    raise ValueError(
        'chosen_scores and rejected_scores must both have shape [B], got '
        f'{chosen_scores.shape} and {rejected_scores.shape}.'
    )
  margin = chosen_scores.astype(jnp.float32) - rejected_scores.astype(
      jnp.float32
  )
  return jax.nn.softplus(-margin)


def make_lm_loss_fn(config: models.TransformerConfig) -> train.LossFn:
  """Make the next-token loss of the language model for the train step.

  The batch is a dict with 'tokens' [B, T] int right-padded sequences and
  'mask' [B, T] bool (True on valid tokens). The loss is the mean
  `next_token_loss` over valid target tokens.

  Args:
    config: shape of the language model.

  Returns:
    `loss_fn(params, batch, frozen, key) -> (loss, metrics)` with metrics
    'nll' (nats per token, equal to the loss), 'bits_per_token' (nll / ln 2),
    'token_accuracy' (fraction of valid targets where the argmax logit is
    the target) and 'num_tokens' (valid target tokens).
  """

  def loss_fn(params, batch, frozen, key):
    del frozen, key  # No frozen parameters, no dropout.
    _check_batch_keys(batch, ('tokens', 'mask'), 'LM loss')
    tokens, mask = batch['tokens'], batch['mask']
    logits = models.lm_logits(params, tokens, config)
    losses = next_token_loss(logits, tokens, mask)

    targets_valid = mask[:, 1:]
    num_tokens = jnp.sum(targets_valid, dtype=jnp.float32)
    denominator = jnp.maximum(num_tokens, 1.0)
    nll = jnp.sum(losses) / denominator
    correct = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
    accuracy = jnp.sum(correct & targets_valid) / denominator
    metrics = {
        'nll': nll,
        'bits_per_token': nll / math.log(2),
        'token_accuracy': accuracy,
        'num_tokens': num_tokens,
    }
    return nll, metrics

  return loss_fn


def make_rating_regression_loss_fn(
    config: models.TransformerConfig,
) -> train.LossFn:
  """Make the reward model's regression-to-ratings loss for the train step.

  The batch is a dict with 'tokens' [B, T] int right-padded sequences,
  'mask' [B, T] bool and 'ratings' [B] float targets. The loss is the mean
  `rating_regression_loss`.

  Args:
    config: shape of the reward-model trunk.

  Returns:
    `loss_fn(params, batch, frozen, key) -> (loss, metrics)` with metrics
    'mse' (equal to the loss) and 'mean_abs_error'.
  """

  def loss_fn(params, batch, frozen, key):
    del frozen, key  # No frozen parameters, no dropout.
    _check_batch_keys(
        batch, ('tokens', 'mask', 'ratings'), 'rating regression loss'
    )
    scores = models.reward_scores(
        params, batch['tokens'], batch['mask'], config
    )
    losses = rating_regression_loss(scores, batch['ratings'])
    mse = jnp.mean(losses)
    metrics = {'mse': mse, 'mean_abs_error': jnp.mean(jnp.sqrt(losses))}
    return mse, metrics

  return loss_fn


def make_bradley_terry_loss_fn(
    config: models.TransformerConfig,
) -> train.LossFn:
  """Make the reward model's Bradley-Terry loss on preference pairs.

  The batch is a dict with 'chosen_tokens' and 'rejected_tokens' [B, T] int
  right-padded sequences and 'chosen_mask' and 'rejected_mask' [B, T] bool.
  Pair b prefers its chosen sequence. Both sides go through the model as one
  [2B, T] batch. The loss is the mean `bradley_terry_loss`.

  Args:
    config: shape of the reward-model trunk.

  Returns:
    `loss_fn(params, batch, frozen, key) -> (loss, metrics)` with metrics
    'bt_loss' (equal to the loss), 'preference_accuracy' (fraction of pairs
    with chosen score above rejected, ties counting one half) and
    'mean_margin' (mean chosen minus rejected score).
  """
  required = (
      'chosen_tokens',
      'chosen_mask',
      'rejected_tokens',
      'rejected_mask',
  )

  def loss_fn(params, batch, frozen, key):
    del frozen, key  # No frozen parameters, no dropout.
    _check_batch_keys(batch, required, 'Bradley-Terry loss')
    chosen_tokens = batch['chosen_tokens']
    if batch['rejected_tokens'].shape != chosen_tokens.shape:
      raise ValueError(
          'chosen_tokens and rejected_tokens must have the same shape, got '
          f'{chosen_tokens.shape} and {batch["rejected_tokens"].shape}; pad '
          'both to the same length.'
      )
    tokens = jnp.concatenate([chosen_tokens, batch['rejected_tokens']])
    mask = jnp.concatenate([batch['chosen_mask'], batch['rejected_mask']])
    scores = models.reward_scores(params, tokens, mask, config)
    chosen_scores, rejected_scores = jnp.split(scores, 2)

    loss = jnp.mean(bradley_terry_loss(chosen_scores, rejected_scores))
    margin = chosen_scores - rejected_scores
    wins = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))
    metrics = {
        'bt_loss': loss,
        'preference_accuracy': jnp.mean(wins),
        'mean_margin': jnp.mean(margin),
    }
    return loss, metrics

  return loss_fn
