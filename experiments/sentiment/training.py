"""The supervised stages: the reference LM and the reward model.

Notation: B texts per batch, T tokens.

Both trainers read their batches by position: batch k contains the examples at
positions k * B .. k * B + B - 1 of a fixed seeded permutation, repeated as
needed. The train state stores the position, so a run resumed from a
checkpoint reads exactly the batches it would have read.
"""

from collections.abc import Callable, Mapping, Sequence
import json
import math
from typing import Any, NamedTuple

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments.sentiment import policy
from infalign_jax import loop
from infalign_jax import losses
from infalign_jax import models
from infalign_jax import supervised
from infalign_jax import train
from infalign_jax.data import judge


def batch_indices(
    num_examples: int, batch_size: int, position: int, seed: int
) -> np.ndarray:
  """Indices of the batch starting at `position` of the seeded order."""
  epoch_order = {}
  indices = []
  for offset in range(batch_size):
    epoch, index = divmod(position + offset, num_examples)
    if epoch not in epoch_order:
      epoch_order[epoch] = np.random.default_rng([seed, epoch]).permutation(
          num_examples
      )
    indices.append(epoch_order[epoch][index])
  return np.asarray(indices)


def encode_texts(
    texts: Sequence[str], config: ml_collections.ConfigDict
) -> tuple[np.ndarray, np.ndarray]:
  """Encode texts as BOS, bytes, EOS, cut to max_text_bytes + 2 tokens."""
  tokens, lengths = policy.TOKENIZER.encode_batch(
      list(texts), max_length=config.data.max_text_bytes + 2
  )
  return tokens, lengths


