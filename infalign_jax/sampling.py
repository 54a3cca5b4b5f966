"""Autoregressive sampling with a key-value cache, and completion log-probs.

Notation: B prompts, S samples per prompt, P prompt tokens (padded), L
completion tokens (maximum new tokens), V vocabulary.

Prompts are right-padded: row b contains `prompt_lengths[b]` valid tokens
(at least one, typically a BOS token) followed by padding. Completion token i of
row b sits at position `prompt_lengths[b] + i`, so a prompt and its completion
form one contiguous sequence, and the amount of padding never changes a
result.

Randomness: the key of sample s of prompt b at completion step i is
`fold_in(fold_in(fold_in(key, b), s), i)`. Adding prompts at the end of the
batch, or padding columns, therefore leaves the draws of every other sample
unchanged, and `sample` and `sample_without_cache` draw the same tokens from
the same key.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import models

__all__ = (
    'SampleOutput',
    'completion_logprobs',
    'join_prompt_completion',
    'sample',
    'sample_without_cache',
)

Params = Any


class SampleOutput(NamedTuple):
  """Completions drawn by `sample`.

  Attributes:
    tokens: [B, S, L] int32 completion tokens, `pad_id` after the first EOS.
    logprobs: [B, S, L] float32 log-probabilities of each token under the
      sampling policy, softmax(logits / temperature), which is the
      distribution the token was drawn from. 0 where `mask` is False.
    untempered_logprobs: [B, S, L] float32 log-probabilities of the same
      tokens under the model at temperature 1, softmax(logits). The policy
      that RL trains and the KL to the reference are defined at temperature
      1, so these are the values to compare with `completion_logprobs(...,
      temperature=1.0)`. 0 where `mask` is False.
    mask: [B, S, L] bool, True up to and including the first EOS (every
      position when no EOS was drawn).

  NOTE: with float32 compute the log-probabilities match
  `completion_logprobs` to about 1e-6. With bfloat16 compute the cached and
  uncached passes round differently; on a tiny model they differed by 6e-4.
  """

  tokens: jax.Array
  logprobs: jax.Array
  untempered_logprobs: jax.Array
  mask: jax.Array


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _as_array(x, name: str):
  """Return `x` as an array; sequences such as lists go through NumPy."""
  if isinstance(x, (jax.Array, np.ndarray)):
    return x
  try:
    return np.asarray(x)
  except (TypeError, ValueError) as error:
    raise TypeError(
        f'{name} must be an array (or a nested list of ints), got '
        f'{type(x).__name__}: {error}'
    ) from error


def _as_key(key) -> jax.Array:
  """Return a typed PRNG key, wrapping a legacy uint32 [2] key."""
  key = _as_array(key, 'key')
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape:
      raise TypeError(
          f'key must be a single PRNG key, got a key array of shape '
          f'{key.shape}; pass one key from jax.random.key(seed).'
      )
    return key
  if key.dtype == np.uint32 and key.shape == (2,):
    # A jax.random.PRNGKey(seed) key of the default threefry implementation.
    return jax.random.wrap_key_data(key)
  raise TypeError(
      f'key must be a PRNG key from jax.random.key(seed), got an array of '
      f'dtype {key.dtype} and shape {key.shape}.'
  )


def _check_token_ids(tokens, vocab_size: int, name: str) -> None:
  """Raise ValueError if concrete `tokens` contain an id outside [0, V).

  A traced array (under an outer jit) cannot be inspected and is let through.

  Args:
    tokens: int array of token ids, any shape.
    vocab_size: V.
    name: the argument name for the error message.

  Raises:
    ValueError: naming the first offending id, its index and the range.
  """
  if not _is_concrete(tokens) or not np.size(tokens):
    return
  values = np.asarray(tokens)
  bad = np.logical_or(values < 0, values >= vocab_size)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f'{name} contains token id {int(values[index])} at index {index}, '
        f'outside the vocabulary range [0, V={vocab_size}); encode the text '
        'with the tokenizer the model was built for, or raise '
        'config.vocab_size.'
    )


def _check_special_ids(config: models.TransformerConfig, eos_id, pad_id):
  """Raise ValueError unless eos_id (or None) and pad_id lie in [0, V)."""
  for name, value in (('eos_id', eos_id), ('pad_id', pad_id)):
    if value is None and name == 'eos_id':
      continue
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f'{name} must be an int token id, got {value!r}.')
    if not 0 <= value < config.vocab_size:
      raise ValueError(
          f'{name}={value} is outside the vocabulary range '
          f'[0, V={config.vocab_size}); use an id of the tokenizer, for '
          'example its EOS or padding token.'
      )


def _check_prompts(
    config: models.TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    num_new_tokens: int,
):
  """Raise ValueError on prompts that do not fit the sampler's contract."""
  if prompt_tokens.ndim != 2:
    raise ValueError(
        f'prompt_tokens must have shape [B, P], got {prompt_tokens.shape}.'
    )
  if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
    raise ValueError(
        f'prompt_tokens must be integer token ids, got {prompt_tokens.dtype}.'
    )
  _check_token_ids(prompt_tokens, config.vocab_size, 'prompt_tokens')
  batch, prompt_len = prompt_tokens.shape
  if prompt_lengths.shape != (batch,):
    raise ValueError(
        f'prompt_lengths must have shape [B] = ({batch},), got '
        f'{prompt_lengths.shape}.'
    )
  if not isinstance(num_new_tokens, int) or num_new_tokens < 1:
    raise ValueError(
        f'the number of new tokens must be a positive int, got '
        f'{num_new_tokens!r}.'
    )
  if prompt_len + num_new_tokens > config.max_len:
    raise ValueError(
        f'prompt columns P={prompt_len} plus new tokens L={num_new_tokens} '
        f'exceed config.max_len={config.max_len}; trim the prompt padding, '
        'generate fewer tokens or use a longer context.'
    )
  if _is_concrete(prompt_lengths) and batch:
    lengths = np.asarray(prompt_lengths)
    if int(lengths.min()) < 1 or int(lengths.max()) > prompt_len:
      raise ValueError(
          f'prompt_lengths must lie in [1, P={prompt_len}], got values from '
          f'{int(lengths.min())} to {int(lengths.max())}; every prompt needs '
          'at least one token (for example BOS).'
      )


