"""Model glue shared by the stages: shapes, sampling, scoring, parameters.

Notation: B prompts, S samples per prompt, P prompt tokens, L continuation
tokens, T = P + L tokens of a joined sequence.

A prompt is encoded as BOS followed by its UTF-8 bytes (no EOS), right-padded
to P = 1 + max_prompt_bytes. A continuation is at most L tokens and ends at the
first EOS. The reward model and the VADER judge both see prompt plus
continuation.
"""

from collections.abc import Callable, Sequence
import dataclasses
import hashlib
import os
import time
from typing import Any

from absl import logging
from etils import epath
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from infalign_jax import models
from infalign_jax import sampling
from infalign_jax.data import tokenizer as tokenizer_lib

TOKENIZER = tokenizer_lib.ByteTokenizer()
PARAMS_FILE = 'params.msgpack'


def max_len(config: ml_collections.ConfigDict) -> int:
  """Context length covering training texts and prompt plus continuation."""
  return max(
      config.data.max_text_bytes + 2,
      prompt_length(config) + config.prompts.continuation_length,
  )


def prompt_length(config: ml_collections.ConfigDict) -> int:
  """P: BOS plus the longest prompt in bytes."""
  return 1 + config.prompts.max_prompt_bytes


def lm_config(config: ml_collections.ConfigDict) -> models.TransformerConfig:
  """Shape of the reference LM and of every policy."""
  return models.TransformerConfig(
      vocab_size=TOKENIZER.vocab_size,
      width=config.lm.width,
      num_layers=config.lm.depth,
      num_heads=config.lm.num_heads,
      mlp_dim=config.lm.mlp_width,
      max_len=max_len(config),
  )


def reward_config(
    config: ml_collections.ConfigDict,
) -> models.TransformerConfig:
  """Shape of the reward model: the reference LM's trunk, its own inputs.

  The trunk has the LM's shape, so it can start from the trained reference
  LM (`config.reward.init_from_reference`). Pooling and the hashed n-gram
  input embeddings come from `config.reward`.
  """
  return dataclasses.replace(
      lm_config(config),
      reward_pooling=config.reward.pooling,
      ngram_orders=tuple(config.reward.ngram_orders),
      ngram_buckets=config.reward.ngram_buckets,
  )


def encode_prompts(
    prompts: Sequence[str], config: ml_collections.ConfigDict
) -> tuple[np.ndarray, np.ndarray]:
  """Encode prompts as [B, P] right-padded tokens and [B] lengths."""
  return TOKENIZER.encode_batch(
      list(prompts),
      max_length=prompt_length(config),
      add_bos=True,
      add_eos=False,
  )


def save_params(directory: epath.Path, params: Any) -> str:
  """Write parameters atomically and return their SHA-256."""
  path = directory / PARAMS_FILE
  tmp = directory / f'.{PARAMS_FILE}.tmp'
  tmp.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(params)))
  # os.replace overwrites a file left by a run killed before done.json.
  os.replace(tmp, path)
  return common.params_sha256(params)


def load_params(directory: epath.Path) -> Any:
  """Read parameters written by `save_params`."""
  return flax.serialization.msgpack_restore(
      (directory / PARAMS_FILE).read_bytes()
  )


