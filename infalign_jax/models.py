"""Causal transformer language model and reward model as pure functions.

Notation: B sequences, T tokens, C key-value cache slots, V vocabulary,
W width, H attention heads, D = W / H head width.

The architecture is a GPT-2-style decoder: token embeddings plus learned
absolute position embeddings, pre-layer-norm blocks (causal multi-head
attention, then a GELU MLP), a final layer norm, and an output projection tied
to the token embedding. There is no dropout, so every function here is
deterministic.

Padding convention: sequences are right-padded. Attention is causal, so the
output at position t depends only on tokens 0..t, and padding after the valid
prefix of a row never changes the outputs at its valid positions. Outputs at
padded positions are meaningless; callers mask them.

Why Flax Linen and not NNX: the rest of the library needs pure functions of
`(params, tokens)` that it can `jit`, `grad`, `vmap`, shard and checkpoint as
plain pytrees. Linen's `Module.apply(variables, ...)` is exactly such a
function, and its parameters are a nested dict. NNX modules hold their state,
so every boundary would need an `nnx.split`/`nnx.merge` pair. The key-value
cache is an explicit argument and return value (`KVCache`), not a mutable
Linen collection, for the same reason.

Compute runs in `TransformerConfig.dtype` (for example bfloat16); parameters,
layer-norm statistics, attention softmax, logits and reward scores are
float32.
"""

import dataclasses
import functools
import math
import numbers
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = (
    'KVCache',
    'TransformerConfig',
    'init_lm',
    'init_reward_model',
    'lm_decode_step',
    'lm_logits',
    'lm_prefill',
    'reward_scores',
)

Params = Any

_SUPPORTED_DTYPES = ('float32', 'bfloat16', 'float16')
# Added to attention scores of hidden keys. It is finite so that a query with
# every key hidden yields a uniform average instead of NaN.
_MASKED_SCORE = -1e9
_REWARD_POOLINGS = ('last', 'mean')
# Multiplier of the rolling n-gram hash (a prime, arithmetic modulo 2^32).
_NGRAM_HASH_MULTIPLIER = 1000003


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
  """Shape and numerics of the transformer; hashable, so static under jit.

  Attributes:
    vocab_size: V, number of token ids.
    width: W, model width (embedding size).
    num_layers: number of transformer blocks.
    num_heads: H, attention heads; must divide `width`.
    max_len: context length, the number of learned positions. A sequence
      (prompt plus completion) must fit in it.
    mlp_dim: hidden size of the MLP; `None` means 4 * width.
    dtype: compute dtype name: 'float32', 'bfloat16' or 'float16'.
    layer_norm_epsilon: epsilon of every layer norm.
    reward_pooling: how the reward model pools its final hidden states:
      'last' (the last valid token) or 'mean' (masked mean over valid
      tokens). Ignored by the language model.
    ngram_orders: reward model only: orders k of hashed token n-grams whose
      embeddings are added to each position's input, so a byte-level model can
      recognize words from its first layer. Each n-gram ends at its position, so
      causality and right-padding invariance hold. Empty means none. The
      language model rejects a non-empty value, because cached decoding
      feeds one token at a time.
    ngram_buckets: rows of each n-gram embedding table; n-grams are hashed
      into them.
  """

  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  max_len: int
  mlp_dim: int | None = None
  dtype: str = 'float32'
  layer_norm_epsilon: float = 1e-5
  reward_pooling: str = 'last'
  ngram_orders: tuple[int, ...] = ()
  ngram_buckets: int = 8192

  def __post_init__(self):
    for name in ('vocab_size', 'width', 'num_layers', 'num_heads', 'max_len'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f'TransformerConfig.{name} must be a positive int, got {value!r}.'
        )
    if self.width % self.num_heads:
      raise ValueError(
          f'TransformerConfig.width={self.width} is not divisible by '
          f'num_heads={self.num_heads}; choose a width that is a multiple '
          'of num_heads.'
      )
    if self.mlp_dim is not None and (
        not isinstance(self.mlp_dim, int)
        or isinstance(self.mlp_dim, bool)
        or self.mlp_dim < 1
    ):
      raise ValueError(
          'TransformerConfig.mlp_dim must be a positive int or None, got '
          f'{self.mlp_dim!r}.'
      )
    if self.dtype not in _SUPPORTED_DTYPES:
      raise ValueError(
          f'TransformerConfig.dtype={self.dtype!r} is not supported; use one '
          f'of {_SUPPORTED_DTYPES}.'
      )
    epsilon = self.layer_norm_epsilon
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, numbers.Real)
        or not 0 < epsilon < math.inf
    ):
      raise ValueError(
          'TransformerConfig.layer_norm_epsilon must be a positive finite '
          f'number such as 1e-5, got {epsilon!r}.'
      )
    if self.reward_pooling not in _REWARD_POOLINGS:
      raise ValueError(
          f'TransformerConfig.reward_pooling={self.reward_pooling!r} is not '
          f'supported; use one of {_REWARD_POOLINGS}.'
      )
    if not isinstance(self.ngram_orders, tuple) or any(
        not isinstance(k, int) or isinstance(k, bool) or k < 1
        for k in self.ngram_orders
    ):
      raise ValueError(
          'TransformerConfig.ngram_orders must be a tuple of positive ints '
          f'such as (2, 3, 4), got {self.ngram_orders!r}.'
      )
    buckets = self.ngram_buckets
    if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 1:
      raise ValueError(
          'TransformerConfig.ngram_buckets must be a positive int, got '
          f'{buckets!r}.'
      )

  @property
  def head_dim(self) -> int:
    """D, the width of one attention head."""
    return self.width // self.num_heads

  @property
  def hidden_dim(self) -> int:
    """Hidden size of the MLP."""
    return 4 * self.width if self.mlp_dim is None else self.mlp_dim

  @property
  def compute_dtype(self) -> jnp.dtype:
    """The compute dtype as a NumPy dtype."""
    return jnp.dtype(self.dtype)


