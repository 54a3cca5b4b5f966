"""infalign_jax: inference-aware alignment (InfAlign, CTRL) in JAX.

Calibrate each reward against reference-policy samples for the same prompt,
transform it for the inference-time procedure (best-of-N, worst-of-N), then
run KL-regularized RL on the transformed reward.

References:
  Balashankar, Sun et al., "InfAlign: Inference-aware language model
  alignment", ICML 2025, arXiv:2412.19792.
"""

from infalign_jax import analysis
from infalign_jax import calibration
from infalign_jax import losses
from infalign_jax import models
from infalign_jax import procedures
from infalign_jax import rl
from infalign_jax import sampling
from infalign_jax import supervised
from infalign_jax import train
from infalign_jax import transforms
from infalign_jax.calibration import calibrated_rewards
from infalign_jax.calibration import sort_reference_rewards
from infalign_jax.models import TransformerConfig
from infalign_jax.models import init_lm
from infalign_jax.models import init_reward_model
from infalign_jax.models import lm_logits
from infalign_jax.models import reward_scores
from infalign_jax.procedures import win_rate
from infalign_jax.rl import RLConfig
from infalign_jax.rl import make_rl_train_step
from infalign_jax.sampling import SampleOutput
from infalign_jax.sampling import completion_logprobs
from infalign_jax.sampling import join_prompt_completion
from infalign_jax.sampling import sample
from infalign_jax.supervised import bradley_terry_loss
from infalign_jax.supervised import make_bradley_terry_loss_fn
from infalign_jax.supervised import make_lm_loss_fn
from infalign_jax.supervised import make_rating_regression_loss_fn
from infalign_jax.supervised import next_token_loss
from infalign_jax.supervised import rating_regression_loss
from infalign_jax.train import TrainState
from infalign_jax.train import init_train_state
from infalign_jax.train import make_train_step
from infalign_jax.transforms import make_transform

__version__ = '0.1.0'

__all__ = (
    '__version__',
    'analysis',
    'calibration',
    'calibrated_rewards',
    'sort_reference_rewards',
    'transforms',
    'make_transform',
    'procedures',
    'win_rate',
    'models',
    'TransformerConfig',
    'init_lm',
    'init_reward_model',
    'lm_logits',
    'reward_scores',
    'sampling',
    'SampleOutput',
    'completion_logprobs',
    'join_prompt_completion',
    'sample',
    'supervised',
    'bradley_terry_loss',
    'make_bradley_terry_loss_fn',
    'make_lm_loss_fn',
    'make_rating_regression_loss_fn',
    'next_token_loss',
    'rating_regression_loss',
    'losses',
    'train',
    'TrainState',
    'init_train_state',
    'make_train_step',
    'rl',
    'RLConfig',
    'make_rl_train_step',
)