def _check_temperature(temperature):
  if _is_concrete(temperature) and not float(temperature) > 0:
    raise ValueError(
        f'temperature must be positive, got {temperature!r}; greedy decoding '
        'is not supported, use a small positive temperature instead.'
    )


def _row_keys(key: jax.Array, batch: int, num_samples: int) -> jax.Array:
  """[B * S] keys, row b * S + s derived as fold_in(fold_in(key, b), s)."""
  prompt_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(batch))
  sample_keys = jax.vmap(
      lambda k: jax.vmap(jax.random.fold_in, (None, 0))(
          k, jnp.arange(num_samples)
      )
  )(prompt_keys)
  return sample_keys.reshape(batch * num_samples)


def _draw(row_keys, step, logits, temperature):
  """Sample one token per row and return it with both log-probabilities."""
  step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
  tempered = jax.nn.log_softmax(logits / temperature, axis=-1)
  tokens = jax.vmap(jax.random.categorical)(step_keys, tempered)
  logprobs = jnp.take_along_axis(tempered, tokens[:, None], axis=-1)[:, 0]
  untempered = jax.nn.log_softmax(logits, axis=-1)
  untempered = jnp.take_along_axis(untempered, tokens[:, None], axis=-1)[:, 0]
  return tokens.astype(jnp.int32), logprobs, untempered


class _Completions(NamedTuple):
  """[B * S, L] output buffers and the per-row EOS flags of a decode loop."""

  tokens: jax.Array
  logprobs: jax.Array
  untempered_logprobs: jax.Array
  mask: jax.Array
  done: jax.Array


def _empty_completions(rows: int, length: int, pad_id: int) -> _Completions:
  return _Completions(
      tokens=jnp.full((rows, length), pad_id, jnp.int32),
      logprobs=jnp.zeros((rows, length), jnp.float32),
      untempered_logprobs=jnp.zeros((rows, length), jnp.float32),
      mask=jnp.zeros((rows, length), jnp.bool_),
      done=jnp.zeros((rows,), jnp.bool_),
  )


def _record(out, step, drawn, eos_id, pad_id):
  """Write step `step` of every row; rows past their EOS get padding."""
  tokens, logprobs, untempered = drawn
  valid = jnp.logical_not(out.done)
  tokens = jnp.where(valid, tokens, pad_id)
  done = out.done
  if eos_id is not None:
    done = jnp.logical_or(done, jnp.logical_and(valid, tokens == eos_id))
  return _Completions(
      tokens=out.tokens.at[:, step].set(tokens),
      logprobs=out.logprobs.at[:, step].set(jnp.where(valid, logprobs, 0.0)),
      untempered_logprobs=out.untempered_logprobs.at[:, step].set(
          jnp.where(valid, untempered, 0.0)
      ),
      mask=out.mask.at[:, step].set(valid),
      done=done,
  )