class KVCache(NamedTuple):
  """Attention keys and values of every layer for autoregressive decoding.

  Attributes:
    keys: one [B, C, H, D] array per layer, in the compute dtype.
    values: one [B, C, H, D] array per layer, in the compute dtype.
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]


def _dense_init():
  return nn.initializers.normal(stddev=0.02)


def _residual_init(config: TransformerConfig):
  # GPT-2 scales the projections that write into the residual stream by
  # 1/sqrt(2 * num_layers) so its variance stays constant with depth.
  return nn.initializers.normal(stddev=0.02 / math.sqrt(2 * config.num_layers))


class _Block(nn.Module):
  """Pre-layer-norm block: causal self-attention, then an MLP."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x, attention_bias, cache, write_positions):
    """Apply the block.

    Args:
      x: [B, T, W] residual stream.
      attention_bias: [B, 1, T, C] float32, 0 for visible keys and
        `_MASKED_SCORE` for hidden ones.
      cache: `None`, or this layer's (keys, values), each [B, C, H, D]. With a
        cache, T must be 1.
      write_positions: [B] int32 cache slot of the new token; used only with
        a cache.

    Returns:
      The new residual stream [B, T, W] and this layer's (keys, values): the
      updated cache, or without a cache the [B, T, H, D] keys and values.
    """
    config = self.config
    dtype = config.compute_dtype
    heads = (config.num_heads, config.head_dim)

    h = nn.LayerNorm(
        epsilon=config.layer_norm_epsilon, dtype=dtype, name='attention_norm'
    )(x)
    query = nn.DenseGeneral(
        heads, dtype=dtype, kernel_init=_dense_init(), name='query'
    )(h)
    key = nn.DenseGeneral(
        heads, dtype=dtype, kernel_init=_dense_init(), name='key'
    )(h)
    value = nn.DenseGeneral(
        heads, dtype=dtype, kernel_init=_dense_init(), name='value'
    )(h)

    if cache is None:
      keys, values = key, value
    else:
      write = jax.vmap(
          lambda slots, new, index: jax.lax.dynamic_update_slice_in_dim(
              slots, new, index, axis=0
          )
      )
      keys = write(cache[0], key, write_positions)
      values = write(cache[1], value, write_positions)

    scores = jnp.einsum(
        'bqhd,bkhd->bhqk', query, keys, preferred_element_type=jnp.float32
    )
    scores = scores / math.sqrt(config.head_dim) + attention_bias
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    attended = jnp.einsum('bhqk,bkhd->bqhd', weights, values)
    x = x + nn.DenseGeneral(
        config.width,
        axis=(-2, -1),
        dtype=dtype,
        kernel_init=_residual_init(config),
        name='attention_out',
    )(attended)

    h = nn.LayerNorm(
        epsilon=config.layer_norm_epsilon, dtype=dtype, name='mlp_norm'
    )(x)
    h = nn.Dense(
        config.hidden_dim, dtype=dtype, kernel_init=_dense_init(), name='mlp_in'
    )(h)
    h = jax.nn.gelu(h)
    x = x + nn.Dense(
        config.width,
        dtype=dtype,
        kernel_init=_residual_init(config),
        name='mlp_out',
    )(h)
    return x, (keys, values)


