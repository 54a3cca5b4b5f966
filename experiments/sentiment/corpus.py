"""The data stage: build the rated-sentence dataset and keep a compact copy.

The stage builds the TFDS dataset (from the archive in `data_dir`) and writes
each split as one JSON file of examples (id, subset, text, mean rating, raw
ratings), which every later stage reads in well under a second.
"""

from collections.abc import Sequence
import json
from typing import Any

from absl import logging
from etils import epath

from experiments import common
from infalign_jax.data import fetch
from infalign_jax.data.vader_ratings import vader_ratings

SPLITS = ('train', 'validation', 'test')


def archive_sha256(data_dir: str) -> str:
  """Verify the archive in `data_dir` and return its SHA-256.

  Raises:
    fetch.ArchiveMissingError: no archive; the message names the command
      that fetches it.
    fetch.ArchiveDamagedError: the archive is not the expected file.
  """
  fetch.ensure_archive(data_dir, allow_fetch=False)
  # ensure_archive checks the file against this hash.
  return fetch.SDIST_SHA256


def _decode(value: Any) -> Any:
  return value.decode('utf-8') if isinstance(value, bytes) else value


def build_splits(data_dir: str, directory: epath.Path) -> dict[str, Any]:
  """Build the dataset and write `<split>.json` into `directory`."""
  counts = {}
  for split in SPLITS:
    source = vader_ratings.load(split, data_dir)
    examples = []
    for index in range(len(source)):
      example = source[index]
      examples.append(
          {
              'id': _decode(example['id']),
              'subset': _decode(example['subset']),
              'text': _decode(example['text']),
              'mean_rating': float(example['mean_rating']),
              'ratings': [int(r) for r in example['ratings']],
          }
      )
    common.write_json_atomic(directory / f'{split}.json', examples)
    counts[split] = {}
    for example in examples:
      subset = example['subset']
      counts[split][subset] = counts[split].get(subset, 0) + 1
    logging.info(
        'Data: %s split, %d examples %s', split, len(examples), counts[split]
    )
  return {'counts': counts}


def read_split(
    directory: epath.Path, split: str, subsets: Sequence[str] | None = None
) -> list[dict[str, Any]]:
  """Read a split written by `build_splits`, keeping only `subsets`."""
  examples = json.loads((directory / f'{split}.json').read_text())
  if subsets is None:
    return examples
  unknown = set(subsets) - set(vader_ratings.SUBSETS)
  if unknown:
    raise ValueError(
        f'Unknown subsets {sorted(unknown)}; choose from '
        f'{list(vader_ratings.SUBSETS)}.'
    )
  return [example for example in examples if example['subset'] in subsets]
