"""Prompts: the opening words of movie-review sentences.

A prompt is the first `num_words` whitespace-separated words of a sentence
followed by one space, so the policy continues with the next word. Sentences
too short to leave `min_continuation_words` words after the prompt, and
prompts longer than `max_prompt_bytes` in UTF-8, are dropped; duplicates are
kept once. The survivors are shuffled with a fixed seed and the first `count`
are used.
"""

from collections.abc import Sequence

import numpy as np


def make_prompts(
    texts: Sequence[str],
    *,
    num_words: int,
    min_continuation_words: int,
    max_prompt_bytes: int,
    count: int,
    seed: int,
    source: str,
) -> list[str]:
  """Select up to `count` distinct prompts from `texts`.

  Args:
    texts: sentences to take the opening words of.
    num_words: words per prompt (>= 1).
    min_continuation_words: words a sentence must have after the prompt.
    max_prompt_bytes: maximum prompt length kept, in UTF-8 bytes (with the
      trailing space).
    count: maximum number of prompts returned (>= 1).
    seed: seed of the shuffle that picks which prompts are used.
    source: name of the texts (for example 'movie_reviews/test'), used in the
      error message.

  Returns:
    Up to `count` prompts, each ending in a space. Fewer only when fewer
    survive the filters.

  Raises:
    ValueError: a non-positive `num_words` or `count`, or no prompt survives
      the filters.
  """
  if num_words < 1:
    raise ValueError(f'num_words must be >= 1, got {num_words}.')
  if count < 1:
    raise ValueError(f'count must be >= 1, got {count}.')
  seen = set()
  candidates = []
  for text in texts:
    words = text.split()
    if len(words) < num_words + min_continuation_words:
      continue
    prompt = ' '.join(words[:num_words]) + ' '
    if len(prompt.encode('utf-8')) > max_prompt_bytes or prompt in seen:
      continue
    seen.add(prompt)
    candidates.append(prompt)
  if not candidates:
    raise ValueError(
        f'No prompts remain in {source} ({len(texts)} texts) after filtering: '
        f'every text has fewer than {num_words + min_continuation_words} '
        f'words or an opening of {num_words} words longer than '
        f'{max_prompt_bytes} bytes. Lower config.prompts.num_words or '
        'min_continuation_words, or raise max_prompt_bytes.'
    )
  order = np.random.default_rng(seed).permutation(len(candidates))
  return [candidates[i] for i in order[:count]]
