"""Fit a small MLP to a fixed synthetic regression task with the shared loop.

The target is y = sin(x . w_true) + 0.1 * |x|^2 for fixed Gaussian inputs x.
Each epoch visits the examples in a permutation derived from the seed and the
epoch number, so the batch at any data position is a pure function of that
position. Each step adds Gaussian noise drawn from the step's key to the
inputs, so the run also depends on the PRNG key in the train state. Both make
an interrupted and resumed run reproduce an uninterrupted one bit for bit,
which the checkpoint and resume tests check.
"""

from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from infalign_jax import loop
from infalign_jax import train


def make_dataset(
    config: ml_collections.ConfigDict,
) -> tuple[np.ndarray, np.ndarray]:
  """Build inputs [num_examples, input_dim] and targets [num_examples]."""
  rng = np.random.default_rng(config.seed)
  inputs = rng.standard_normal((config.num_examples, config.input_dim)).astype(
      np.float32
  )
  w_true = rng.standard_normal(config.input_dim).astype(np.float32)
  targets = np.sin(inputs @ w_true) + 0.1 * np.sum(inputs**2, axis=1)
  return inputs, targets.astype(np.float32)


def make_batch_fn(config: ml_collections.ConfigDict, inputs, targets):
  """Return `batch_fn(position) -> (batch, next_position)`.

  `position` counts examples read since the start of the run. Batches never
  straddle an epoch, because the examples per epoch are a multiple of the
  batch size.
  """
  if config.num_examples % config.batch_size:
    raise ValueError(
        f'num_examples ({config.num_examples}) must be a multiple of '
        f'batch_size ({config.batch_size}).'
    )

  def batch_fn(position: int) -> tuple[dict[str, np.ndarray], int]:
    epoch, offset = divmod(position, config.num_examples)
    order = np.random.default_rng((config.seed, epoch)).permutation(
        config.num_examples
    )
    indices = order[offset : offset + config.batch_size]
    batch = {'inputs': inputs[indices], 'targets': targets[indices]}
    return batch, position + config.batch_size

  return batch_fn


def init_params(config: ml_collections.ConfigDict, key: jax.Array) -> Any:
  """Initialize the MLP with LeCun-normal weights and zero biases."""
  key_hidden, key_out = jax.random.split(key)
  return {
      'hidden': {
          'kernel': jax.random.normal(
              key_hidden, (config.input_dim, config.hidden_dim)
          )
          / np.sqrt(config.input_dim),
          'bias': jnp.zeros((config.hidden_dim,)),
      },
      'out': {
          'kernel': jax.random.normal(key_out, (config.hidden_dim,))
          / np.sqrt(config.hidden_dim),
          'bias': jnp.zeros(()),
      },
  }


def predict(params: Any, inputs: jax.Array) -> jax.Array:
  """Compute the MLP output [B] for inputs [B, input_dim]."""
  hidden = jnp.tanh(
      inputs @ params['hidden']['kernel'] + params['hidden']['bias']
  )
  return hidden @ params['out']['kernel'] + params['out']['bias']


def make_loss_fn(config: ml_collections.ConfigDict):
  """Make a `train.LossFn`: mean squared error on inputs with Gaussian noise."""

  def loss_fn(params, batch, frozen, key):
    del frozen  # The regression has no frozen arrays.
    noise = config.input_noise * jax.random.normal(key, batch['inputs'].shape)
    errors = predict(params, batch['inputs'] + noise) - batch['targets']
    loss = jnp.mean(errors**2)
    return loss, {'rmse': jnp.sqrt(loss)}

  return loss_fn


def run(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
  """Train to `config.num_steps`, resuming from `workdir` if it has a run."""
  inputs, targets = make_dataset(config)
  optimizer = optax.adam(config.learning_rate)
  train_step = jax.jit(
      train.make_train_step(make_loss_fn(config), optimizer),
      donate_argnums=0,
  )
  run_key = jax.random.key(config.seed)
  init_key, state_key = jax.random.split(run_key)

  def init_state_fn() -> train.TrainState:
    return train.init_train_state(
        init_params(config, init_key), optimizer, state_key
    )

  state = loop.run_training(
      workdir=workdir,
      train_step=train_step,
      init_state_fn=init_state_fn,
      batch_fn=make_batch_fn(config, inputs, targets),
      num_steps=config.num_steps,
      config_json=common.config_to_json(config),
      save_every=config.save_every,
      log_every=config.log_every,
      keep_last=config.keep_last,
  )
  final_mse = jnp.mean((predict(state.params, inputs) - targets) ** 2)
  return {
      'final_step': int(state.step),
      'final_params_sha256': common.params_sha256(state.params),
      'final_mse': float(final_mse),
      'final_data_position': int(state.data_position),
  }
