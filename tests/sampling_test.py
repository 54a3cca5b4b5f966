"""Tests for KV-cached sampling and completion log-probabilities."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from infalign_jax import models
from infalign_jax import sampling

_CONFIG = models.TransformerConfig(
    vocab_size=6, width=16, num_layers=2, num_heads=2, max_len=16
)
_EOS = 5
_PAD = 0
# Three prompts of lengths 3, 1 and 2 in one right-padded batch.
_PROMPTS = jnp.array([[1, 2, 3, 0], [4, 0, 0, 0], [2, 2, 0, 0]], jnp.int32)
_LENGTHS = jnp.array([3, 1, 2], jnp.int32)
# Op-by-op (eager) Flax is slow on CPU, so the tests call jitted functions,
# mostly with the default shapes of `_sample` so that compilations are reused.
_completion_logprobs = jax.jit(sampling.completion_logprobs, static_argnums=1)
_lm_logits = jax.jit(models.lm_logits, static_argnums=2)


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


def _params(seed=0, scale=1.0):
  """Tiny LM; `scale` multiplies the tied embedding to sharpen the logits."""
  params = models.init_lm(jax.random.key(seed), _CONFIG)
  embed = params['token_embed']['embedding']
  return {**params, 'token_embed': {'embedding': embed * scale}}


def _sample(key, params, **kwargs):
  kwargs = (
      dict(
          num_samples=3,
          max_new_tokens=6,
          temperature=0.7,
          eos_id=_EOS,
          pad_id=_PAD,
      )
      | kwargs
  )
  prompts = kwargs.pop('prompts', _PROMPTS)
  lengths = kwargs.pop('lengths', _LENGTHS)
  return sampling.sample(key, params, _CONFIG, prompts, lengths, **kwargs)


class SampleTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.params = _params()

  def test_shapes_and_dtypes(self):
    out = _sample(jax.random.key(0), self.params)
    for name in ('tokens', 'logprobs', 'untempered_logprobs', 'mask'):
      self.assertEqual(getattr(out, name).shape, (3, 3, 6), msg=name)
    self.assertEqual(out.tokens.dtype, jnp.int32)
    self.assertEqual(out.logprobs.dtype, jnp.float32)
    self.assertEqual(out.mask.dtype, jnp.bool_)

  def test_cached_logprobs_match_uncached(self):
    out = _sample(jax.random.key(1), self.params)
    tempered = _completion_logprobs(
        self.params,
        _CONFIG,
        _PROMPTS,
        _LENGTHS,
        out.tokens,
        out.mask,
        temperature=0.7,
    )
    untempered = _completion_logprobs(
        self.params, _CONFIG, _PROMPTS, _LENGTHS, out.tokens, out.mask
    )
    np.testing.assert_allclose(out.logprobs, tempered, atol=1e-5)
    np.testing.assert_allclose(out.untempered_logprobs, untempered, atol=1e-5)
    self.assertTrue(np.all(np.asarray(out.logprobs)[np.asarray(out.mask)] < 0))

  def test_matches_sampler_without_cache(self):
    key = jax.random.key(2)
    cached = _sample(key, self.params)
    uncached = sampling.sample_without_cache(
        key,
        self.params,
        _CONFIG,
        _PROMPTS,
        _LENGTHS,
        num_samples=3,
        max_new_tokens=6,
        temperature=0.7,
        eos_id=_EOS,
        pad_id=_PAD,
    )
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_array_equal(cached.mask, uncached.mask)
    np.testing.assert_allclose(cached.logprobs, uncached.logprobs, atol=1e-5)

  def test_extra_prompt_padding_changes_nothing(self):
    key = jax.random.key(3)
    out = _sample(key, self.params)
    junk = jnp.array([[4, 1, 3]] * 3, jnp.int32)
    padded = jnp.concatenate([_PROMPTS, junk], axis=1)
    # Padding positions carry junk tokens, not pad_id, on purpose.
    padded = padded.at[1, 1:4].set(jnp.array([3, 3, 1]))
    padded_out = _sample(key, self.params, prompts=padded)
    np.testing.assert_array_equal(padded_out.tokens, out.tokens)
    np.testing.assert_array_equal(padded_out.mask, out.mask)
    np.testing.assert_allclose(padded_out.logprobs, out.logprobs, atol=1e-6)

  def test_extra_batch_rows_change_nothing(self):
    key = jax.random.key(4)
    out = _sample(key, self.params)
    more_prompts = jnp.concatenate([_PROMPTS, _PROMPTS[:2]], axis=0)
    more_lengths = jnp.concatenate([_LENGTHS, jnp.array([2, 4])])
    more = _sample(key, self.params, prompts=more_prompts, lengths=more_lengths)
    np.testing.assert_array_equal(more.tokens[:3], out.tokens)
    np.testing.assert_allclose(more.logprobs[:3], out.logprobs, atol=1e-6)

  def test_fewer_tokens_is_a_prefix(self):
    key = jax.random.key(5)
    out = _sample(key, self.params)
    short = _sample(key, self.params, max_new_tokens=3)
    np.testing.assert_array_equal(short.tokens, out.tokens[:, :, :3])
    np.testing.assert_allclose(
        short.logprobs, out.logprobs[:, :, :3], atol=1e-6
    )

  def test_eos_ends_completion(self):
    outs = [_sample(jax.random.key(100 + i), self.params) for i in range(8)]
    tokens = np.concatenate([np.asarray(o.tokens).reshape(-1, 6) for o in outs])
    mask = np.concatenate([np.asarray(o.mask).reshape(-1, 6) for o in outs])
    logprobs = np.concatenate(
        [np.asarray(o.logprobs).reshape(-1, 6) for o in outs]
    )
    ended = 0
    for row_tokens, row_mask, row_logprobs in zip(
        tokens, mask, logprobs, strict=True
    ):
      eos_positions = np.flatnonzero(row_tokens == _EOS)
      length = eos_positions[0] + 1 if eos_positions.size else 6
      ended += bool(eos_positions.size)
      np.testing.assert_array_equal(row_mask, np.arange(6) < length)
      np.testing.assert_array_equal(row_tokens[length:], _PAD)
      np.testing.assert_array_equal(row_logprobs[length:], 0.0)
    # About 1 in 6 draws is EOS, so both cases occur among 72 rows.
    self.assertGreater(ended, 10)
    self.assertLess(ended, tokens.shape[0])

  def test_stops_when_every_row_draws_eos(self):
    params = _params()
    # Zero the final norm scale and point its bias and the EOS embedding
    # along the first axis: the EOS logit is 100 and every other logit is
    # below 1, so every row draws EOS first.
    direction = jnp.zeros(16).at[0].set(10.0)
    embed = params['token_embed']['embedding'].at[_EOS].set(direction)
    params = {
        **params,
        'token_embed': {'embedding': embed},
        'final_norm': {'scale': jnp.zeros(16), 'bias': direction},
    }
    out = _sample(jax.random.key(7), params)
    np.testing.assert_array_equal(out.tokens[:, :, 0], _EOS)
    np.testing.assert_array_equal(out.tokens[:, :, 1:], _PAD)
    np.testing.assert_array_equal(out.mask[:, :, 0], True)
    np.testing.assert_array_equal(out.mask[:, :, 1:], False)

  def test_without_eos_every_position_is_valid(self):
    out = _sample(jax.random.key(8), self.params, eos_id=None)
    np.testing.assert_array_equal(out.mask, True)

  def test_temperature_one_logprobs_are_equal(self):
    out = _sample(jax.random.key(9), self.params, temperature=1.0)
    np.testing.assert_array_equal(out.logprobs, out.untempered_logprobs)

  def test_temperature_changes_logprobs(self):
    hot = _sample(jax.random.key(10), self.params, temperature=2.0)
    recomputed = _completion_logprobs(
        self.params,
        _CONFIG,
        _PROMPTS,
        _LENGTHS,
        hot.tokens,
        hot.mask,
        temperature=2.0,
    )
    np.testing.assert_allclose(hot.logprobs, recomputed, atol=1e-5)
    self.assertGreater(
        float(jnp.max(jnp.abs(hot.logprobs - hot.untempered_logprobs))), 1e-3
    )

  def test_inside_outer_jit_with_traced_lengths(self):
    key = jax.random.key(13)
    out = _sample(key, self.params)

    @jax.jit
    def sample_traced(key, params, lengths, temperature):
      return _sample(key, params, lengths=lengths, temperature=temperature)

    traced = sample_traced(key, self.params, _LENGTHS, jnp.float32(0.7))
    np.testing.assert_array_equal(traced.tokens, out.tokens)
    np.testing.assert_allclose(traced.logprobs, out.logprobs, atol=1e-6)

  @parameterized.named_parameters(
      ('zero_temperature', dict(temperature=0.0)),
      ('negative_temperature', dict(temperature=-1.0)),
      ('too_long', dict(max_new_tokens=13)),
      ('zero_new_tokens', dict(max_new_tokens=0)),
      ('zero_samples', dict(num_samples=0)),
      ('zero_length_prompt', dict(lengths=jnp.array([3, 0, 2]))),
      ('length_beyond_columns', dict(lengths=jnp.array([3, 5, 2]))),
      ('lengths_shape', dict(lengths=jnp.array([3, 1]))),
      ('prompt_rank', dict(prompts=_PROMPTS[0])),
  )
  def test_rejects_invalid_argument(self, override):
    with self.assertRaises(ValueError):
      _sample(jax.random.key(0), self.params, **override)

  @parameterized.named_parameters(
      ('id_above_vocab', dict(prompts=_PROMPTS.at[0, 1].set(99)), 'id 99'),
      ('negative_id', dict(prompts=_PROMPTS.at[2, 0].set(-5)), 'id -5'),
      ('id_in_padding', dict(prompts=_PROMPTS.at[1, 3].set(6)), 'id 6'),
      ('pad_id', dict(pad_id=-7), 'pad_id=-7'),
      ('eos_id', dict(eos_id=6), 'eos_id=6'),
  )
  def test_rejects_token_id_outside_vocabulary(self, override, named):
    with self.assertRaisesRegex(ValueError, named + r'.*\[0, V=6\)'):
      _sample(jax.random.key(0), self.params, **override)

  def test_legacy_key_and_lists_accepted(self):
    out = _sample(jax.random.key(3), self.params)
    legacy = _sample(
        jax.random.PRNGKey(3),
        self.params,
        prompts=_PROMPTS.tolist(),
        lengths=_LENGTHS.tolist(),
    )
    np.testing.assert_array_equal(legacy.tokens, out.tokens)
    np.testing.assert_array_equal(legacy.logprobs, out.logprobs)

  def test_rejects_key_that_is_not_one_key(self):
    with self.assertRaisesRegex(TypeError, 'jax.random.key'):
      _sample(jnp.zeros((3,), jnp.uint32), self.params)


class SampleDistributionTest(absltest.TestCase):

  def test_chi_square_two_token_frequencies(self):
    params = _params(seed=3, scale=3.0)
    temperature = 0.8
    num_samples = 20_000
    prompt = jnp.array([[1, 4]], jnp.int32)
    out = _sample(
        jax.random.key(11),
        params,
        prompts=prompt,
        lengths=jnp.array([2]),
        num_samples=num_samples,
        max_new_tokens=2,
        temperature=temperature,
        eos_id=None,
    )
    pairs = np.asarray(out.tokens[0])
    counts = np.zeros((6, 6))
    np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)

    # Exact joint probabilities of the 36 two-token completions, uncached.
    cells = jnp.array(list(itertools.product(range(6), repeat=2)), jnp.int32)
    sequences = jnp.concatenate(
        [jnp.broadcast_to(prompt, (36, 2)), cells], axis=1
    )
    logits = _lm_logits(params, sequences, _CONFIG)

    def joint(scale):
      logprobs = jax.nn.log_softmax(logits / scale, axis=-1)
      first = logprobs[jnp.arange(36), 1, cells[:, 0]]
      second = logprobs[jnp.arange(36), 2, cells[:, 1]]
      return np.exp(np.asarray(first + second, np.float64))

    expected = joint(temperature)
    self.assertAlmostEqual(expected.sum(), 1.0, places=5)
    self.assertGreater(expected.min() * num_samples, 5)
    _, p_value = stats.chisquare(
        counts.reshape(-1), expected / expected.sum() * num_samples
    )
    self.assertGreater(p_value, 1e-3)
    # The test has power: the untempered distribution is rejected.
    untempered = joint(1.0)
    self.assertGreater(untempered.min() * num_samples, 5)
    _, p_wrong = stats.chisquare(
        counts.reshape(-1), untempered / untempered.sum() * num_samples
    )
    self.assertLess(p_wrong, 1e-6)


class CompletionLogprobsTest(parameterized.TestCase):

  def test_matches_per_row_forward(self):
    params = _params(seed=1)
    completions = jnp.array([[[3, 5, 0]], [[1, 1, 2]], [[4, 2, 5]]], jnp.int32)
    mask = jnp.array(
        [[[True, True, False]], [[True, True, True]], [[True, True, True]]]
    )
    logprobs = _completion_logprobs(
        params, _CONFIG, _PROMPTS, _LENGTHS, completions, mask
    )
    for row in range(3):
      length = int(_LENGTHS[row])
      sequence = jnp.concatenate([_PROMPTS[row, :length], completions[row, 0]])
      # Pad every row to 7 tokens so that one compilation serves all rows.
      sequence = jnp.pad(sequence, (0, 7 - sequence.shape[0]))
      full = jax.nn.log_softmax(
          _lm_logits(params, sequence[None], _CONFIG)[0], axis=-1
      )
      for i in range(3):
        expected = full[length - 1 + i, completions[row, 0, i]]
        if not mask[row, 0, i]:
          expected = 0.0
        np.testing.assert_allclose(
            logprobs[row, 0, i], expected, atol=1e-5, err_msg=f'{row=} {i=}'
        )

  def test_gradient_is_finite_and_nonzero(self):
    params = _params(seed=1)
    out = _sample(jax.random.key(12), params)

    def total(params):
      return jnp.sum(
          _completion_logprobs(
              params, _CONFIG, _PROMPTS, _LENGTHS, out.tokens, out.mask
          )
      )

    grads = jax.jit(jax.grad(total))(params)
    leaves = jax.tree.leaves(grads)
    self.assertTrue(all(bool(jnp.all(jnp.isfinite(g))) for g in leaves))
    self.assertGreater(
        float(jnp.abs(grads['block_0']['query']['kernel']).max()), 0
    )

  def test_rejects_completion_token_outside_vocabulary(self):
    completions = jnp.array([[[3, 5, 0]], [[1, 9, 2]], [[4, 2, 5]]], jnp.int32)
    with self.assertRaisesRegex(ValueError, r'id 9 at index \(1, 0, 1\)'):
      sampling.completion_logprobs(
          _params(),
          _CONFIG,
          _PROMPTS,
          _LENGTHS,
          completions,
          jnp.ones(completions.shape, jnp.bool_),
      )


class JoinPromptCompletionTest(absltest.TestCase):

  def test_hand_example(self):
    prompts = jnp.array([[7, 8, 9], [6, 0, 0]], jnp.int32)
    lengths = jnp.array([2, 1])
    completions = jnp.array([[[1, 2]], [[3, 4]]], jnp.int32)
    mask = jnp.array([[[True, False]], [[True, True]]])
    tokens, joined_mask = sampling.join_prompt_completion(
        prompts, lengths, completions, mask, pad_id=-1
    )
    np.testing.assert_array_equal(
        tokens, [[[7, 8, 1, -1, -1]], [[6, 3, 4, -1, -1]]]
    )
    np.testing.assert_array_equal(
        joined_mask,
        [
            [[True, True, True, False, False]],
            [[True, True, True, False, False]],
        ],
    )

  def test_rejects_mismatched_mask(self):
    with self.assertRaisesRegex(ValueError, 'completion_mask'):
      sampling.join_prompt_completion(
          _PROMPTS,
          _LENGTHS,
          jnp.zeros((3, 2, 4), jnp.int32),
          jnp.ones((3, 2, 3), bool),
          pad_id=_PAD,
      )


if __name__ == '__main__':
  absltest.main()
