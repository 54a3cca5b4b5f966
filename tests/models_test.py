"""Tests for the transformer language model and reward model."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import models

_CONFIG = models.TransformerConfig(
    vocab_size=13, width=16, num_layers=2, num_heads=2, max_len=12
)
# Op-by-op (eager) Flax is slow on CPU, so most tests call jitted functions.
_lm_logits = jax.jit(models.lm_logits, static_argnums=2)
_reward_scores = jax.jit(models.reward_scores, static_argnums=3)


_saved_disable_most_optimizations = None


def setUpModule():
  # Compilation dominates these tests; XLA optimizations do not pay off.
  global _saved_disable_most_optimizations
  _saved_disable_most_optimizations = jax.config.read(
      'jax_disable_most_optimizations'
  )
  jax.config.update('jax_disable_most_optimizations', True)


def tearDownModule():
  jax.config.update(
      'jax_disable_most_optimizations', _saved_disable_most_optimizations
  )


def _numpy_layer_norm(x, params, epsilon):
  mean = x.mean(-1, keepdims=True)
  variance = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(variance + epsilon) * params['scale'] + params[
      'bias'
  ]


def _numpy_gelu(x):
  # jax.nn.gelu defaults to the tanh approximation.
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _numpy_lm_logits(params, tokens, config):
  """Plain NumPy forward pass of the documented architecture, float64."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  eps = config.layer_norm_epsilon
  length = tokens.shape[1]
  x = params['token_embed']['embedding'][tokens]
  x = x + params['position_embed']['embedding'][np.arange(length)]
  causal = np.tril(np.ones((length, length), bool))
  for i in range(config.num_layers):
    block = params[f'block_{i}']
    h = _numpy_layer_norm(x, block['attention_norm'], eps)
    q, k, v = (
        np.einsum('btw,whd->bthd', h, block[name]['kernel'])
        + block[name]['bias']
        for name in ('query', 'key', 'value')
    )
    scores = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(config.head_dim)
    scores = np.where(causal, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum('bhqk,bkhd->bqhd', weights, v)
    x = x + np.einsum(
        'bqhd,hdw->bqw', attended, block['attention_out']['kernel']
    )
    x = x + block['attention_out']['bias']
    h = _numpy_layer_norm(x, block['mlp_norm'], eps)
    h = _numpy_gelu(h @ block['mlp_in']['kernel'] + block['mlp_in']['bias'])
    x = x + h @ block['mlp_out']['kernel'] + block['mlp_out']['bias']
  x = _numpy_layer_norm(x, params['final_norm'], eps)
  return x @ params['token_embed']['embedding'].T


def _random_tokens(seed, shape, vocab_size=_CONFIG.vocab_size):
  return jnp.asarray(
      np.random.default_rng(seed).integers(0, vocab_size, shape), jnp.int32
  )


class TransformerConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('zero_vocab', dict(vocab_size=0)),
      ('negative_width', dict(width=-4)),
      ('float_layers', dict(num_layers=2.0)),
      ('heads_not_dividing_width', dict(num_heads=3)),
      ('zero_mlp_dim', dict(mlp_dim=0)),
      ('unknown_dtype', dict(dtype='int8')),
      ('zero_epsilon', dict(layer_norm_epsilon=0.0)),
      ('bool_vocab', dict(vocab_size=True)),
      ('bool_mlp_dim', dict(mlp_dim=True)),
      ('infinite_epsilon', dict(layer_norm_epsilon=float('inf'))),
      ('nan_epsilon', dict(layer_norm_epsilon=float('nan'))),
      ('string_epsilon', dict(layer_norm_epsilon='1e-5')),
      ('unknown_pooling', dict(reward_pooling='max')),
      ('ngram_orders_list', dict(ngram_orders=[2, 3])),
      ('zero_ngram_order', dict(ngram_orders=(0,))),
      ('zero_ngram_buckets', dict(ngram_buckets=0)),
  )
  def test_rejects_invalid_field(self, override):
    fields = dict(
        vocab_size=13, width=16, num_layers=2, num_heads=2, max_len=12
    )
    fields.update(override)
    with self.assertRaises(ValueError):
      models.TransformerConfig(**fields)

  def test_hashable_and_equal_by_value(self):
    twin = models.TransformerConfig(
        vocab_size=13, width=16, num_layers=2, num_heads=2, max_len=12
    )
    self.assertEqual(hash(twin), hash(_CONFIG))
    self.assertEqual(twin, _CONFIG)
    self.assertEqual(_CONFIG.hidden_dim, 64)
    self.assertEqual(_CONFIG.head_dim, 8)

  def test_rejects_positional_arguments(self):
    with self.assertRaises(TypeError):
      models.TransformerConfig(13, 16, 2, 2, 12)  # pylint: disable=too-many-function-args


class LmLogitsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.params = models.init_lm(jax.random.key(0), _CONFIG)
    self.tokens = _random_tokens(0, (3, 9))

  @parameterized.named_parameters(('eager', False), ('jit', True))
  def test_matches_numpy_reference(self, use_jit):
    lm_logits = models.lm_logits
    if use_jit:
      lm_logits = jax.jit(lm_logits, static_argnums=2)
    logits = lm_logits(self.params, self.tokens, _CONFIG)
    expected = _numpy_lm_logits(self.params, np.asarray(self.tokens), _CONFIG)
    self.assertEqual(logits.shape, (3, 9, _CONFIG.vocab_size))
    self.assertEqual(logits.dtype, jnp.float32)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)

  def test_bfloat16_compute_returns_float32_logits(self):
    config = models.TransformerConfig(
        vocab_size=13,
        width=16,
        num_layers=2,
        num_heads=2,
        max_len=12,
        dtype='bfloat16',
    )
    logits = jax.jit(models.lm_logits, static_argnums=2)(
        self.params, self.tokens, config
    )
    reference = _lm_logits(self.params, self.tokens, _CONFIG)
    self.assertEqual(logits.dtype, jnp.float32)
    np.testing.assert_allclose(logits, reference, atol=0.1)

  @hypothesis.settings(max_examples=15, deadline=None)
  @hypothesis.given(position=st.integers(0, 8), new_token=st.integers(0, 12))
  def test_causal(self, position, new_token):
    changed = self.tokens.at[:, position].set(new_token)
    before = _lm_logits(self.params, self.tokens, _CONFIG)
    after = _lm_logits(self.params, changed, _CONFIG)
    np.testing.assert_array_equal(before[:, :position], after[:, :position])

  def test_right_padding_does_not_change_valid_logits(self):
    padded = jnp.concatenate(
        [self.tokens, jnp.full((3, 3), 12, jnp.int32)], axis=1
    )
    short = _lm_logits(self.params, self.tokens, _CONFIG)
    long = _lm_logits(self.params, padded, _CONFIG)
    np.testing.assert_allclose(long[:, :9], short, atol=1e-6)

  def test_rejects_sequence_longer_than_context(self):
    with self.assertRaisesRegex(ValueError, 'max_len'):
      models.lm_logits(self.params, _random_tokens(0, (1, 13)), _CONFIG)

  def test_rejects_float_tokens(self):
    with self.assertRaisesRegex(ValueError, 'integer'):
      models.lm_logits(self.params, jnp.zeros((1, 3)), _CONFIG)