class _Transformer(nn.Module):
  """Embeddings, blocks and final layer norm; the trunk of both models."""

  config: TransformerConfig

  def setup(self):
    config = self.config
    self.token_embed = nn.Embed(
        config.vocab_size,
        config.width,
        embedding_init=_dense_init(),
        name='token_embed',
    )
    self.position_embed = nn.Embed(
        config.max_len,
        config.width,
        embedding_init=nn.initializers.normal(stddev=0.01),
        name='position_embed',
    )
    self.blocks = [
        _Block(config, name=f'block_{i}') for i in range(config.num_layers)
    ]
    self.final_norm = nn.LayerNorm(
        epsilon=config.layer_norm_epsilon, dtype=jnp.float32, name='final_norm'
    )

  def __call__(
      self,
      tokens,
      positions,
      attention_bias,
      cache,
      write_positions,
      extra_embedding=None,
  ):
    """Return the final hidden states [B, T, W] float32 and the new cache."""
    x = self.token_embed(tokens) + self.position_embed(positions)
    if extra_embedding is not None:
      x = x + extra_embedding
    x = x.astype(self.config.compute_dtype)
    new_keys, new_values = [], []
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
      x, (keys, values) = block(x, attention_bias, layer_cache, write_positions)
      new_keys.append(keys)
      new_values.append(values)
    hidden = self.final_norm(x.astype(jnp.float32))
    return hidden, KVCache(tuple(new_keys), tuple(new_values))

  def logits(self, hidden):
    """Project float32 hidden states [..., W] onto the vocabulary, float32."""
    embedding = self.token_embed.embedding.astype(jnp.float32)
    return jnp.einsum('...w,vw->...v', hidden.astype(jnp.float32), embedding)


def _ngram_ids(tokens: jax.Array, order: int, buckets: int) -> jax.Array:
  """[B, T] bucket of the n-gram of `order` tokens ending at each position.

  Positions before the start of the row count as token -1, so a short prefix
  hashes apart from any real n-gram.
  """
  length = tokens.shape[1]
  shifted_in = tokens.astype(jnp.uint32) + jnp.uint32(1)
  hashed = jnp.zeros_like(shifted_in)
  for offset in range(order):
    previous = jnp.pad(shifted_in, ((0, 0), (offset, 0)))[:, :length]
    hashed = hashed * jnp.uint32(_NGRAM_HASH_MULTIPLIER) + previous
  return (hashed % jnp.uint32(buckets)).astype(jnp.int32)