def join(
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    completion_tokens: jax.Array,
    completion_mask: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Join prompts [B, P] and completions [B, S, L] into [B * S, T] rows."""
  tokens, mask = sampling.join_prompt_completion(
      prompt_tokens,
      prompt_lengths,
      completion_tokens,
      completion_mask,
      pad_id=TOKENIZER.pad_id,
  )
  return tokens.reshape(-1, tokens.shape[-1]), mask.reshape(-1, mask.shape[-1])


def reward_of_completions(
    reward_params: Any,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    completion_tokens: jax.Array,
    completion_mask: jax.Array,
    *,
    shape: models.TransformerConfig,
) -> jax.Array:
  """Score prompt plus completion [B, S, L] with the reward model: [B, S]."""
  joined, joined_mask = join(
      prompt_tokens, prompt_lengths, completion_tokens, completion_mask
  )
  scores = models.reward_scores(reward_params, joined, joined_mask, shape)
  return scores.reshape(completion_tokens.shape[:2])


# Compiled once per shape and reused by every stage of a process.
reward_of_completions_jit = jax.jit(
    reward_of_completions, static_argnames=('shape',)
)
completion_logprobs_jit = jax.jit(
    sampling.completion_logprobs, static_argnames=('config',)
)


def sample_batches(
    *,
    stage: str,
    key: jax.Array,
    params: Any,
    config: ml_collections.ConfigDict,
    prompts: Sequence[str],
    num_samples: int,
    batch_prompts: int,
    extra_fn: Callable[..., dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
  """Sample `num_samples` continuations of every prompt, batch by batch.

  Prompt i draws from `fold_in(key, i)` alone, so the result depends neither
  on the batch size nor on which batches an interrupted attempt finished.
  Progress lines give the stage, the batch, the rate and an ETA.

  Args:
    stage: name used in the progress lines.
    key: PRNG key of the whole call.
    params: sampling policy's parameters.
    config: the experiment config.
    prompts: B prompt texts.
    num_samples: S continuations per prompt.
    batch_prompts: prompts per sampler call.
    extra_fn: `extra_fn(prompt_tokens, prompt_lengths, sample)` returns a dict
      of [b, S, ...] arrays computed per batch (rewards, log-probabilities);
      they are concatenated over batches.

  Returns:
    The concatenated arrays of `extra_fn`, plus 'tokens' [B, S, L] and 'mask'
    [B, S, L] of the continuations and 'logprobs' [B, S, L] under the
    sampling policy (at temperature 1, the only temperature used here).
  """
  shape = lm_config(config)
  prompt_tokens, prompt_lengths = encode_prompts(prompts, config)
  outputs: dict[str, list[np.ndarray]] = {}
  num_batches = -(-len(prompts) // batch_prompts)
  start = time.time()
  for index in range(num_batches):
    rows = slice(index * batch_prompts, (index + 1) * batch_prompts)
    tokens, lengths = prompt_tokens[rows], prompt_lengths[rows]
    keys = prompt_keys(key, np.arange(len(prompts))[rows])
    sample = _sample_per_prompt_jit(
        keys,
        params,
        shape,
        tokens,
        lengths,
        num_samples=num_samples,
        max_new_tokens=config.prompts.continuation_length,
    )
    arrays = {
        'tokens': sample.tokens,
        'mask': sample.mask,
        'logprobs': sample.untempered_logprobs,
        **extra_fn(tokens, lengths, sample),
    }
    for name, array in arrays.items():
      outputs.setdefault(name, []).append(np.asarray(array))
    elapsed = time.time() - start
    rate = (index + 1) / elapsed
    logging.info(
        '%s: batch %d/%d, %.2f batches/s, ETA %.0f s',
        stage,
        index + 1,
        num_batches,
        rate,
        (num_batches - index - 1) / rate,
    )
  return {name: np.concatenate(parts) for name, parts in outputs.items()}


def prompt_keys(key: jax.Array, indices: np.ndarray) -> jax.Array:
  """Derive [B] keys, `fold_in(key, i)` for each prompt index i."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      key, jnp.asarray(indices, jnp.int32)
  )


def sample_per_prompt(
    keys: jax.Array,
    params: Any,
    shape: models.TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    *,
    num_samples: int,
    max_new_tokens: int,
) -> Any:
  """Sample S continuations of each prompt, prompt b from `keys[b]` only.

  Args:
    keys: [B] PRNG keys.
    params: the policy's parameters.
    shape: the policy's shape.
    prompt_tokens: [B, P] right-padded prompts.
    prompt_lengths: [B] valid prompt tokens.
    num_samples: S.
    max_new_tokens: L.

  Returns:
    The sampler's output with tokens, logprobs and mask of shape [B, S, L].
  """

  def one_prompt(key, tokens, length):
    sample = sampling.sample(
        key,
        params,
        shape,
        tokens[None],
        length[None],
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        eos_id=TOKENIZER.eos_id,
        pad_id=TOKENIZER.pad_id,
    )
    return jax.tree.map(lambda x: x[0], sample)

  return jax.vmap(one_prompt)(keys, prompt_tokens, prompt_lengths)


_sample_per_prompt_jit = jax.jit(
    sample_per_prompt,
    static_argnames=('shape', 'num_samples', 'max_new_tokens'),
)


def decode_continuations(
    tokens: np.ndarray, mask: np.ndarray
) -> list[list[str]]:
  """Decode [B, S, L] continuations to B lists of S texts."""
  return [
      [
          TOKENIZER.decode(row[valid])
          for row, valid in zip(rows, valid_rows, strict=True)
      ]
      for rows, valid_rows in zip(tokens, mask.astype(bool), strict=True)
  ]


def fingerprint(values: Sequence[str]) -> str:
  """SHA-256 of a list of strings (length-prefixed)."""
  digest = hashlib.sha256()
  for value in values:
    data = value.encode('utf-8')
    digest.update(len(data).to_bytes(8, 'little'))
    digest.update(data)
  return digest.hexdigest()


def learning_rate_schedule(
    peak: float, warmup_steps: int, total_steps: int
) -> optax.Schedule:
  """Linear warmup to `peak`, then cosine decay to zero at `total_steps`."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
  )


def as_jnp(tree: Any) -> Any:
  """Convert a restored NumPy tree to device arrays."""
  return jax.tree_util.tree_map(jnp.asarray, tree)