class DecodeTest(parameterized.TestCase):

  def test_prefill_and_decode_match_full_forward(self):
    params = models.init_lm(jax.random.key(1), _CONFIG)
    prompts = _random_tokens(1, (3, 5))
    lengths = jnp.array([5, 1, 3])
    continuation = _random_tokens(2, (3, 4))

    prefill = jax.jit(
        models.lm_prefill, static_argnames=('config', 'cache_size')
    )
    logits, cache = prefill(
        params, prompts, lengths, config=_CONFIG, cache_size=9
    )
    step = jax.jit(models.lm_decode_step, static_argnums=4)
    cached = [logits]
    for i in range(3):
      logits, cache = step(
          params, continuation[:, i], lengths + i, cache, _CONFIG
      )
      cached.append(logits)

    # Each row's prompt followed by its continuation, right-padded to 9.
    positions = jnp.arange(9)[None, :]
    offsets = jnp.clip(positions - lengths[:, None], 0, 3)
    sequences = jnp.where(
        positions < lengths[:, None],
        jnp.pad(prompts, ((0, 0), (0, 4))),
        jnp.take_along_axis(continuation, offsets, axis=1),
    )
    full = _lm_logits(params, sequences, _CONFIG)
    for i, logits in enumerate(cached):
      expected = full[jnp.arange(3), lengths - 1 + i]
      np.testing.assert_allclose(logits, expected, atol=1e-5, err_msg=f'{i=}')

  def test_prefill_rejects_small_cache(self):
    params = models.init_lm(jax.random.key(1), _CONFIG)
    with self.assertRaisesRegex(ValueError, 'cache_size'):
      models.lm_prefill(
          params,
          _random_tokens(1, (2, 5)),
          jnp.array([5, 2]),
          _CONFIG,
          cache_size=4,
      )


class RewardScoresTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.params = models.init_reward_model(jax.random.key(2), _CONFIG)
    self.tokens = _random_tokens(3, (3, 7))
    self.lengths = jnp.array([7, 2, 4])
    self.mask = jnp.arange(7)[None, :] < self.lengths[:, None]

  def test_shape_dtype_and_jit(self):
    scores = models.reward_scores(self.params, self.tokens, self.mask, _CONFIG)
    jitted = _reward_scores(self.params, self.tokens, self.mask, _CONFIG)
    self.assertEqual(scores.shape, (3,))
    self.assertEqual(scores.dtype, jnp.float32)
    np.testing.assert_allclose(jitted, scores, atol=1e-6)

  def test_padding_does_not_change_scores(self):
    scores = _reward_scores(self.params, self.tokens, self.mask, _CONFIG)
    # Different pad contents and three extra pad columns.
    noise = _random_tokens(4, (3, 10))
    padded_mask = jnp.arange(10)[None, :] < self.lengths[:, None]
    padded = jnp.where(
        padded_mask, jnp.pad(self.tokens, ((0, 0), (0, 3))), noise
    )
    padded_scores = _reward_scores(self.params, padded, padded_mask, _CONFIG)
    np.testing.assert_allclose(padded_scores, scores, atol=1e-6)

  def test_score_ignores_tokens_after_last_valid(self):
    scores = _reward_scores(self.params, self.tokens, self.mask, _CONFIG)
    # Row 1 has 2 valid tokens: scoring only those gives the same score.
    alone = _reward_scores(
        self.params,
        jnp.pad(self.tokens[1:2, :2], ((0, 0), (0, 5))),
        jnp.pad(jnp.ones((1, 2), bool), ((0, 0), (0, 5))),
        _CONFIG,
    )
    np.testing.assert_allclose(alone[0], scores[1], atol=1e-6)
    # Marking one more token valid changes the score.
    longer_mask = self.mask.at[1, 2].set(True)
    longer = _reward_scores(self.params, self.tokens, longer_mask, _CONFIG)
    self.assertGreater(abs(float(longer[1] - scores[1])), 1e-6)

  def test_trunk_params_are_copied(self):
    lm_params = models.init_lm(jax.random.key(5), _CONFIG)
    params = models.init_reward_model(
        jax.random.key(6), _CONFIG, trunk_params=lm_params
    )
    for got, want in zip(
        jax.tree.leaves(params['trunk']),
        jax.tree.leaves(lm_params),
        strict=True,
    ):
      np.testing.assert_array_equal(got, want)

  def test_rejects_trunk_params_of_other_config(self):
    other = models.TransformerConfig(
        vocab_size=13, width=16, num_layers=1, num_heads=2, max_len=12
    )
    with self.assertRaisesRegex(ValueError, 'trunk_params'):
      models.init_reward_model(
          jax.random.key(6),
          _CONFIG,
          trunk_params=models.init_lm(jax.random.key(5), other),
      )

  def test_rejects_mismatched_mask(self):
    with self.assertRaisesRegex(ValueError, 'mask shape'):
      models.reward_scores(self.params, self.tokens, self.mask[:, :3], _CONFIG)