class _RewardModel(nn.Module):
  """Transformer trunk with a scalar head on pooled final hidden states."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens, mask):
    config = self.config
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    ngram_embedding = None
    for order in config.ngram_orders:
      table = nn.Embed(
          config.ngram_buckets,
          config.width,
          embedding_init=nn.initializers.normal(stddev=0.02),
          name=f'ngram_embed_{order}',
      )
      embedded = table(_ngram_ids(tokens, order, config.ngram_buckets))
      ngram_embedding = (
          embedded if ngram_embedding is None else ngram_embedding + embedded
      )
    hidden, _ = _Transformer(config, name='trunk')(
        tokens,
        positions,
        _causal_bias(length),
        None,
        None,
        extra_embedding=ngram_embedding,
    )
    if config.reward_pooling == 'mean':
      weights = mask.astype(jnp.float32)
      count = jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1.0)
      pooled = jnp.sum(hidden * weights[..., None], axis=1) / count
    else:
      last = jnp.maximum(jnp.sum(mask, axis=1, dtype=jnp.int32) - 1, 0)
      pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    score = nn.Dense(
        1,
        dtype=jnp.float32,
        kernel_init=nn.initializers.normal(stddev=0.02),
        name='head',
    )(pooled)
    return score[:, 0]


def _causal_bias(length: int) -> jax.Array:
  """[1, 1, T, T] float32 bias that hides keys after each query."""
  visible = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
  return jnp.where(visible, 0.0, _MASKED_SCORE)[None, None]


def _check_tokens(tokens, config: TransformerConfig, name: str = 'tokens'):
  if tokens.ndim != 2:
    raise ValueError(
        f'{name} must have shape [B, T], got shape {tokens.shape}.'
    )
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f'{name} must be an integer array, got {tokens.dtype}.')
  if tokens.shape[1] > config.max_len:
    raise ValueError(
        f'{name} has {tokens.shape[1]} positions but config.max_len is '
        f'{config.max_len}; shorten the sequences or raise max_len.'
    )


def _check_lm_config(config: TransformerConfig) -> None:
  if config.ngram_orders:
    raise ValueError(
        f'TransformerConfig.ngram_orders={config.ngram_orders} is a '
        'reward-model option; the language model needs ngram_orders=() '
        'because cached decoding feeds one token at a time.'
    )


@functools.partial(jax.jit, static_argnames='config')
def init_lm(key: jax.Array, config: TransformerConfig) -> Params:
  """Initialize language-model parameters.

  Args:
    key: PRNG key.
    config: the model shape.

  Returns:
    A nested dict of float32 parameters. The function is compiled with jit,
    because op-by-op Flax initialization is slow.
  """
  _check_lm_config(config)
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = _Transformer(config).init(
      key, tokens, tokens, _causal_bias(1), None, None
  )
  return variables['params']


def lm_logits(
    params: Params, tokens: jax.Array, config: TransformerConfig
) -> jax.Array:
  """Compute next-token logits at every position of right-padded sequences.

  Args:
    params: parameters from `init_lm`.
    tokens: [B, T] int token ids, T <= config.max_len, right-padded.
    config: the model shape.

  Returns:
    [B, T, V] float32 logits; row t is the distribution of token t + 1 given
    tokens 0..t. Because attention is causal, padding after a row's valid
    prefix does not change the logits at valid positions.
  """
  _check_lm_config(config)
  _check_tokens(tokens, config)
  batch, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  model = _Transformer(config)
  hidden, _ = model.apply(
      {'params': params}, tokens, positions, _causal_bias(length), None, None
  )
  return model.apply({'params': params}, hidden, method=_Transformer.logits)


def lm_prefill(
    params: Params,
    tokens: jax.Array,
    lengths: jax.Array,
    config: TransformerConfig,
    *,
    cache_size: int,
) -> tuple[jax.Array, KVCache]:
  """Run right-padded prompts through the model and build a decoding cache.

  Args:
    params: parameters from `init_lm`.
    tokens: [B, P] int right-padded prompts.
    lengths: [B] int number of valid tokens per row, in [1, P].
    config: the model shape.
    cache_size: C >= P, number of cache slots. Slot j stores position j.

  Returns:
    logits: [B, V] float32 next-token logits after each row's last valid
      token (position `lengths - 1`).
    cache: a `KVCache` whose slots 0..lengths-1 hold the prompt. The other
      slots contain values that `lm_decode_step` hides until it overwrites
      them.
  """
  _check_lm_config(config)
  _check_tokens(tokens, config)
  batch, length = tokens.shape
  if cache_size < length:
    raise ValueError(
        f'cache_size={cache_size} is smaller than the prompt length {length}.'
    )
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  model = _Transformer(config)
  hidden, cache = model.apply(
      {'params': params}, tokens, positions, _causal_bias(length), None, None
  )
  last = jnp.clip(lengths.astype(jnp.int32) - 1, 0, length - 1)
  last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  logits = model.apply(
      {'params': params}, last_hidden, method=_Transformer.logits
  )
  padding = ((0, 0), (0, cache_size - length), (0, 0), (0, 0))
  cache = KVCache(
      keys=tuple(jnp.pad(k, padding) for k in cache.keys),
      values=tuple(jnp.pad(v, padding) for v in cache.values),
  )
  return logits, cache


def lm_decode_step(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    config: TransformerConfig,
) -> tuple[jax.Array, KVCache]:
  """Feed one token per row and return the next-token logits.

  The token of row b sits at position `positions[b]`. Its key and value are
  written into cache slot `positions[b]`, and it attends to slots
  0..positions[b], which must all hold earlier tokens of the row.

  Args:
    params: parameters from `init_lm`.
    tokens: [B] int token ids.
    positions: [B] int positions, each < config.max_len and < C.
    cache: a `KVCache` with C slots, from `lm_prefill` or an earlier step.
    config: the model shape.

  Returns:
    [B, V] float32 logits of the following token, and the updated cache.
  """
  _check_lm_config(config)
  cache_size = cache.keys[0].shape[1]
  positions = positions.astype(jnp.int32)
  visible = jnp.arange(cache_size)[None, :] <= positions[:, None]
  attention_bias = jnp.where(visible, 0.0, _MASKED_SCORE)[:, None, None, :]
  model = _Transformer(config)
  hidden, cache = model.apply(
      {'params': params},
      tokens[:, None],
      positions[:, None],
      attention_bias,
      cache,
      positions,
  )
  logits = model.apply(
      {'params': params}, hidden[:, 0], method=_Transformer.logits
  )
  return logits, cache


@functools.partial(jax.jit, static_argnames='config')
def init_reward_model(
    key: jax.Array,
    config: TransformerConfig,
    *,
    trunk_params: Params | None = None,
) -> Params:
  """Initialize reward-model parameters.

  Args:
    key: PRNG key.
    config: shape of the trunk.
    trunk_params: optional language-model parameters from `init_lm` (or a
      trained language model) of the same config, copied into the trunk. The
      scalar head is always freshly initialized.

  Returns:
    A nested dict with 'trunk' (same structure as `init_lm`) and 'head'.
  """
  tokens = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1), jnp.bool_)
  params = _RewardModel(config).init(key, tokens, mask)['params']
  if trunk_params is not None:
    expected = jax.tree.structure(params['trunk'])
    if jax.tree.structure(trunk_params) != expected:
      raise ValueError(
          'trunk_params does not have the structure of init_lm(key, config); '
          'pass language-model parameters made with the same config.'
      )
    params = {**params, 'trunk': trunk_params}
  return params


def reward_scores(
    params: Params,
    tokens: jax.Array,
    mask: jax.Array,
    config: TransformerConfig,
) -> jax.Array:
  """Score right-padded sequences with the reward model.

  The score is a linear head on the pooled final hidden states, as
  `config.reward_pooling` selects. 'last' takes the last valid token, index
  `sum(mask) - 1`: with causal attention that state has seen the whole valid
  sequence and no padding, and a row whose mask is all False is scored at
  position 0. 'mean' averages the valid positions (an all-False row scores
  the zero vector, i.e. the head's bias).

  Args:
    params: parameters from `init_reward_model`.
    tokens: [B, T] int right-padded token ids.
    mask: [B, T] bool, True on each row's valid prefix.
    config: shape of the trunk.

  Returns:
    [B] float32 scores.
  """
  _check_tokens(tokens, config)
  if mask.shape != tokens.shape:
    raise ValueError(
        f'mask shape {mask.shape} does not match tokens shape {tokens.shape}.'
    )
  return _RewardModel(config).apply({'params': params}, tokens, mask)
