"""Small synthetic stand-ins for the VADER rating archive, for tests.

The files reproduce the quirks of the real ones. Lines are tab-separated and
end in CRLF, except the last, which has no line end. One ratings file starts
with a UTF-8 byte-order mark and lists its ids in another order than its
ground-truth file. Texts include non-ASCII characters, and ids have the form
'12' or '3_4'. The sentences are
made of positive and negative words that match their ratings, so a model
trained on them can learn something in a few steps. No real text is used.
"""

import io
import os
import pathlib
import tarfile
from collections.abc import Mapping

import numpy as np

from infalign_jax.data import fetch

_POSITIVE_WORDS = ('wonderful', 'great', 'charming', 'moving', 'superb')
_NEGATIVE_WORDS = ('dull', 'awful', 'tedious', 'clumsy', 'terrible')
_NOUNS = ('film', 'plot', 'cast', 'ending', 'score', 'café scene')


def _sentence(rng: np.random.Generator, level: int) -> str:
  noun = _NOUNS[rng.integers(len(_NOUNS))]
  if level > 0:
    words = rng.choice(_POSITIVE_WORDS, size=level, replace=True)
    return f'The {noun} is {" and ".join(words)}.'
  if level < 0:
    words = rng.choice(_NEGATIVE_WORDS, size=-level, replace=True)
    return f'The {noun} is {" and ".join(words)}.'
  return f'The {noun} lasts two hours.'


def _join_lines(lines: list[str], *, bom: bool) -> bytes:
  # CRLF between lines and none after the last one, as in the real files.
  text = '\r\n'.join(lines)
  return (b'\xef\xbb\xbf' if bom else b'') + text.encode('utf-8')


def synthetic_rating_files(
    *, examples_per_subset: int = 12, seed: int = 0
) -> dict[str, bytes]:
  """Returns {filename: bytes} for the eight rating files, like the archive's.

  Args:
    examples_per_subset: number of rated sentences in each of the 4 subsets.
    seed: NumPy seed for the sentences and ratings.

  Returns:
    The same keys as `fetch.read_rating_files` returns.
  """
  if examples_per_subset < 1:
    raise ValueError(
        f'examples_per_subset must be >= 1, got {examples_per_subset}.'
    )
  rng = np.random.default_rng(seed)
  files = {}
  for subset_index, prefix in enumerate(fetch.SUBSET_FILE_PREFIXES.values()):
    ground_truth_lines = []
    ratings_lines = []
    for row in range(examples_per_subset):
      # Movie reviews and tweets use plain numbers as ids, the other two
      # subsets 'document_sentence'.
      if subset_index < 2:
        example_id = str(row + 1)
      else:
        example_id = f'{row // 3 + 1}_{row % 3 + 1}'
      level = int(rng.integers(-3, 4))
      num_raters = int(rng.integers(5, 11))
      ratings = np.clip(
          level + rng.integers(-1, 2, size=num_raters), -4, 4
      ).tolist()
      mean = float(np.mean(ratings))
      ground_truth_lines.append(
          f'{example_id}\t{mean!r}\t{_sentence(rng, level)}'
      )
      ratings_lines.append(
          f'{example_id}\t{mean!r}\t{float(np.std(ratings)):.5f}\t{ratings}'
      )
    if subset_index == 3:
      # The real Amazon ratings file lists some ids in another order.
      ratings_lines = ratings_lines[::-1]
    files[prefix + fetch.GROUND_TRUTH_SUFFIX] = _join_lines(
        ground_truth_lines, bom=False
    )
    files[prefix + fetch.RATINGS_SUFFIX] = _join_lines(
        ratings_lines, bom=subset_index == 3
    )
  return files


def _add_bytes(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  archive.addfile(info, io.BytesIO(payload))


def write_archive(
    path: str | os.PathLike[str], files: Mapping[str, bytes]
) -> pathlib.Path:
  """Writes an archive shaped like the source distribution, containing `files`.

  The layout matches vaderSentiment 3.3.2: an outer .tar.gz with the member
  `fetch.RATINGS_MEMBER`, itself a .tar.gz with `hutto_ICWSM_2014/<filename>`
  for each entry of `files`.

  Args:
    path: where to write, usually `fetch.archive_path(data_dir)`.
    files: {filename: bytes}, for example from `synthetic_rating_files`.

  Returns:
    `path` as a pathlib.Path.
  """
  inner_buffer = io.BytesIO()
  with tarfile.open(fileobj=inner_buffer, mode='w:gz') as inner:
    for filename, payload in files.items():
      _add_bytes(inner, f'{fetch.RATINGS_FOLDER}/{filename}', payload)

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, mode='w:gz') as outer:
    _add_bytes(
        outer, 'vaderSentiment-3.3.2/PKG-INFO', b'Name: vaderSentiment\n'
    )
    _add_bytes(outer, fetch.RATINGS_MEMBER, inner_buffer.getvalue())
  return path
