"""TFDS builder for the human-rated sentences published with VADER.

Hutto and Gilbert had each sentence rated by 15 to 99 people on an integer
scale from -4 (most negative) to +4 (most positive). The archive contains four
subsets:

| subset           | sentences | source                                   |
|------------------|-----------|------------------------------------------|
| `movie_reviews`  | 10,605    | sentences of movie reviews               |
| `tweets`         | 4,200     | tweets                                   |
| `nyt_editorials` | 5,190     | sentences of New York Times editorials   |
| `amazon_reviews` | 3,708     | sentences of Amazon product reviews      |

Features of each example:

- `id`: '<subset>/<id in the source file>', for example 'movie_reviews/17'
  or 'amazon_reviews/263_6'. Unique across subsets.
- `subset`: one of the four names above.
- `text`: the sentence from `*_GroundTruth.txt`, with surrounding whitespace
  removed and nothing else changed (tweets keep HTML entities such as '&amp;').
- `mean_rating`: mean rating from `*_GroundTruth.txt`, stored as float32
  (the data source returns it as a Python float). For 199 of the
  4,200 tweets this published value differs from the mean of the listed raw
  ratings (by up to 1.13); the builder keeps the published value.
- `ratings`: [R] int32 raw ratings in -4..4 from `*_anonDataRatings.txt`.

Text features come back from the data source as UTF-8 `bytes`.

Splits are drawn by a hash of `id`, so they do not depend on file order or on
the TFDS version: 80% train, 10% validation, 10% test (see `split_for_id`).

The builder never downloads: it reads the archive that
`python -m infalign_jax.data.fetch --data_dir=DATA_DIR` put in
`DATA_DIR/downloads`, and writes array_record files to
`DATA_DIR/vader_ratings/1.0.0`, which `tfds.data_source` style readers open
without TensorFlow.
"""

import contextlib
import fcntl
import hashlib
import math
import os
import pathlib
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from google.protobuf import json_format

from infalign_jax.data import fetch

SUBSETS: tuple[str, ...] = tuple(fetch.SUBSET_FILE_PREFIXES)
SPLITS: tuple[str, ...] = ('train', 'validation', 'test')
# Expected fractions of examples in train and validation; test gets the rest.
TRAIN_FRACTION = 0.8
VALIDATION_FRACTION = 0.1
MIN_RATING = -4
MAX_RATING = 4

Example = dict[str, Any]


def split_for_id(example_id: str) -> str:
  """Returns the split of an example from a hash of its id.

  The first 8 bytes of SHA-256(id) as a fraction u in [0, 1): train when
  u < 0.8, validation when u < 0.9, test otherwise.

  Args:
    example_id: the `id` feature, for example 'movie_reviews/17'.

  Returns:
    'train', 'validation' or 'test'.
  """
  digest = hashlib.sha256(example_id.encode('utf-8')).digest()
  fraction = int.from_bytes(digest[:8], 'big') / 2.0**64
  if fraction < TRAIN_FRACTION:
    return 'train'
  if fraction < TRAIN_FRACTION + VALIDATION_FRACTION:
    return 'validation'
  return 'test'