def _to_output(out: _Completions, batch: int, num_samples: int):
  def reshape(x):
    return x.reshape(batch, num_samples, x.shape[-1])

  return SampleOutput(
      tokens=reshape(out.tokens),
      logprobs=reshape(out.logprobs),
      untempered_logprobs=reshape(out.untempered_logprobs),
      mask=reshape(out.mask),
  )


@functools.partial(
    jax.jit,
    static_argnames=(
        'config',
        'num_samples',
        'max_new_tokens',
        'eos_id',
        'pad_id',
    ),
)
def _sample_cached(
    key,
    params,
    prompt_tokens,
    prompt_lengths,
    temperature,
    *,
    config,
    num_samples,
    max_new_tokens,
    eos_id,
    pad_id,
):
  batch, prompt_len = prompt_tokens.shape
  rows = batch * num_samples
  row_keys = _row_keys(key, batch, num_samples)

  # Run each prompt once, then copy its cache to its S samples. Decoding
  # writes completion token i - 1 at position length + i - 1 <= P + L - 2.
  logits, cache = models.lm_prefill(
      params,
      prompt_tokens,
      prompt_lengths,
      config,
      cache_size=prompt_len + max_new_tokens - 1,
  )
  logits = jnp.repeat(logits, num_samples, axis=0)
  cache = jax.tree.map(lambda x: jnp.repeat(x, num_samples, axis=0), cache)
  lengths = jnp.repeat(prompt_lengths.astype(jnp.int32), num_samples)

  out = _empty_completions(rows, max_new_tokens, pad_id)
  out = _record(out, 0, _draw(row_keys, 0, logits, temperature), eos_id, pad_id)

  def keep_going(carry):
    step, _, out = carry
    return jnp.logical_and(step < max_new_tokens, ~jnp.all(out.done))

  def decode(carry):
    step, cache, out = carry
    logits, cache = models.lm_decode_step(
        params, out.tokens[:, step - 1], lengths + step - 1, cache, config
    )
    drawn = _draw(row_keys, step, logits, temperature)
    return step + 1, cache, _record(out, step, drawn, eos_id, pad_id)

  _, _, out = jax.lax.while_loop(keep_going, decode, (1, cache, out))
  return _to_output(out, batch, num_samples)


@functools.partial(
    jax.jit,
    static_argnames=(
        'config',
        'num_samples',
        'max_new_tokens',
        'eos_id',
        'pad_id',
    ),
)
def _sample_uncached(
    key,
    params,
    prompt_tokens,
    prompt_lengths,
    temperature,
    *,
    config,
    num_samples,
    max_new_tokens,
    eos_id,
    pad_id,
):
  batch = prompt_tokens.shape[0]
  rows = batch * num_samples
  row_keys = _row_keys(key, batch, num_samples)
  lengths = jnp.repeat(prompt_lengths.astype(jnp.int32), num_samples)
  sequences = jnp.pad(
      jnp.repeat(prompt_tokens.astype(jnp.int32), num_samples, axis=0),
      ((0, 0), (0, max_new_tokens)),
      constant_values=pad_id,
  )
  row_index = jnp.arange(rows)

  def keep_going(carry):
    step, _, out = carry
    return jnp.logical_and(step < max_new_tokens, ~jnp.all(out.done))

  def recompute(carry):
    step, sequences, out = carry
    all_logits = models.lm_logits(params, sequences, config)
    logits = all_logits[row_index, lengths + step - 1]
    drawn = _draw(row_keys, step, logits, temperature)
    out = _record(out, step, drawn, eos_id, pad_id)
    sequences = sequences.at[row_index, lengths + step].set(out.tokens[:, step])
    return step + 1, sequences, out

  out = _empty_completions(rows, max_new_tokens, pad_id)
  _, _, out = jax.lax.while_loop(keep_going, recompute, (0, sequences, out))
  return _to_output(out, batch, num_samples)


def _prepare(
    key,
    config: models.TransformerConfig,
    prompt_tokens,
    prompt_lengths,
    *,
    num_samples,
    max_new_tokens,
    temperature,
    eos_id,
    pad_id,
):
  """Validate the arguments of `sample`; return key, prompts and lengths."""
  key = _as_key(key)
  prompt_tokens = _as_array(prompt_tokens, 'prompt_tokens')
  prompt_lengths = _as_array(prompt_lengths, 'prompt_lengths')
  _check_prompts(config, prompt_tokens, prompt_lengths, max_new_tokens)
  _check_temperature(temperature)
  _check_special_ids(config, eos_id, pad_id)
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(
        f'num_samples must be a positive int, got {num_samples!r}.'
    )
  return key, prompt_tokens, prompt_lengths