_NGRAM_CONFIG = models.TransformerConfig(
    vocab_size=13,
    width=16,
    num_layers=1,
    num_heads=2,
    max_len=12,
    reward_pooling='mean',
    ngram_orders=(2, 3),
    ngram_buckets=64,
)


class NgramMeanRewardTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.params = models.init_reward_model(jax.random.key(7), _NGRAM_CONFIG)
    self.tokens = _random_tokens(8, (3, 7))
    self.lengths = jnp.array([7, 2, 4])
    self.mask = jnp.arange(7)[None, :] < self.lengths[:, None]

  def test_ngram_ids_match_python_hash(self):
    tokens = np.array([[4, 0, 12, 5]])
    ids = np.asarray(models._ngram_ids(jnp.asarray(tokens), 3, 64))
    for position in range(4):
      hashed = 0
      for offset in range(3):
        index = position - offset
        value = tokens[0, index] + 1 if index >= 0 else 0
        hashed = (hashed * 1000003 + value) % 2**32
      self.assertEqual(ids[0, position], hashed % 64)

  def test_padding_does_not_change_scores(self):
    scores = _reward_scores(self.params, self.tokens, self.mask, _NGRAM_CONFIG)
    noise = _random_tokens(9, (3, 10))
    padded_mask = jnp.arange(10)[None, :] < self.lengths[:, None]
    padded = jnp.where(
        padded_mask, jnp.pad(self.tokens, ((0, 0), (0, 3))), noise
    )
    padded_scores = _reward_scores(
        self.params, padded, padded_mask, _NGRAM_CONFIG
    )
    np.testing.assert_allclose(padded_scores, scores, atol=1e-6)

  def test_mean_pooling_by_hand(self):
    # With the head's kernel set to ones and bias to zero, the score is the
    # mean over valid positions of the sum of the final hidden features.
    params = jax.tree.map(lambda x: x, self.params)
    params['head'] = {
        'kernel': jnp.ones_like(params['head']['kernel']),
        'bias': jnp.zeros_like(params['head']['bias']),
    }
    row_one = _reward_scores(params, self.tokens, self.mask, _NGRAM_CONFIG)
    per_position = [
        _reward_scores(
            params,
            self.tokens[1:2],
            jnp.arange(7)[None, :] == position,
            _NGRAM_CONFIG,
        )
        for position in range(2)
    ]
    # A one-position mask pools that position alone; causality makes each
    # position's state independent of the mask.
    np.testing.assert_allclose(
        row_one[1], (per_position[0][0] + per_position[1][0]) / 2, atol=1e-5
    )

  def test_ngram_tables_sit_beside_the_trunk(self):
    self.assertIn('ngram_embed_2', self.params)
    self.assertIn('ngram_embed_3', self.params)
    self.assertEqual(self.params['ngram_embed_2']['embedding'].shape, (64, 16))
    lm_config = models.TransformerConfig(
        vocab_size=13, width=16, num_layers=1, num_heads=2, max_len=12
    )
    lm_params = models.init_lm(jax.random.key(5), lm_config)
    params = models.init_reward_model(
        jax.random.key(6), _NGRAM_CONFIG, trunk_params=lm_params
    )
    np.testing.assert_array_equal(
        params['trunk']['token_embed']['embedding'],
        lm_params['token_embed']['embedding'],
    )

  def test_language_model_rejects_ngram_orders(self):
    with self.assertRaisesRegex(ValueError, 'reward-model option'):
      models.init_lm(jax.random.key(0), _NGRAM_CONFIG)


if __name__ == '__main__':
  absltest.main()
