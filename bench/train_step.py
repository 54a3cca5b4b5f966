r"""Benchmark the CTRL RL step with the transformer policy.

  .venv/bin/python bench/train_step.py
  .venv/bin/python bench/train_step.py --batch_prompts=64 --width=256

Times `rl.make_rl_train_step` (REINFORCE by default) compiled with
`train.jit_train_step` over all local devices: KV-cached sampling of S
completions per prompt, the reward model, the reference policy, and one
policy forward and backward pass. In the same run it times a large float32
matrix multiply to measure the machine's matmul FLOP/s, and prints one JSON
object with tokens per second and the achieved fraction of that rate.

The default model shape is the sentiment experiment's policy (byte
vocabulary of 259, width 128, 2 layers, 4 heads, MLP 512; reward model width
96) with its RL batch (16 prompts of 25 tokens, S = 4, 24 new tokens).

FLOP count (model FLOPs, the usual MFU convention): 2 FLOPs per
multiply-add of every dense layer and of causal attention (scores and
weighted sum over the keys each query may attend to), per token the
implementation processes. Sampling: one prefill of each prompt, then one
decoding step per new token and sample, logits only where a token is drawn.
Training passes: logits at every position, backward = 2 x forward. Layer
norms, softmax, embeddings lookups and the optimizer are not counted.
"""

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from infalign_jax import models
from infalign_jax import rl
from infalign_jax import sampling
from infalign_jax import train

_WIDTH = flags.DEFINE_integer('width', 128, 'Policy width.')
_LAYERS = flags.DEFINE_integer('layers', 2, 'Policy transformer blocks.')
_HEADS = flags.DEFINE_integer('heads', 4, 'Policy attention heads.')
_MLP = flags.DEFINE_integer('mlp_dim', 512, 'Policy MLP hidden size.')
_VOCAB = flags.DEFINE_integer('vocab_size', 259, 'Vocabulary size.')
_REWARD_WIDTH = flags.DEFINE_integer('reward_width', 96, 'Reward model width.')
_REWARD_MLP = flags.DEFINE_integer('reward_mlp_dim', 384, 'Reward model MLP.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 25, 'P, prompt tokens.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 24, 'L, completion tokens.')
_BATCH = flags.DEFINE_integer('batch_prompts', 16, 'B, prompts per step.')
_SAMPLES = flags.DEFINE_integer('num_samples', 4, 'S, samples per prompt.')
_REF_SAMPLES = flags.DEFINE_integer('ref_samples', 64, 'M, table row size.')
_ALGORITHM = flags.DEFINE_enum(
    'algorithm', 'reinforce', rl.ALGORITHMS, 'RL algorithm.'
)
_PPO_EPOCHS = flags.DEFINE_integer('ppo_epochs', 4, 'PPO inner epochs.')
_DTYPE = flags.DEFINE_enum(
    'dtype', 'float32', ['float32', 'bfloat16'], 'Model compute dtype.'
)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_MATMUL_SIZE = flags.DEFINE_integer(
    'matmul_size', 2048, 'n of the n x n x n matmul used as the peak rate.'
)


def _dense_flops_per_token(config: models.TransformerConfig) -> float:
  """FLOPs of the dense layers of all blocks, per token (no logits)."""
  width, hidden = config.width, config.hidden_dim
  per_layer = 2 * (4 * width * width + 2 * width * hidden)
  return config.num_layers * per_layer


def _attention_flops(config: models.TransformerConfig, keys: float) -> float:
  """FLOPs of scores and weighted sum for one query over `keys` keys."""
  return config.num_layers * 2 * 2 * keys * config.width


def _causal_keys(length: int) -> float:
  """Mean number of keys a query attends to in a causal sequence."""
  return (length + 1) / 2


