r"""A small MLP fit by Adam: the fixture run for checkpoint and resume tests.

  python -m experiments.main --config=experiments/configs/regression.py \
      --workdir=runs/regression

It trains in a few seconds on one CPU core, so tests can kill and resume it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Return the regression config."""
  config = ml_collections.ConfigDict()
  # Module in experiments/ that runs this config.
  config.experiment = 'regression'
  # Seed of the dataset, the initial parameters and the input noise.
  config.seed = 0
  # Number of examples in the synthetic dataset.
  config.num_examples = 256
  # Input features per example.
  config.input_dim = 4
  # Width of the MLP's hidden layer.
  config.hidden_dim = 32
  # Examples per train step.
  config.batch_size = 16
  # Standard deviation of the Gaussian noise added to each input in each step.
  # It makes every step draw from the run's PRNG key.
  config.input_noise = 0.05
  # Adam learning rate.
  config.learning_rate = 0.01
  # Total number of train steps.
  config.num_steps = 60
  # Save a checkpoint every this many steps (and at the last step).
  config.save_every = 10
  # Write metrics and a progress line every this many steps.
  config.log_every = 10
  # Number of latest checkpoints kept.
  config.keep_last = 3
  return config
