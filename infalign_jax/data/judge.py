"""The VADER judge and pairwise agreement with human ratings.

Notation: B texts.

VADER (Hutto and Gilbert, ICWSM 2014) is a rule-based sentiment scorer built
from a human-rated lexicon. Its compound score in [-1, 1] serves the main job
twice: as a baseline reward model, and as a judge independent of the learned
reward model, which shows when an RL policy exploits that model. It needs the
`experiments` extra: `pip install -e '.[experiments]'` (vaderSentiment==3.3.2).

Measure VADER's agreement with the raters on the test split:

  python -m infalign_jax.data.judge --data_dir=data --split=test \\
      --subset=movie_reviews --min_gap=1.0

References:
  Hutto and Gilbert, "VADER: A parsimonious rule-based model for sentiment
  analysis of social media text", ICWSM 2014.
"""

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

# Each [rows, B] temporary of the pairwise comparison has at most this many
# elements (32 MiB of float64); a few of them are alive at once.
_MAX_BLOCK_ELEMENTS = 1 << 22


@functools.cache
def _analyzer() -> Any:
  try:
    from vaderSentiment import vaderSentiment
  except ImportError as e:
    raise ImportError(
        'The VADER judge needs the vaderSentiment package, which is not'
        " installed. Install it with `pip install -e '.[experiments]'` (or"
        ' `pip install vaderSentiment==3.3.2`).'
    ) from e
  return vaderSentiment.SentimentIntensityAnalyzer()


def vader_compound(texts: Sequence[str]) -> np.ndarray:
  """Scores texts with VADER's compound sentiment score.

  Args:
    texts: B strings. Invalid UTF-8 decoded with U+FFFD is fine.

  Returns:
    [B] float32 compound scores in [-1, 1]; 0 for text without sentiment
    words.
  """
  if isinstance(texts, str):
    raise TypeError(
        'vader_compound expects a sequence of str; wrap it in a list.'
    )
  analyzer = _analyzer()
  return np.array(
      [analyzer.polarity_scores(text)['compound'] for text in texts],
      dtype=np.float32,
  )


def _check_pair_inputs(
    scores: np.ndarray, mean_ratings: np.ndarray, min_gap: float
) -> None:
  if scores.ndim != 1 or scores.shape != mean_ratings.shape:
    raise ValueError(
        'scores and mean_ratings must both have shape [B], got'
        f' {scores.shape} and {mean_ratings.shape}.'
    )
  if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(mean_ratings))):
    raise ValueError(
        'scores and mean_ratings must be finite; found NaN or inf.'
    )
  if not min_gap > 0:
    raise ValueError(
        f'min_gap must be > 0, got {min_gap}; pairs with equal mean ratings'
        ' have no correct order.'
    )


def _pair_credits(
    scores: np.ndarray, mean_ratings: np.ndarray, min_gap: float
) -> tuple[float, int]:
  """Returns (sum of credits, number of pairs) over all qualifying pairs."""
  num_texts = scores.shape[0]
  block = max(1, _MAX_BLOCK_ELEMENTS // max(num_texts, 1))
  credit_sum = 0.0
  num_pairs = 0
  for start in range(0, num_texts, block):
    stop = min(start + block, num_texts)
    # Row i, column j: a pair counts once, with i the text rated higher.
    rating_gaps = mean_ratings[start:stop, None] - mean_ratings[None, :]
    is_pair = rating_gaps >= min_gap
    score_gaps = scores[start:stop, None] - scores[None, :]
    credits = np.where(score_gaps > 0, 1.0, np.where(score_gaps == 0, 0.5, 0.0))
    credit_sum += float(np.sum(credits, where=is_pair))
    num_pairs += int(np.count_nonzero(is_pair))
  return credit_sum, num_pairs


def count_pairs(mean_ratings: np.ndarray, *, min_gap: float = 1.0) -> int:
  """Counts the pairs that `pairwise_accuracy` compares.

  Args:
    mean_ratings: [B] mean human ratings.
    min_gap: see `pairwise_accuracy`.

  Returns:
    Number of unordered pairs whose mean ratings differ by at least `min_gap`.
  """
  mean_ratings = np.asarray(mean_ratings, dtype=np.float64)
  _check_pair_inputs(mean_ratings, mean_ratings, min_gap)
  return _pair_credits(mean_ratings, mean_ratings, min_gap)[1]


def pairwise_accuracy(
    scores: np.ndarray, mean_ratings: np.ndarray, *, min_gap: float = 1.0
) -> float:
  """Measures how often scores order text pairs the way the raters did.

  Every unordered pair (i, j) whose mean ratings differ by at least `min_gap`
  is compared, none sampled. A pair earns 1 when the text rated higher also
  scores higher, 1/2 when the two scores are equal, and 0 otherwise:

    accuracy = sum over pairs of credit / number of pairs.

  The rating gap is computed in float64, so two means written to 10 decimals
  that differ by exactly 1 can fall just below `min_gap=1.0`.

  Args:
    scores: [B] scores of any scale (a reward model, VADER).
    mean_ratings: [B] mean human ratings of the same texts.
    min_gap: smallest difference of mean ratings for a pair to count; > 0.

  Returns:
    Accuracy in [0, 1].

  Raises:
    ValueError: shapes differ or are not [B], values are not finite, min_gap
      <= 0, or no pair qualifies.
  """
  scores = np.asarray(scores, dtype=np.float64)
  mean_ratings = np.asarray(mean_ratings, dtype=np.float64)
  _check_pair_inputs(scores, mean_ratings, min_gap)

  credit_sum, num_pairs = _pair_credits(scores, mean_ratings, min_gap)
  if num_pairs == 0:
    raise ValueError(
        f'No pair of the {scores.shape[0]} texts has mean ratings that differ'
        f' by at least min_gap={min_gap}; pass more texts or a smaller'
        ' min_gap.'
    )
  return credit_sum / num_pairs


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported here so that the judge itself does not need TFDS.
  from infalign_jax.data import vader_ratings

  config = flags.FLAGS
  examples = vader_ratings.load_examples(
      config.split, config.data_dir, subsets=(config.subset,)
  )
  texts = [example['text'] for example in examples]
  mean_ratings = np.array([example['mean_rating'] for example in examples])
  accuracy = pairwise_accuracy(
      vader_compound(texts), mean_ratings, min_gap=config.min_gap
  )
  logging.info(
      'VADER pairwise accuracy on %s/%s: %.4f over %d pairs of %d texts'
      ' (min_gap=%g)',
      config.split,
      config.subset,
      accuracy,
      count_pairs(mean_ratings, min_gap=config.min_gap),
      len(texts),
      config.min_gap,
  )


if __name__ == '__main__':
  flags.DEFINE_string('data_dir', 'data', 'Data folder (see fetch.py).')
  flags.DEFINE_string('split', 'test', 'TFDS split to score.')
  flags.DEFINE_string('subset', 'movie_reviews', 'Subset to score.')
  flags.DEFINE_float(
      'min_gap', 1.0, 'Smallest difference of mean ratings for a pair.'
  )
  app.run(main)
