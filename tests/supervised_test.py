"""Tests for the supervised LM and reward-model losses."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
import jax
from jax import test_util
import jax.numpy as jnp
import numpy as np
import optax

from infalign_jax import models
from infalign_jax import supervised
from infalign_jax import train

_CONFIG = models.TransformerConfig(
    vocab_size=13, width=16, num_layers=1, num_heads=2, max_len=8
)

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


def _prefix_mask(lengths, length):
  return jnp.arange(length)[None, :] < jnp.asarray(lengths)[:, None]


def _train(loss_fn, params, batch, num_steps):
  """Run `num_steps` of the shared train step; return the metrics of each."""
  optimizer = optax.adam(1e-2)
  state = train.init_train_state(params, optimizer, jax.random.key(0))
  step = jax.jit(train.make_train_step(loss_fn, optimizer))
  history = []
  for _ in range(num_steps):
    state, metrics = step(state, batch, None)
    history.append(jax.device_get(metrics))
  return history


class NextTokenLossTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    self.tokens = np.array([[1, 4, 0, 2], [3, 3, 2, 0]], np.int32)
    self.mask = np.array([[True, True, True, True], [True, True, False, False]])

  @parameterized.named_parameters(('eager', False), ('jit', True))
  def test_matches_numpy_reference(self, use_jit):
    loss = supervised.next_token_loss
    if use_jit:
      loss = jax.jit(loss)
    losses = loss(self.logits, self.tokens, self.mask)

    shifted = self.logits - self.logits.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = np.zeros((2, 3))
    for b in range(2):
      for t in range(3):
        if self.mask[b, t + 1]:
          expected[b, t] = -logprobs[b, t, self.tokens[b, t + 1]]
    self.assertEqual(losses.shape, (2, 3))
    self.assertEqual(losses.dtype, jnp.float32)
    np.testing.assert_allclose(losses, expected, rtol=1e-6)

  def test_gradients(self):
    def total(logits):
      return jnp.sum(supervised.next_token_loss(logits, self.tokens, self.mask))

    test_util.check_grads(total, (jnp.asarray(self.logits),), order=1)

  def test_rejects_mismatched_mask(self):
    with self.assertRaisesRegex(ValueError, 'mask shape'):
      supervised.next_token_loss(self.logits, self.tokens, self.mask[:, :3])


class BradleyTerryLossTest(parameterized.TestCase):

  @parameterized.named_parameters(('eager', False), ('jit', True))
  def test_values_and_gradients_by_hand(self, use_jit):
    chosen = jnp.array([1.0, 0.0, -2.0])
    rejected = jnp.array([0.0, 0.0, 1.0])
    loss = supervised.bradley_terry_loss
    if use_jit:
      loss = jax.jit(loss)

    # -log sigmoid(c - r) = log(1 + exp(r - c)).
    expected = [
        math.log1p(math.exp(-1.0)),
        math.log(2.0),
        math.log1p(math.e**3),
    ]
    np.testing.assert_allclose(loss(chosen, rejected), expected, rtol=1e-6)

    # d/dc = -sigmoid(r - c) and d/dr = +sigmoid(r - c).
    grad_chosen, grad_rejected = jax.grad(
        lambda c, r: jnp.sum(loss(c, r)), argnums=(0, 1)
    )(chosen, rejected)
    sigmoid = [1 / (1 + math.exp(-x)) for x in (-1.0, 0.0, 3.0)]
    np.testing.assert_allclose(grad_chosen, [-s for s in sigmoid], rtol=1e-6)
    np.testing.assert_allclose(grad_rejected, sigmoid, rtol=1e-6)

  def test_finite_for_large_gaps(self):
    chosen = jnp.array([-1e4, 1e4])
    rejected = jnp.array([1e4, -1e4])
    losses = supervised.bradley_terry_loss(chosen, rejected)
    np.testing.assert_allclose(losses, [2e4, 0.0])
    grads = jax.grad(
        lambda c: jnp.sum(supervised.bradley_terry_loss(c, rejected))
    )(chosen)
    np.testing.assert_allclose(grads, [-1.0, 0.0])

  @hypothesis.settings(max_examples=50, deadline=None)
  @hypothesis.given(
      chosen=st.floats(-30, 30, width=32), rejected=st.floats(-30, 30, width=32)
  )
  def test_swapping_pair_adds_margin(self, chosen, rejected):
    # softplus(x) - softplus(-x) = x, so swapping the pair changes the loss
    # by exactly the score margin, and the loss is never negative.
    chosen, rejected = jnp.array([chosen]), jnp.array([rejected])
    forward = supervised.bradley_terry_loss(chosen, rejected)
    swapped = supervised.bradley_terry_loss(rejected, chosen)
    self.assertGreaterEqual(float(forward[0]), 0.0)
    np.testing.assert_allclose(
        swapped - forward, chosen - rejected, rtol=1e-5, atol=1e-5
    )

  def test_rejects_mismatched_shapes(self):
    with self.assertRaises(ValueError):
      supervised.bradley_terry_loss(jnp.zeros(3), jnp.zeros(2))


class RatingRegressionLossTest(absltest.TestCase):

  def test_values_and_gradients(self):
    scores = jnp.array([1.0, -0.5])
    ratings = jnp.array([3.0, -0.5])
    np.testing.assert_allclose(
        supervised.rating_regression_loss(scores, ratings), [4.0, 0.0]
    )
    test_util.check_grads(
        lambda s: jnp.sum(supervised.rating_regression_loss(s, ratings)),
        (scores,),
        order=2,
    )

  def test_rejects_mismatched_shapes(self):
    with self.assertRaises(ValueError):
      supervised.rating_regression_loss(jnp.zeros(3), jnp.zeros((3, 1)))


@jax.jit
def _pooled_features(params, tokens, mask):
  """[B, W] final hidden state the head reads, via one-hot head kernels."""
  width = _CONFIG.width

  def feature(j):
    head = {
        'kernel': jnp.zeros((width, 1)).at[j, 0].set(1.0),
        'bias': jnp.zeros(1),
    }
    return models.reward_scores({**params, 'head': head}, tokens, mask, _CONFIG)

  return jax.vmap(feature)(jnp.arange(width)).T


class RewardLossFnTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(1)
    self.params = models.init_reward_model(jax.random.key(1), _CONFIG)
    self.chosen = jnp.asarray(rng.integers(0, 13, (4, 6)), jnp.int32)
    self.rejected = jnp.asarray(rng.integers(0, 13, (4, 6)), jnp.int32)
    self.chosen_mask = _prefix_mask([6, 3, 5, 2], 6)
    self.rejected_mask = _prefix_mask([4, 6, 1, 6], 6)
    self.pairs = {
        'chosen_tokens': self.chosen,
        'chosen_mask': self.chosen_mask,
        'rejected_tokens': self.rejected,
        'rejected_mask': self.rejected_mask,
    }

  def test_bradley_terry_gradient_by_hand(self):
    loss_fn = supervised.make_bradley_terry_loss_fn(_CONFIG)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        self.params, self.pairs, None, jax.random.key(0)
    )

    chosen_features = _pooled_features(
        self.params, self.chosen, self.chosen_mask
    )
    rejected_features = _pooled_features(
        self.params, self.rejected, self.rejected_mask
    )
    kernel = self.params['head']['kernel'][:, 0]
    bias = self.params['head']['bias'][0]
    chosen_scores = chosen_features @ kernel + bias
    rejected_scores = rejected_features @ kernel + bias
    gap = rejected_scores - chosen_scores
    # loss = mean log(1 + exp(gap)); d gap / d kernel = rejected - chosen
    # features; the bias cancels in the gap, so its gradient is exactly 0.
    expected_loss = jnp.mean(jnp.log1p(jnp.exp(gap)))
    weights = jax.nn.sigmoid(gap)[:, None] / 4
    expected_kernel_grad = jnp.sum(
        weights * (rejected_features - chosen_features), axis=0
    )
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics['bt_loss'], loss)
    np.testing.assert_allclose(
        grads['head']['kernel'][:, 0], expected_kernel_grad, atol=1e-6
    )
    np.testing.assert_array_equal(grads['head']['bias'], 0.0)
    wins = np.mean(np.asarray(chosen_scores > rejected_scores, np.float64))
    np.testing.assert_allclose(metrics['preference_accuracy'], wins)

  def test_regression_loss_and_bias_gradient(self):
    loss_fn = supervised.make_rating_regression_loss_fn(_CONFIG)
    batch = {
        'tokens': self.chosen,
        'mask': self.chosen_mask,
        'ratings': jnp.array([1.0, -2.0, 0.5, 3.0]),
    }
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        self.params, batch, None, jax.random.key(0)
    )
    scores = jax.jit(models.reward_scores, static_argnums=3)(
        self.params, self.chosen, self.chosen_mask, _CONFIG
    )
    error = scores - batch['ratings']
    np.testing.assert_allclose(loss, jnp.mean(error**2), rtol=1e-5)
    np.testing.assert_allclose(metrics['mse'], loss)
    # d mean(error^2) / d bias = 2 mean(error).
    np.testing.assert_allclose(
        grads['head']['bias'][0], 2 * jnp.mean(error), rtol=1e-5
    )

  def test_missing_batch_key(self):
    loss_fn = supervised.make_bradley_terry_loss_fn(_CONFIG)
    pairs = dict(self.pairs)
    del pairs['rejected_mask']
    with self.assertRaisesRegex(ValueError, 'rejected_mask'):
      loss_fn(self.params, pairs, None, jax.random.key(0))


class MemorizationTest(absltest.TestCase):
  """A few steps of the shared train step fit a tiny data set."""

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(2)
    self.tokens = jnp.asarray(rng.integers(0, 13, (4, 8)), jnp.int32)
    self.mask = _prefix_mask([8, 8, 5, 6], 8)

  def test_lm_loss_decreases(self):
    params = models.init_lm(jax.random.key(3), _CONFIG)
    history = _train(
        supervised.make_lm_loss_fn(_CONFIG),
        params,
        {'tokens': self.tokens, 'mask': self.mask},
        num_steps=40,
    )
    first, last = history[0], history[-1]
    self.assertEqual(first['num_tokens'], 23)
    np.testing.assert_allclose(
        first['bits_per_token'], first['nll'] / math.log(2), rtol=1e-6
    )
    # Uniform guessing over 13 tokens costs log2(13) = 3.7 bits per token.
    self.assertGreater(first['bits_per_token'], 3.0)
    self.assertLess(last['bits_per_token'], 0.5 * first['bits_per_token'])
    self.assertGreater(last['token_accuracy'], 0.8)
    self.assertEqual(last['nonfinite_count'], 0)

  def test_rating_regression_decreases(self):
    params = models.init_reward_model(jax.random.key(4), _CONFIG)
    batch = {
        'tokens': self.tokens,
        'mask': self.mask,
        'ratings': jnp.array([2.0, -1.0, 0.5, -3.0]),
    }
    history = _train(
        supervised.make_rating_regression_loss_fn(_CONFIG),
        params,
        batch,
        num_steps=40,
    )
    self.assertGreater(history[0]['mse'], 1.0)
    self.assertLess(history[-1]['mse'], 0.1 * history[0]['mse'])

  def test_bradley_terry_decreases(self):
    params = models.init_reward_model(jax.random.key(5), _CONFIG)
    batch = {
        'chosen_tokens': self.tokens,
        'chosen_mask': self.mask,
        'rejected_tokens': self.tokens[::-1],
        'rejected_mask': self.mask[::-1],
    }
    # Pairs 0 and 3 are mirror images of each other (and so are 1 and 2), so
    # use only pairs 0 and 1 to keep the preferences consistent.
    batch = jax.tree.map(lambda x: x[:2], batch)
    history = _train(
        supervised.make_bradley_terry_loss_fn(_CONFIG),
        params,
        batch,
        num_steps=40,
    )
    self.assertAlmostEqual(history[0]['bt_loss'], math.log(2), delta=0.1)
    self.assertLess(history[-1]['bt_loss'], 0.1)
    self.assertEqual(history[-1]['preference_accuracy'], 1.0)


if __name__ == '__main__':
  absltest.main()