def model_flops_per_step(
    policy: models.TransformerConfig,
    reward: models.TransformerConfig,
    *,
    batch: int,
    samples: int,
    prompt_len: int,
    new_tokens: int,
    policy_passes: int,
) -> dict[str, float]:
  """Model FLOPs of one RL step, split by phase (see the module docstring)."""
  sequence = prompt_len + new_tokens
  rows = batch * samples
  prefill = (
      batch
      * prompt_len
      * (
          _dense_flops_per_token(policy)
          + _attention_flops(policy, _causal_keys(prompt_len))
      )
      + batch * 2 * policy.width * policy.vocab_size
  )
  decode = rows * sum(
      _dense_flops_per_token(policy)
      + _attention_flops(policy, prompt_len + i + 1)
      + 2 * policy.width * policy.vocab_size
      for i in range(new_tokens)
  )

  def forward(config, logits):
    per_token = _dense_flops_per_token(config) + _attention_flops(
        config, _causal_keys(sequence)
    )
    if logits:
      per_token += 2 * config.width * config.vocab_size
    return rows * sequence * per_token

  policy_forward = forward(policy, logits=True)
  return {
      'sampling': prefill + decode,
      'reference_forward': policy_forward,
      'reward_forward': forward(reward, logits=False),
      # Forward plus backward (2 x forward) per update.
      'policy_train': 3 * policy_forward * policy_passes,
  }


