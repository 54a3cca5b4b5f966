"""Tests for infalign_jax.data.tokenizer."""

from absl.testing import absltest
import hypothesis
from hypothesis import strategies as st
import numpy as np

from infalign_jax.data import tokenizer as tokenizer_lib


class ByteTokenizerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tokenizer = tokenizer_lib.ByteTokenizer()

  def test_special_ids_and_vocab_size(self):
    self.assertEqual(self.tokenizer.pad_id, 0)
    self.assertEqual(self.tokenizer.bos_id, 1)
    self.assertEqual(self.tokenizer.eos_id, 2)
    self.assertEqual(self.tokenizer.vocab_size, 259)

  def test_encode_by_hand(self):
    # 'é' is the two UTF-8 bytes 0xC3 0xA9.
    ids = self.tokenizer.encode('Aé')
    np.testing.assert_array_equal(ids, [1, 65 + 3, 0xC3 + 3, 0xA9 + 3, 2])
    self.assertEqual(ids.dtype, np.int32)

  def test_encode_without_specials(self):
    ids = self.tokenizer.encode('ab', add_bos=False, add_eos=False)
    np.testing.assert_array_equal(ids, [97 + 3, 98 + 3])
    no_bos = tokenizer_lib.ByteTokenizer(add_bos=False)
    np.testing.assert_array_equal(no_bos.encode('a'), [97 + 3, 2])

  def test_encode_lone_surrogate_becomes_question_mark(self):
    self.assertEqual(
        self.tokenizer.decode(self.tokenizer.encode('a\ud800')), 'a?'
    )

  def test_encode_rejects_bytes(self):
    with self.assertRaisesRegex(TypeError, 'expects a str'):
      self.tokenizer.encode(b'abc')

  def test_decode_stops_at_eos_and_skips_pad_bos(self):
    ids = [1, 104 + 3, 0, 105 + 3, 2, 120 + 3]
    self.assertEqual(self.tokenizer.decode(ids), 'hi')

  def test_decode_invalid_utf8_is_replaced(self):
    # 0xFF never occurs in UTF-8; 0xC3 alone is a truncated character.
    ids = [1, 0xFF + 3, 97 + 3, 0xC3 + 3]
    self.assertEqual(self.tokenizer.decode(ids), '\ufffda\ufffd')

  def test_decode_rejects_out_of_range_ids(self):
    with self.assertRaisesRegex(ValueError, r'\[259, -1\]'):
      self.tokenizer.decode(np.array([3, 259, -1]))

  def test_decode_rejects_matrix(self):
    with self.assertRaisesRegex(ValueError, 'decode_batch'):
      self.tokenizer.decode(np.zeros((2, 3), np.int32))

  def test_encode_batch_pads_right(self):
    tokens, lengths = self.tokenizer.encode_batch(['ab', '', 'c'])
    np.testing.assert_array_equal(
        tokens,
        [[1, 100, 101, 2], [1, 2, 0, 0], [1, 102, 2, 0]],
    )
    np.testing.assert_array_equal(lengths, [4, 2, 3])
    self.assertEqual(tokens.dtype, np.int32)
    self.assertEqual(lengths.dtype, np.int32)

  def test_encode_batch_truncates_and_drops_eos(self):
    tokens, lengths = self.tokenizer.encode_batch(['abcdef', 'a'], max_length=4)
    np.testing.assert_array_equal(tokens, [[1, 100, 101, 102], [1, 100, 2, 0]])
    np.testing.assert_array_equal(lengths, [4, 3])

  def test_encode_batch_empty(self):
    tokens, lengths = self.tokenizer.encode_batch([])
    self.assertEqual(tokens.shape, (0, 0))
    self.assertEqual(lengths.shape, (0,))

  def test_encode_batch_rejects_bad_arguments(self):
    with self.assertRaisesRegex(TypeError, 'wrap it in a list'):
      self.tokenizer.encode_batch('abc')
    with self.assertRaisesRegex(ValueError, 'max_length must be >= 1'):
      self.tokenizer.encode_batch(['abc'], max_length=0)

  def test_decode_batch_with_lengths(self):
    tokens = np.array([[1, 100, 101, 102], [1, 103, 2, 0]])
    self.assertEqual(self.tokenizer.decode_batch(tokens), ['abc', 'd'])
    self.assertEqual(
        self.tokenizer.decode_batch(tokens, np.array([2, 4])), ['a', 'd']
    )
    with self.assertRaisesRegex(ValueError, 'lengths must have shape'):
      self.tokenizer.decode_batch(tokens, np.array([2]))

  @hypothesis.settings(max_examples=200, deadline=None)
  @hypothesis.given(st.text())
  def test_round_trip(self, text):
    # Hypothesis's default text alphabet excludes surrogates, so every text
    # has a UTF-8 encoding.
    ids = self.tokenizer.encode(text)
    self.assertEqual(self.tokenizer.decode(ids), text)
    self.assertEqual(len(ids), len(text.encode('utf-8')) + 2)
    self.assertTrue(np.all(ids < self.tokenizer.vocab_size))

  @hypothesis.settings(max_examples=100, deadline=None)
  @hypothesis.given(
      st.lists(st.text(max_size=20), max_size=5),
      st.integers(min_value=1, max_value=30),
  )
  def test_batch_round_trip(self, texts, max_length):
    tokens, lengths = self.tokenizer.encode_batch(texts, max_length=max_length)
    self.assertEqual(tokens.shape, (len(texts), max_length))
    for row, text in enumerate(texts):
      expected = self.tokenizer.encode(text)[:max_length]
      np.testing.assert_array_equal(tokens[row, : lengths[row]], expected)
      self.assertTrue(np.all(tokens[row, lengths[row] :] == 0))

  @hypothesis.settings(max_examples=200, deadline=None)
  @hypothesis.given(st.lists(st.integers(min_value=0, max_value=258)))
  def test_decode_never_raises_on_valid_ids(self, ids):
    self.assertIsInstance(self.tokenizer.decode(np.array(ids, np.int64)), str)


if __name__ == '__main__':
  absltest.main()