def _file_lines(filename: str, data: bytes) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, line) of a CRLF or LF text file."""
  try:
    text = data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    raise ValueError(f'{filename} is not valid UTF-8: {e}') from e
  lines = text.split('\n')
  if lines and not lines[-1]:
    lines.pop()  # A trailing newline ends the last line.
  for number, line in enumerate(lines, start=1):
    yield number, line.removesuffix('\r')


def _malformed(filename: str, number: int, line: str, expected: str):
  return ValueError(
      f'{filename} line {number} is malformed: expected {expected}, got'
      f' {line[:120]!r}.'
  )


def _parse_float(filename: str, number: int, line: str, field: str) -> float:
  try:
    value = float(field)
  except ValueError:
    value = math.nan
  if not math.isfinite(value):
    raise _malformed(filename, number, line, 'a finite mean rating')
  return value


def parse_ground_truth(filename: str, data: bytes) -> dict[str, tuple]:
  """Parses a `*_GroundTruth.txt` file: lines 'id TAB mean TAB text'.

  Args:
    filename: name used in error messages.
    data: the file's bytes (UTF-8, optional byte-order mark, CRLF or LF).

  Returns:
    {source id: (mean rating, text)} in file order.

  Raises:
    ValueError: the file is empty, or a line does not have 3 fields, has a
      non-numeric mean, empty text or a repeated id. The message names the
      file and line.
  """
  expected = 'id<TAB>mean<TAB>text'
  rows = {}
  for number, line in _file_lines(filename, data):
    fields = line.split('\t')
    if len(fields) != 3 or not fields[0] or not fields[2].strip():
      raise _malformed(filename, number, line, expected)
    source_id, mean_field, text = fields
    if source_id in rows:
      raise _malformed(filename, number, line, f'a new id, not {source_id!r}')
    mean = _parse_float(filename, number, line, mean_field)
    rows[source_id] = (mean, text.strip())
  if not rows:
    raise ValueError(f'{filename} is empty.')
  return rows


def parse_raw_ratings(filename: str, data: bytes) -> dict[str, list[int]]:
  """Parses a `*_anonDataRatings.txt` file.

  Lines are 'id TAB mean TAB standard deviation TAB [r1, r2, ...]'; only the
  id and the list are kept.

  Args:
    filename: name used in error messages.
    data: the file's bytes (UTF-8, optional byte-order mark, CRLF or LF).

  Returns:
    {source id: ratings}, each rating an int in -4..4.

  Raises:
    ValueError: the file is empty, or a line has the wrong number of fields,
      a rating that is not an integer in -4..4, an empty list or a repeated
      id.
  """
  expected = 'id<TAB>mean<TAB>stddev<TAB>[r1, r2, ...] with ratings in -4..4'
  rows = {}
  for number, line in _file_lines(filename, data):
    fields = line.split('\t')
    if len(fields) != 4 or not fields[0]:
      raise _malformed(filename, number, line, expected)
    source_id, _, _, list_field = fields
    list_field = list_field.strip()
    if not (list_field.startswith('[') and list_field.endswith(']')):
      raise _malformed(filename, number, line, expected)
    try:
      ratings = [int(item) for item in list_field[1:-1].split(',')]
    except ValueError:
      raise _malformed(filename, number, line, expected) from None
    if not all(MIN_RATING <= r <= MAX_RATING for r in ratings):
      raise _malformed(filename, number, line, expected)
    if source_id in rows:
      raise _malformed(filename, number, line, f'a new id, not {source_id!r}')
    rows[source_id] = ratings
  if not rows:
    raise ValueError(f'{filename} is empty.')
  return rows


def parse_examples(files: Mapping[str, bytes]) -> list[Example]:
  """Joins the ground-truth and ratings files of every subset by id.

  Args:
    files: {filename: bytes} as returned by `fetch.read_rating_files`.

  Returns:
    Examples with the features of this dataset, ordered by subset and then by
    the ground-truth file.

  Raises:
    ValueError: a file is malformed, or a subset's two files list different
      ids.
  """
  examples = []
  for subset, prefix in fetch.SUBSET_FILE_PREFIXES.items():
    truth_name = prefix + fetch.GROUND_TRUTH_SUFFIX
    ratings_name = prefix + fetch.RATINGS_SUFFIX
    truth = parse_ground_truth(truth_name, files[truth_name])
    ratings = parse_raw_ratings(ratings_name, files[ratings_name])
    if truth.keys() != ratings.keys():
      only_truth = sorted(truth.keys() - ratings.keys())[:5]
      only_ratings = sorted(ratings.keys() - truth.keys())[:5]
      raise ValueError(
          f'{truth_name} and {ratings_name} list different ids: only in the'
          f' first {only_truth}, only in the second {only_ratings} (at most 5'
          ' shown each).'
      )
    for source_id, (mean, text) in truth.items():
      examples.append(
          {
              'id': f'{subset}/{source_id}',
              'subset': subset,
              'text': text,
              'mean_rating': np.float32(mean),
              'ratings': np.asarray(ratings[source_id], dtype=np.int32),
          }
      )
  return examples


class VaderRatings(tfds.core.GeneratorBasedBuilder):
  """Human-rated sentences from the VADER paper, four subsets, three splits."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}

  def __init__(
      self, *, archive_sha256: str | None = fetch.SDIST_SHA256, **kwargs: Any
  ):
    """Creates the builder.

    Args:
      archive_sha256: SHA-256 the archive must have; None skips the check.
        Tests pass the hash of the small archive they write.
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder`; `data_dir` is
        required, and `file_format` defaults to 'array_record'.
    """
    self._archive_sha256 = archive_sha256
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                'id': tfds.features.Text(),
                'subset': tfds.features.Text(),
                'text': tfds.features.Text(),
                'mean_rating': tfds.features.Scalar(dtype=np.float32),
                'ratings': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            }
        ),
        homepage='https://github.com/cjhutto/vaderSentiment',
        citation=(
            '@inproceedings{hutto2014vader, title={VADER: A Parsimonious'
            ' Rule-based Model for Sentiment Analysis of Social Media Text},'
            ' author={Hutto, C. J. and Gilbert, Eric}, booktitle={ICWSM},'
            ' year={2014}}'
        ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The archive is fetched outside TFDS.
    path = fetch.archive_path(self.data_dir_root)
    files = fetch.read_rating_files(path, expected_sha256=self._archive_sha256)
    try:
      examples = parse_examples(files)
    except ValueError as e:
      raise fetch.ArchiveDamagedError(
          f'The archive {path} contains malformed rating files: {e} Delete the'
          ' archive and fetch it again with'
          f' `{fetch.fetch_command(self.data_dir_root)}`.'
      ) from e
    by_split = {split: [] for split in SPLITS}
    for example in examples:
      by_split[split_for_id(example['id'])].append(example)
    return {
        split: self._generate_examples(split_examples)
        for split, split_examples in by_split.items()
    }

  def _generate_examples(self, examples: Sequence[Example]):
    for example in examples:
      yield example['id'], example


class DatasetDamagedError(ValueError):
  """A built dataset folder exists but its files cannot be read."""


# Errors seen from a damaged dataset folder: json_format.ParseError for a
# garbled dataset_info.json, RuntimeError for a truncated or missing
# array_record file. ValueError and OSError cover other unreadable files.
_READ_ERRORS = (json_format.Error, ValueError, RuntimeError, OSError)


def _dataset_folder(data_dir: pathlib.Path) -> pathlib.Path:
  return data_dir / VaderRatings.name / str(VaderRatings.VERSION)


def _damaged(
    data_dir: pathlib.Path, error: Exception | str
) -> DatasetDamagedError:
  folder = _dataset_folder(data_dir)
  if isinstance(error, Exception):
    error = f'{type(error).__name__}: {error}'
  return DatasetDamagedError(
      f'The built dataset in {folder} cannot be read ({error}). Delete '
      f'that folder (rm -r {folder}) and run again: loading rebuilds it '
      f'from the archive in {data_dir / "downloads"}, which '
      f'`{fetch.fetch_command(data_dir)}` fetches if it is missing. To '
      f'rebuild right away, call infalign_jax.data.vader_ratings.build('
      f"'{data_dir}')."
  )


def _check_records(
    data_dir: pathlib.Path, indices: Sequence[int], records: Sequence[Any]
) -> None:
  """Raises DatasetDamagedError if a record came back empty."""
  # A truncated small array_record file can read back as records whose
  # features are all None, with no error from the reader.
  for index, record in zip(indices, records):
    if not isinstance(record, Mapping) or record.get('id') is None:
      raise _damaged(data_dir, f'record {index} of the split is empty')


def _open_builder(
    data_dir: pathlib.Path, archive_sha256: str | None
) -> VaderRatings:
  """Creates the builder; a damaged dataset folder raises DatasetDamagedError."""
  try:
    builder = VaderRatings(data_dir=data_dir, archive_sha256=archive_sha256)
    builder.is_prepared()
  except _READ_ERRORS as e:
    # Without a dataset folder the error has another cause: re-raise it.
    if not _dataset_folder(data_dir).exists():
      raise
    raise _damaged(data_dir, e) from e
  return builder


@contextlib.contextmanager
def _build_lock(data_dir: pathlib.Path) -> Iterator[None]:
  """Holds an exclusive file lock, so concurrent builds take turns."""
  lock_dir = data_dir / VaderRatings.name
  lock_dir.mkdir(parents=True, exist_ok=True)
  with open(lock_dir / '.build.lock', 'w') as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def build(
    data_dir: str | os.PathLike[str],
    *,
    archive_sha256: str | None = fetch.SDIST_SHA256,
) -> VaderRatings:
  """Builds the dataset into `data_dir` unless it is already built.

  TFDS writes into a folder named `incomplete.*` and renames it to
  `vader_ratings/1.0.0` only after every split is written, so a build killed
  half-way leaves no dataset that looks complete. This function deletes such
  leftovers before it builds. A file lock makes concurrent callers (for
  example two pytest workers) wait for one build instead of racing.

  NOTE: a dataset built by older code with the same version is reused as is.
  Bump `VaderRatings.VERSION` whenever the examples change.

  Args:
    data_dir: the data folder holding `downloads/` (see `fetch.archive_path`).
    archive_sha256: see `VaderRatings`.

  Returns:
    The prepared builder.

  Raises:
    fetch.ArchiveMissingError: the archive has not been fetched.
    fetch.ArchiveDamagedError: the archive or its files are not as expected.
    DatasetDamagedError: `DATA_DIR/vader_ratings/1.0.0` exists but its
      metadata cannot be read; the message tells the user to delete the folder.
  """
  data_dir = pathlib.Path(data_dir)
  builder = _open_builder(data_dir, archive_sha256)
  if builder.is_prepared():
    return builder
  fetch.ensure_archive(
      data_dir, allow_fetch=False, expected_sha256=archive_sha256
  )

  with _build_lock(data_dir):
    # Another process may have finished the build while this one waited.
    builder = _open_builder(data_dir, archive_sha256)
    if builder.is_prepared():
      return builder
    for leftover in (data_dir / VaderRatings.name).glob('incomplete.*'):
      logging.info('Deleting an interrupted build: %s', leftover)
      shutil.rmtree(leftover)
    logging.info('Building %s in %s', VaderRatings.name, data_dir)
    builder.download_and_prepare()
  return builder


def load(
    split: str,
    data_dir: str | os.PathLike[str],
    *,
    archive_sha256: str | None = fetch.SDIST_SHA256,
) -> Sequence[Example]:
  """Builds the dataset if needed and opens one split for random access.

  Args:
    split: 'train', 'validation', 'test', or any TFDS split string such as
      'train[:10%]'.
    data_dir: see `build`.
    archive_sha256: see `VaderRatings`.

  Returns:
    A TFDS data source: `len()` and integer indexing return example dicts
    whose text features are UTF-8 bytes.

  Raises:
    DatasetDamagedError: the built dataset cannot be read. The first and the
      last example of the split are read here to check that its files open;
      damage in the middle of a file shows only when that record is read.
  """
  data_dir = pathlib.Path(data_dir)
  builder = build(data_dir, archive_sha256=archive_sha256)
  try:
    source = builder.as_data_source(split=split)
    probe = [0, len(source) - 1] if len(source) else []
    records = source.__getitems__(probe)
  except _READ_ERRORS as e:
    raise _damaged(data_dir, e) from e
  _check_records(data_dir, probe, records)
  return source


def load_examples(
    split: str,
    data_dir: str | os.PathLike[str],
    *,
    subsets: Sequence[str] | None = None,
    archive_sha256: str | None = fetch.SDIST_SHA256,
) -> list[Example]:
  """Reads a whole split into memory, with text features as `str`.

  Args:
    split: see `load`.
    data_dir: see `build`.
    subsets: keep only these subsets (for example ('movie_reviews',)); None
      keeps all four.
    archive_sha256: see `VaderRatings`.

  Returns:
    Example dicts in the data source's order, which TFDS fixes at build time.

  Raises:
    ValueError: `subsets` names an unknown subset.
    DatasetDamagedError: the built dataset cannot be read.
  """
  if subsets is not None:
    unknown = sorted(set(subsets) - set(SUBSETS))
    if unknown:
      raise ValueError(f'Unknown subsets {unknown}; valid names: {SUBSETS}.')
  data_dir = pathlib.Path(data_dir)
  source = load(split, data_dir, archive_sha256=archive_sha256)
  indices = list(range(len(source)))
  try:
    records = source.__getitems__(indices)
  except _READ_ERRORS as e:
    raise _damaged(data_dir, e) from e
  _check_records(data_dir, indices, records)
  examples = []
  for example in records:
    example = {
        key: value.decode('utf-8') if isinstance(value, bytes) else value
        for key, value in example.items()
    }
    if subsets is None or example['subset'] in subsets:
      examples.append(example)
  return examples
