"""Tests for infalign_jax.data.judge."""

import itertools
import pathlib

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
import pytest

from infalign_jax.data import fetch
from infalign_jax.data import judge

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL_DATA_DIR = REPO_ROOT / 'data'
requires_real_archive = pytest.mark.skipif(
    not fetch.archive_path(REAL_DATA_DIR).is_file(),
    reason=(
        f'{fetch.archive_path(REAL_DATA_DIR)} not fetched; run `make data`'
        ' (needs access to PyPI).'
    ),
)


def _reference_accuracy(scores, mean_ratings, min_gap):
  """Brute-force pairwise accuracy over every unordered pair."""
  credit = 0.0
  pairs = 0
  for i, j in itertools.combinations(range(len(scores)), 2):
    if abs(mean_ratings[i] - mean_ratings[j]) < min_gap:
      continue
    high, low = (i, j) if mean_ratings[i] > mean_ratings[j] else (j, i)
    pairs += 1
    if scores[high] > scores[low]:
      credit += 1.0
    elif scores[high] == scores[low]:
      credit += 0.5
  return credit / pairs, pairs


class PairwiseAccuracyTest(parameterized.TestCase):

  def test_by_hand(self):
    # Pairs with gap >= 1: (0,1) gap 2, (0,2) gap 3, (0,3) gap 2.5 and (1,2)
    # gap 1; (1,3) and (2,3) differ by 0.5. The scores order (0,1) and (0,3)
    # right, tie on (0,2) and order (1,2) wrong.
    scores = np.array([0.5, 0.9, 0.5, 0.0])
    mean_ratings = np.array([3.0, 1.0, 0.0, 0.5])
    self.assertAlmostEqual(
        judge.pairwise_accuracy(scores, mean_ratings), (1 + 0.5 + 1 + 0) / 4
    )
    self.assertEqual(judge.count_pairs(mean_ratings), 4)

  def test_min_gap_selects_pairs(self):
    scores = np.array([0.5, 0.9, 0.5, 0.0])
    mean_ratings = np.array([3.0, 1.0, 0.0, 0.5])
    # Only (0,2), tied, and (0,3), right, have gaps >= 2.5.
    self.assertEqual(
        judge.pairwise_accuracy(scores, mean_ratings, min_gap=2.5), 0.75
    )

  def test_blocks_match_dense_reference(self):
    # 2,100 texts make 2 row blocks: 2**22 // 2,100 = 1,997 rows, then 103.
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, size=2_100).astype(np.float64)
    mean_ratings = rng.uniform(-4, 4, size=2_100)
    rating_gaps = mean_ratings[:, None] - mean_ratings[None, :]
    score_gaps = scores[:, None] - scores[None, :]
    is_pair = rating_gaps >= 1.0
    credits = (score_gaps > 0) + 0.5 * (score_gaps == 0)
    self.assertAlmostEqual(
        judge.pairwise_accuracy(scores, mean_ratings),
        credits[is_pair].mean(),
        places=12,
    )
    self.assertEqual(judge.count_pairs(mean_ratings), is_pair.sum())

  @hypothesis.settings(max_examples=100, deadline=None)
  @hypothesis.given(
      hnp.arrays(
          np.float64,
          st.integers(2, 12),
          elements=st.integers(-3, 3).map(float),
      ),
      st.data(),
  )
  def test_properties(self, mean_ratings, data):
    scores = data.draw(
        hnp.arrays(
            np.float64,
            mean_ratings.shape,
            elements=st.integers(-2, 2).map(float),
        )
    )
    hypothesis.assume(judge.count_pairs(mean_ratings) > 0)
    accuracy = judge.pairwise_accuracy(scores, mean_ratings)
    expected, _ = _reference_accuracy(scores, mean_ratings, 1.0)
    self.assertAlmostEqual(accuracy, expected, places=12)
    # Reversing the scores swaps right and wrong and keeps ties.
    self.assertAlmostEqual(
        accuracy + judge.pairwise_accuracy(-scores, mean_ratings), 1.0
    )
    # Only the order of the scores matters.
    self.assertAlmostEqual(
        judge.pairwise_accuracy(np.exp(scores) * 3 + 1, mean_ratings), accuracy
    )
    # The ratings themselves order every pair correctly.
    self.assertEqual(judge.pairwise_accuracy(mean_ratings, mean_ratings), 1.0)

  @parameterized.named_parameters(
      ('shape_mismatch', [1.0, 2.0], [1.0, 2.0, 3.0], 1.0, 'shape'),
      ('matrix', [[1.0, 2.0]], [[1.0, 3.0]], 1.0, 'shape'),
      ('nan', [1.0, np.nan], [0.0, 2.0], 1.0, 'finite'),
      ('zero_gap', [1.0, 2.0], [0.0, 2.0], 0.0, 'min_gap must be > 0'),
      ('no_pairs', [1.0, 2.0], [0.0, 0.5], 1.0, 'No pair of the 2 texts'),
  )
  def test_invalid_inputs(self, scores, mean_ratings, min_gap, message):
    with self.assertRaisesRegex(ValueError, message):
      judge.pairwise_accuracy(
          np.array(scores), np.array(mean_ratings), min_gap=min_gap
      )


class VaderCompoundTest(absltest.TestCase):

  def test_matches_analyzer(self):
    from vaderSentiment import vaderSentiment

    texts = ['What a wonderful, moving film!', 'Dull and awful.', '', 'A\ufffd']
    scores = judge.vader_compound(texts)
    analyzer = vaderSentiment.SentimentIntensityAnalyzer()
    expected = [analyzer.polarity_scores(text)['compound'] for text in texts]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    self.assertEqual(scores.dtype, np.float32)
    self.assertEqual(scores.shape, (4,))

  def test_sign_and_range(self):
    positive, negative, neutral = judge.vader_compound(
        ['What a wonderful, moving film!', 'Dull and awful.', 'It is a film.']
    )
    self.assertGreater(positive, 0.5)
    self.assertLess(negative, -0.5)
    self.assertEqual(neutral, 0.0)

  def test_rejects_single_string(self):
    with self.assertRaisesRegex(TypeError, 'wrap it in a list'):
      judge.vader_compound('good')

  @requires_real_archive
  def test_movie_review_test_pairs(self):
    from infalign_jax.data import vader_ratings

    examples = vader_ratings.load_examples(
        'test', REAL_DATA_DIR, subsets=('movie_reviews',)
    )
    scores = judge.vader_compound([e['text'] for e in examples])
    mean_ratings = np.array([e['mean_rating'] for e in examples])
    accuracy = judge.pairwise_accuracy(scores, mean_ratings)
    # VADER agrees with the raters well above chance but far from perfectly:
    # 0.72 on this split, 0.70 on all 10,605 movie-review sentences.
    self.assertBetween(accuracy, 0.65, 0.78)
    self.assertGreater(judge.count_pairs(mean_ratings), 100_000)


if __name__ == '__main__':
  absltest.main()