def _validate_and_sample(
    sampler,
    key,
    params,
    config,
    prompt_tokens,
    prompt_lengths,
    *,
    num_samples,
    max_new_tokens,
    temperature,
    eos_id,
    pad_id,
) -> SampleOutput:
  """Check the arguments of `sample` on the host, then call `sampler`."""
  key, prompt_tokens, prompt_lengths = _prepare(
      key,
      config,
      prompt_tokens,
      prompt_lengths,
      num_samples=num_samples,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      eos_id=eos_id,
      pad_id=pad_id,
  )
  return sampler(
      key,
      params,
      prompt_tokens,
      prompt_lengths,
      jnp.asarray(temperature, jnp.float32),
      config=config,
      num_samples=num_samples,
      max_new_tokens=max_new_tokens,
      eos_id=None if eos_id is None else int(eos_id),
      pad_id=int(pad_id),
  )


def sample(
    key: jax.Array,
    params: Params,
    config: models.TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float | jax.Array = 1.0,
    eos_id: int | None,
    pad_id: int,
) -> SampleOutput:
  """Draw S completions per prompt with a key-value cache, compiled with jit.

  Each prompt is run through the model once. Its cache is copied to its S
  samples, and each new token then costs one cached decoding step. The loop
  stops early once every sample has produced EOS.

  Args:
    key: PRNG key from `jax.random.key`; the only source of randomness. A
      legacy `jax.random.PRNGKey` uint32 [2] key is wrapped with
      `jax.random.wrap_key_data`.
    params: language-model parameters from `models.init_lm`.
    config: the model shape (static under jit).
    prompt_tokens: [B, P] int right-padded prompts, every id (padding
      included) in [0, V). Nested lists are converted with `np.asarray`.
    prompt_lengths: [B] int valid tokens per prompt, in [1, P].
    num_samples: S, completions per prompt.
    max_new_tokens: L, completion length; P + L <= config.max_len.
    temperature: positive scalar; logits are divided by it before sampling.
      It is traced, so changing it does not recompile.
    eos_id: token in [0, V) that ends a completion, or None for
      fixed-length completions.
    pad_id: token in [0, V) written after EOS.

  Returns:
    A `SampleOutput` with [B, S, L] tokens, log-probabilities at the sampling
    temperature and at temperature 1, and the completion mask.

  Raises:
    ValueError: on inconsistent shapes, a sequence longer than the context,
      prompt lengths outside [1, P], a prompt token id outside [0, V), an
      `eos_id` or `pad_id` outside [0, V) or a non-positive temperature.
      Values inside arrays are checked only when the arrays are concrete.
      Under an outer jit they are not: there an id >= V (or < -V) reads a
      NaN embedding (Flax `nn.Embed` gathers with mode 'fill'), so every
      log-probability of that row is NaN and its tokens are meaningless, and
      an id in [-V, 0) wraps around to id + V like NumPy indexing.
    TypeError: on a key that is not a single PRNG key, or prompts that cannot
      be converted to an array.
  """
  return _validate_and_sample(
      _sample_cached,
      key,
      params,
      config,
      prompt_tokens,
      prompt_lengths,
      num_samples=num_samples,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      eos_id=eos_id,
      pad_id=pad_id,
  )


def sample_without_cache(
    key: jax.Array,
    params: Params,
    config: models.TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float | jax.Array = 1.0,
    eos_id: int | None,
    pad_id: int,
) -> SampleOutput:
  """Same contract and draws as `sample`, recomputing every position per step.

  Each step runs the full [B * S, P + L] sequences through the model, about
  P + L times the matrix-multiply work of a cached step. It serves as a reference
  implementation for tests and as the baseline in the sampling benchmark.
  Arguments, return value and errors are those of `sample`.
  """
  return _validate_and_sample(
      _sample_uncached,
      key,
      params,
      config,
      prompt_tokens,
      prompt_lengths,
      num_samples=num_samples,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      eos_id=eos_id,
      pad_id=pad_id,
  )