def measure_matmul_flops(size: int, repeats: int = 5) -> float:
  """Return the best float32 FLOP/s of an n x n x n matmul on device 0."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), jnp.float32)
  b = jax.random.normal(key_b, (size, size), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def _make_functions(policy_config, reward_config, num_samples, new_tokens):
  """Build the four functions of the RL step for the transformer policy."""

  def sample_fn(params, batch, keys):
    def one_prompt(key, tokens, length):
      out = sampling.sample(
          key,
          params,
          policy_config,
          tokens[None],
          length[None],
          num_samples=num_samples,
          max_new_tokens=new_tokens,
          eos_id=None,
          pad_id=0,
      )
      return out.tokens[0], out.mask[0]

    tokens, mask = jax.vmap(one_prompt)(
        keys, batch['prompt_tokens'], batch['prompt_lengths']
    )
    return {'tokens': tokens, 'mask': mask.astype(jnp.float32)}

  def logprobs(params, batch, samples):
    return sampling.completion_logprobs(
        params,
        policy_config,
        batch['prompt_tokens'],
        batch['prompt_lengths'],
        samples['tokens'],
        samples['mask'] > 0,
    )

  def logprob_fn(params, batch, samples):
    return logprobs(params, batch, samples)

  def ref_logprob_fn(frozen, batch, samples):
    return logprobs(frozen['reference'], batch, samples)

  def reward_fn(frozen, batch, samples):
    tokens, mask = sampling.join_prompt_completion(
        batch['prompt_tokens'],
        batch['prompt_lengths'],
        samples['tokens'],
        samples['mask'] > 0,
        pad_id=0,
    )
    rows = tokens.shape[0] * tokens.shape[1]
    scores = models.reward_scores(
        frozen['reward'],
        tokens.reshape(rows, -1),
        mask.reshape(rows, -1),
        reward_config,
    )
    return scores.reshape(tokens.shape[:2])

  return sample_fn, logprob_fn, ref_logprob_fn, reward_fn


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  batch_size, num_samples = _BATCH.value, _SAMPLES.value
  prompt_len, new_tokens = _PROMPT_LEN.value, _NEW_TOKENS.value
  max_len = prompt_len + new_tokens
  policy_config = models.TransformerConfig(
      vocab_size=_VOCAB.value,
      width=_WIDTH.value,
      num_layers=_LAYERS.value,
      num_heads=_HEADS.value,
      mlp_dim=_MLP.value,
      max_len=max_len,
      dtype=_DTYPE.value,
  )
  reward_config = models.TransformerConfig(
      vocab_size=_VOCAB.value,
      width=_REWARD_WIDTH.value,
      num_layers=_LAYERS.value,
      num_heads=_HEADS.value,
      mlp_dim=_REWARD_MLP.value,
      max_len=max_len,
      dtype=_DTYPE.value,
  )
  rl_config = rl.RLConfig(
      beta=0.1,
      transform='exp',
      transform_params={'t': 4.0},
      algorithm=_ALGORITHM.value,
      ppo_epochs=_PPO_EPOCHS.value,
      num_samples=num_samples,
  )
  optimizer = optax.adam(1e-4)
  sample_fn, logprob_fn, ref_logprob_fn, reward_fn = _make_functions(
      policy_config, reward_config, num_samples, new_tokens
  )
  step = rl.make_rl_train_step(
      rl_config,
      optimizer,
      sample_fn=sample_fn,
      logprob_fn=logprob_fn,
      ref_logprob_fn=ref_logprob_fn,
      reward_fn=reward_fn,
  )
  num_devices = jax.local_device_count()
  if batch_size % num_devices:
    num_devices = 1
  mesh = train.make_mesh(num_devices)
  compiled = train.jit_train_step(step, mesh)

  key_policy, key_reward, key_data = jax.random.split(jax.random.key(0), 3)
  params = models.init_lm(key_policy, policy_config)
  frozen = train.replicate_on_mesh(
      {
          # A copy: the state is donated, so the frozen arrays must not
          # share its buffers.
          'reference': jax.tree.map(jnp.copy, params),
          'reward': models.init_reward_model(key_reward, reward_config),
      },
      mesh,
  )
  rng = np.random.default_rng(0)
  batch = train.shard_batch(
      {
          'example_ids': np.arange(batch_size, dtype=np.int32),
          'prompt_tokens': rng.integers(
              3, _VOCAB.value, (batch_size, prompt_len), dtype=np.int32
          ),
          'prompt_lengths': np.full(batch_size, prompt_len, np.int32),
          'sorted_ref_rewards': np.sort(
              rng.standard_normal((batch_size, _REF_SAMPLES.value)), axis=1
          ).astype(np.float32),
      },
      mesh,
  )
  state = train.replicate_on_mesh(
      train.init_train_state(params, optimizer, key_data), mesh
  )

  start = time.perf_counter()
  state, metrics = compiled(state, batch, frozen)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  state, metrics = compiled(state, batch, frozen)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, batch, frozen)
  jax.block_until_ready(metrics)
  step_seconds = (time.perf_counter() - start) / _STEPS.value

  passes = rl_config.ppo_epochs + 1 if _ALGORITHM.value == 'ppo' else 1
  flops = model_flops_per_step(
      policy_config,
      reward_config,
      batch=batch_size,
      samples=num_samples,
      prompt_len=prompt_len,
      new_tokens=new_tokens,
      policy_passes=passes,
  )
  if _ALGORITHM.value == 'ppo':
    # The old log-probs are one extra forward pass, not forward + backward.
    flops['policy_train'] -= 2 * flops['reference_forward']
  total_flops = sum(flops.values())
  matmul_flops = measure_matmul_flops(_MATMUL_SIZE.value)
  achieved = total_flops / step_seconds
  completion_tokens = batch_size * num_samples * new_tokens
  result = {
      'benchmark': 'train_step',
      'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'num_devices': num_devices,
      'jax_version': jax.__version__,
      'policy': {
          'vocab_size': policy_config.vocab_size,
          'width': policy_config.width,
          'layers': policy_config.num_layers,
          'heads': policy_config.num_heads,
          'mlp_dim': policy_config.hidden_dim,
          'dtype': policy_config.dtype,
      },
      'reward_width': reward_config.width,
      'algorithm': _ALGORITHM.value,
      'batch_prompts': batch_size,
      'num_samples': num_samples,
      'prompt_len': prompt_len,
      'new_tokens': new_tokens,
      'compile_seconds': round(compile_seconds, 3),
      'step_seconds': step_seconds,
      'completion_tokens_per_second': completion_tokens / step_seconds,
      'sequence_tokens_per_second': batch_size
      * num_samples
      * max_len
      / step_seconds,
      'model_flops_per_step': flops,
      'achieved_flops_per_second': achieved,
      'matmul_size': _MATMUL_SIZE.value,
      'matmul_flops_per_second': matmul_flops,
      'fraction_of_matmul_rate': achieved / matmul_flops,
      'final_loss': float(metrics['loss']),
      'nonfinite_count': int(metrics['nonfinite_count']),
  }
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main)