def _mask(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  return np.arange(tokens.shape[1])[None, :] < lengths[:, None]


class Trainer(NamedTuple):
  """Step, optimizer and batches of one training stage.

  Attributes:
    train_step: pure `train_step(state, batch, frozen) -> (state, metrics)`.
    optimizer: the optax transformation the step applies.
    batch_fn: `batch_fn(position)` returns the batch that starts at data
      position `position`.
    batch_size: examples per batch; each step advances the position by it.
  """

  train_step: Callable[..., Any]
  optimizer: optax.GradientTransformation
  batch_fn: Callable[[int], Any]
  batch_size: int


def run_trainer(
    directory: epath.Path,
    trainer: Trainer,
    *,
    init_params_fn: Callable[[jax.Array], Any],
    key: jax.Array,
    num_steps: int,
    config_json: str,
    checkpoint_every: int,
    frozen: Any = None,
    table_identity: Mapping[str, Any] | None = None,
) -> train.TrainState:
  """Train to `num_steps` with `loop.run_training`, resuming a checkpoint."""
  init_key, run_key = jax.random.split(key)

  def init_state_fn():
    return train.init_train_state(
        init_params_fn(init_key), trainer.optimizer, run_key
    )

  return loop.run_training(
      workdir=directory,
      train_step=jax.jit(trainer.train_step, donate_argnums=0),
      init_state_fn=init_state_fn,
      batch_fn=lambda position: (
          trainer.batch_fn(position),
          position + trainer.batch_size,
      ),
      num_steps=num_steps,
      config_json=config_json,
      frozen=frozen,
      table_identity=table_identity,
      save_every=checkpoint_every,
      log_every=max(num_steps // 20, 1),
  )


def _adamw(peak: float, warmup_steps: int, total_steps: int):
  return optax.adamw(
      policy.learning_rate_schedule(peak, warmup_steps, total_steps),
      weight_decay=0.01,
  )


def make_lm_trainer(
    config: ml_collections.ConfigDict, train_texts: Sequence[str]
) -> Trainer:
  """Build the reference LM's next-token step, optimizer and batches."""
  shape = policy.lm_config(config)
  tokens, lengths = encode_texts(train_texts, config)
  mask = _mask(tokens, lengths)

  def batch_fn(position):
    rows = batch_indices(
        len(tokens), config.lm.batch_size, position, config.seed
    )
    return {'tokens': tokens[rows], 'mask': mask[rows]}

  optimizer = _adamw(
      config.lm.learning_rate, config.lm.warmup_steps, config.lm.steps
  )
  return Trainer(
      train_step=train.make_train_step(
          supervised.make_lm_loss_fn(shape), optimizer
      ),
      optimizer=optimizer,
      batch_fn=batch_fn,
      batch_size=config.lm.batch_size,
  )


def train_reference_lm(
    directory: epath.Path,
    config: ml_collections.ConfigDict,
    train_texts: Sequence[str],
    validation_texts: Sequence[str],
    sample_prompts: Sequence[str],
) -> dict[str, Any]:
  """Train the reference LM; report bits per byte and samples."""
  shape = policy.lm_config(config)
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  logging.info('Stage reference_lm: %d steps.', config.lm.steps)
  state = run_trainer(
      directory,
      make_lm_trainer(config, train_texts),
      init_params_fn=lambda key: models.init_lm(key, shape),
      key=key,
      num_steps=config.lm.steps,
      config_json=json.dumps(config.to_dict(), sort_keys=True, default=str),
      checkpoint_every=config.lm.checkpoint_every,
  )
  params = state.params
  bits = validation_bits_per_byte(params, shape, validation_texts, config)
  logging.info('Reference LM: validation %.3f bits per byte.', bits)

  samples = policy.sample_batches(
      stage='reference_lm samples',
      key=jax.random.fold_in(key, 2),
      params=params,
      config=config,
      prompts=sample_prompts,
      num_samples=1,
      batch_prompts=len(sample_prompts),
      extra_fn=lambda *args: {},
  )
  texts = [
      prompt + continuations[0]
      for prompt, continuations in zip(
          sample_prompts,
          policy.decode_continuations(samples['tokens'], samples['mask']),
          strict=True,
      )
  ]
  for text in texts:
    logging.info('Reference LM sample: %r', text)
  (directory / 'samples.txt').write_text('\n'.join(texts) + '\n')
  params_sha256 = policy.save_params(directory, params)
  return {
      'validation_bits_per_byte': bits,
      'validation_texts': len(validation_texts),
      'steps': int(state.step),
      'samples': texts,
      'params_sha256': params_sha256,
  }


def validation_bits_per_byte(
    params: Any,
    shape: models.TransformerConfig,
    texts: Sequence[str],
    config: ml_collections.ConfigDict,
    batch_size: int = 64,
) -> float:
  """Negative log-likelihood in bits, summed over texts, per UTF-8 byte.

  The sum covers every predicted token after BOS: the bytes and, when the text
  fits in max_text_bytes, its EOS.
  """
  tokens, lengths = encode_texts(texts, config)

  @jax.jit
  def nll_sum(tokens, lengths):
    logits = models.lm_logits(params, tokens, shape)
    logprobs = losses.token_logprobs(logits[:, :-1], tokens[:, 1:])
    valid = jnp.arange(1, tokens.shape[1])[None, :] < lengths[:, None]
    return -jnp.sum(jnp.where(valid, logprobs, 0.0))

  total = 0.0
  for start in range(0, len(texts), batch_size):
    rows = slice(start, start + batch_size)
    total += float(nll_sum(tokens[rows], lengths[rows]))
  num_bytes = sum(
      len(t.encode('utf-8')[: config.data.max_text_bytes]) for t in texts
  )
  return total / math.log(2) / num_bytes


def make_reward_trainer(
    config: ml_collections.ConfigDict,
    train_examples: Sequence[dict[str, Any]],
) -> Trainer:
  """Build the reward model's step, optimizer and batches."""
  shape = policy.reward_config(config)
  texts = [example['text'] for example in train_examples]
  tokens, lengths = encode_texts(texts, config)
  mask = _mask(tokens, lengths)
  ratings = np.asarray(
      [example['mean_rating'] for example in train_examples], np.float32
  )
  if config.reward.loss == 'regression':
    loss_fn = supervised.make_rating_regression_loss_fn(shape)

    def batch_fn(position):
      rows = batch_indices(
          len(tokens), config.reward.batch_size, position, config.seed
      )
      return {
          'tokens': tokens[rows],
          'mask': mask[rows],
          'ratings': ratings[rows],
      }

  elif config.reward.loss == 'bradley_terry':
    loss_fn = supervised.make_bradley_terry_loss_fn(shape)

    def batch_fn(position):
      # Two independent orders pair the texts; the one rated higher on
      # average is the chosen side.
      first = batch_indices(
          len(tokens), config.reward.batch_size, position, config.seed
      )
      second = batch_indices(
          len(tokens), config.reward.batch_size, position, config.seed + 1
      )
      prefer_first = ratings[first] >= ratings[second]
      chosen = np.where(prefer_first, first, second)
      rejected = np.where(prefer_first, second, first)
      return {
          'chosen_tokens': tokens[chosen],
          'chosen_mask': mask[chosen],
          'rejected_tokens': tokens[rejected],
          'rejected_mask': mask[rejected],
      }

  else:
    raise ValueError(
        "config.reward.loss must be 'regression' or 'bradley_terry', got "
        f'{config.reward.loss!r}.'
    )
  optimizer = _adamw(
      config.reward.learning_rate,
      config.reward.warmup_steps,
      config.reward.steps,
  )
  return Trainer(
      train_step=train.make_train_step(loss_fn, optimizer),
      optimizer=optimizer,
      batch_fn=batch_fn,
      batch_size=config.reward.batch_size,
  )


def train_reward_model(
    directory: epath.Path,
    config: ml_collections.ConfigDict,
    train_examples: Sequence[dict[str, Any]],
    test_examples: Sequence[dict[str, Any]],
    reference_params: Any | None,
) -> dict[str, Any]:
  """Train the reward model on ratings; report held-out pair accuracy.

  Args:
    directory: the stage's folder.
    config: the experiment config.
    train_examples: rated texts to fit.
    test_examples: held-out rated texts; their movie reviews are paired.
    reference_params: trained LM parameters that the trunk starts from, or
      None for a fresh trunk.
  """
  shape = policy.reward_config(config)
  key = jax.random.fold_in(jax.random.key(config.seed), 3)

  def init_params_fn(key):
    trunk = None
    if reference_params is not None:
      # A copy, because the train step donates the state's buffers.
      trunk = jax.tree.map(jnp.copy, reference_params)
    return models.init_reward_model(key, shape, trunk_params=trunk)

  logging.info('Stage reward_model: %d steps.', config.reward.steps)
  state = run_trainer(
      directory,
      make_reward_trainer(config, train_examples),
      init_params_fn=init_params_fn,
      key=key,
      num_steps=config.reward.steps,
      config_json=json.dumps(config.to_dict(), sort_keys=True, default=str),
      checkpoint_every=config.reward.checkpoint_every,
  )
  accuracy = held_out_pair_accuracy(state.params, shape, test_examples, config)
  logging.info('Reward model: %s', accuracy)
  params_sha256 = policy.save_params(directory, state.params)
  return {**accuracy, 'steps': int(state.step), 'params_sha256': params_sha256}


def score_texts(
    params: Any,
    shape: models.TransformerConfig,
    texts: Sequence[str],
    config: ml_collections.ConfigDict,
    batch_size: int = 128,
) -> np.ndarray:
  """Reward-model scores [len(texts)] of full texts."""
  tokens, lengths = encode_texts(texts, config)
  mask = _mask(tokens, lengths)
  score = jax.jit(lambda t, m: models.reward_scores(params, t, m, shape))
  scores = [
      np.asarray(score(tokens[i : i + batch_size], mask[i : i + batch_size]))
      for i in range(0, len(texts), batch_size)
  ]
  return np.concatenate(scores)


def held_out_pair_accuracy(
    params: Any,
    shape: models.TransformerConfig,
    test_examples: Sequence[dict[str, Any]],
    config: ml_collections.ConfigDict,
) -> dict[str, Any]:
  """Accuracy on held-out movie-review pairs, beside VADER's on the same.

  Pairs: every two test-split movie-review sentences whose mean ratings differ
  by at least `config.reward.min_rating_gap`; a pair counts 1 when the text
  rated higher scores higher, 1/2 on a tie (`judge.pairwise_accuracy`).
  """
  movie = [e for e in test_examples if e['subset'] == 'movie_reviews']
  means = np.asarray([e['mean_rating'] for e in movie], np.float64)
  texts = [e['text'] for e in movie]
  gap = config.reward.min_rating_gap
  model_scores = score_texts(params, shape, texts, config)
  return {
      'texts': len(texts),
      'pairs': judge.count_pairs(means, min_gap=gap),
      'min_rating_gap': gap,
      'reward_model_accuracy': judge.pairwise_accuracy(
          model_scores, means, min_gap=gap
      ),
      'vader_accuracy': judge.pairwise_accuracy(
          judge.vader_compound(texts), means, min_gap=gap
      ),
  }