def join_prompt_completion(
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    completion_tokens: jax.Array,
    completion_mask: jax.Array,
    *,
    pad_id: int,
) -> tuple[jax.Array, jax.Array]:
  """Place each completion right after its prompt in one padded sequence.

  Row (b, s) of the result is the `prompt_lengths[b]` valid prompt tokens,
  then the completion tokens where `completion_mask` is True, then `pad_id`.
  This is the input that `models.reward_scores` expects.

  Args:
    prompt_tokens: [B, P] int right-padded prompts.
    prompt_lengths: [B] int valid tokens per prompt.
    completion_tokens: [B, S, L] int completions.
    completion_mask: [B, S, L] bool, True on each completion's valid prefix.
    pad_id: token written at padded positions.

  Returns:
    tokens: [B, S, P + L] int32 right-padded sequences.
    mask: [B, S, P + L] bool, True on the prompt and completion tokens.
  """
  if completion_tokens.ndim != 3:
    raise ValueError(
        'completion_tokens must have shape [B, S, L], got '
        f'{completion_tokens.shape}.'
    )
  if completion_mask.shape != completion_tokens.shape:
    raise ValueError(
        f'completion_mask shape {completion_mask.shape} does not match '
        f'completion_tokens shape {completion_tokens.shape}.'
    )
  batch, num_samples, completion_len = completion_tokens.shape
  if prompt_tokens.ndim != 2 or prompt_tokens.shape[0] != batch:
    raise ValueError(
        f'prompt_tokens must have shape [B, P] with B={batch}, got '
        f'{prompt_tokens.shape}.'
    )
  if prompt_lengths.shape != (batch,):
    raise ValueError(
        f'prompt_lengths must have shape ({batch},), got '
        f'{prompt_lengths.shape}.'
    )
  prompt_len = prompt_tokens.shape[1]
  total = prompt_len + completion_len

  positions = jnp.arange(total)[None, None, :]
  lengths = prompt_lengths.astype(jnp.int32)[:, None, None]
  in_prompt = positions < lengths
  offsets = jnp.clip(positions - lengths, 0, completion_len - 1)
  offsets = jnp.broadcast_to(offsets, (batch, num_samples, total))
  in_completion = jnp.logical_and(
      jnp.logical_and(
          positions >= lengths, positions < lengths + completion_len
      ),
      jnp.take_along_axis(completion_mask, offsets, axis=2),
  )
  prompt_part = jnp.pad(
      prompt_tokens.astype(jnp.int32), ((0, 0), (0, completion_len))
  )[:, None, :]
  completion_part = jnp.take_along_axis(
      completion_tokens.astype(jnp.int32), offsets, axis=2
  )
  tokens = jnp.where(
      in_prompt,
      prompt_part,
      jnp.where(in_completion, completion_part, pad_id),
  )
  mask = jnp.logical_or(in_prompt, in_completion)
  return tokens, mask


def completion_logprobs(
    params: Params,
    config: models.TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    completion_tokens: jax.Array,
    completion_mask: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
  """Compute per-token log-probabilities of given completions, uncached.

  Runs one forward pass over the joined [B * S, P + L] sequences and is
  differentiable in `params`. With `temperature=1` it gives the policy
  log-probabilities that the RL loss uses for the trained and the reference
  policy. With the sampling temperature it reproduces
  `SampleOutput.logprobs`.

  Args:
    params: language-model parameters from `models.init_lm`.
    config: the model shape.
    prompt_tokens: [B, P] int right-padded prompts.
    prompt_lengths: [B] int valid tokens per prompt, in [1, P].
    completion_tokens: [B, S, L] int completions, ids in [0, V) (checked
      when concrete, as in `sample`).
    completion_mask: [B, S, L] bool, True on each completion's valid prefix.
    temperature: positive scalar dividing the logits.

  Returns:
    [B, S, L] float32 log softmax(logits / temperature) of each completion
    token, 0 where `completion_mask` is False.
  """
  _check_temperature(temperature)
  batch, num_samples, completion_len = completion_tokens.shape
  _check_prompts(config, prompt_tokens, prompt_lengths, completion_len)
  _check_token_ids(completion_tokens, config.vocab_size, 'completion_tokens')
  # The content of padded positions never reaches a valid position.
  tokens, _ = join_prompt_completion(
      prompt_tokens,
      prompt_lengths,
      completion_tokens,
      completion_mask,
      pad_id=0,
  )
  rows = batch * num_samples
  logits = models.lm_logits(params, tokens.reshape(rows, -1), config)

  # Completion token i is predicted at position length - 1 + i.
  lengths = jnp.repeat(prompt_lengths.astype(jnp.int32), num_samples)
  positions = lengths[:, None] - 1 + jnp.arange(completion_len)[None, :]
  logits = logits[jnp.arange(rows)[:, None], positions]
  logprobs = jax.nn.log_softmax(logits / temperature, axis=-1)
  targets = completion_tokens.reshape(rows, completion_len, 1)
  logprobs = jnp.take_along_axis(logprobs, targets.astype(jnp.int32), axis=2)
  logprobs = logprobs.reshape(batch, num_samples, completion_len)
  return jnp.where(completion_mask, logprobs, 0.0)
