"""Tests for the vader_ratings TFDS builder, on archives written here."""

import collections
import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

from infalign_jax.data import fetch
from infalign_jax.data import synthetic
from infalign_jax.data import vader_ratings

# Examples per subset in the killed build: enough that building takes about a
# second, which leaves time to kill it half-way.
_KILLED_BUILD_SIZE = 1_500
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL_DATA_DIR = REPO_ROOT / 'data'
requires_real_archive = pytest.mark.skipif(
    not fetch.archive_path(REAL_DATA_DIR).is_file(),
    reason=(
        f'{fetch.archive_path(REAL_DATA_DIR)} not fetched; run `make data`'
        ' (needs access to PyPI).'
    ),
)


def _tempdir(test: absltest.TestCase) -> pathlib.Path:
  """Returns a new folder that is deleted when `test` ends."""
  folder = tempfile.TemporaryDirectory()
  test.addCleanup(folder.cleanup)
  return pathlib.Path(folder.name)


def _write(data_dir: pathlib.Path, files) -> str:
  """Writes `files` as the archive of `data_dir` and returns its SHA-256."""
  path = synthetic.write_archive(fetch.archive_path(data_dir), files)
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_rows(files, subset):
  """Parses one subset's files with plain string operations."""
  prefix = fetch.SUBSET_FILE_PREFIXES[subset]
  truth = files[prefix + fetch.GROUND_TRUTH_SUFFIX].decode('utf-8-sig')
  ratings = files[prefix + fetch.RATINGS_SUFFIX].decode('utf-8-sig')
  rows = {}
  for line in truth.split('\r\n'):
    source_id, mean, text = line.split('\t')
    rows[source_id] = {'mean': float(mean), 'text': text}
  for line in ratings.split('\r\n'):
    source_id, _, _, raw = line.split('\t')
    rows[source_id]['ratings'] = [int(r) for r in raw.strip('[]').split(',')]
  return rows


def _split_by_formula(example_id: str) -> str:
  """Reference for split_for_id, written from its docstring."""
  digest = hashlib.sha256(example_id.encode()).digest()
  fraction = int.from_bytes(digest[:8], 'big') / 2**64
  if fraction < 0.8:
    return 'train'
  if fraction < 0.9:
    return 'validation'
  return 'test'


class ParseTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('crlf_bom_no_final_newline', b'\xef\xbb\xbf', '\r\n', ''),
      ('lf_final_newline', b'', '\n', '\n'),
      ('crlf_final_newline', b'', '\r\n', '\r\n'),
  )
  def test_ground_truth_line_ends(self, bom, newline, final):
    text = newline.join(['1\t2.5\tGreat café.', '2\t-1\t  Dull. ']) + final
    rows = vader_ratings.parse_ground_truth('x.txt', bom + text.encode())
    self.assertEqual(rows, {'1': (2.5, 'Great café.'), '2': (-1.0, 'Dull.')})

  def test_raw_ratings(self):
    data = b'\xef\xbb\xbf7_1\t0.5\t0.5\t[0, 1]\r\n7_2\t-4\t0\t[-4]'
    rows = vader_ratings.parse_raw_ratings('x.txt', data)
    self.assertEqual(rows, {'7_1': [0, 1], '7_2': [-4]})

  @parameterized.named_parameters(
      ('two_fields', b'1\t2.5\r\n2\t1\tok', 'line 1'),
      ('four_fields', b'1\t2\ta\r\n2\t1\tok\tmore', 'line 2'),
      ('mean_not_number', b'1\tgood\tok', 'a finite mean rating'),
      ('mean_nan', b'1\tnan\tok', 'a finite mean rating'),
      ('empty_text', b'1\t1\t  ', 'line 1'),
      ('repeated_id', b'1\t1\ta\r\n1\t2\tb', "a new id, not '1'"),
      ('empty_line', b'1\t1\ta\r\n\r\n2\t2\tb', 'line 2'),
      ('empty_file', b'', 'is empty'),
      ('not_utf8', b'1\t1\t\xff', 'not valid UTF-8'),
  )
  def test_ground_truth_errors(self, data, message):
    with self.assertRaisesRegex(ValueError, message):
      vader_ratings.parse_ground_truth('x.txt', data)

  @parameterized.named_parameters(
      ('three_fields', b'1\t1\t[1]', 'line 1'),
      ('no_brackets', b'1\t1\t0\t1, 2', 'line 1'),
      ('not_integer', b'1\t1\t0\t[1, 2.5]', 'line 1'),
      ('out_of_range', b'1\t1\t0\t[1, 5]', r'ratings in -4\.\.4'),
      ('empty_list', b'1\t1\t0\t[]', 'line 1'),
      ('repeated_id', b'1\t1\t0\t[1]\r\n1\t1\t0\t[1]', "a new id, not '1'"),
  )
  def test_raw_ratings_errors(self, data, message):
    with self.assertRaisesRegex(ValueError, message):
      vader_ratings.parse_raw_ratings('x.txt', data)

  def test_mismatched_ids_are_listed(self):
    files = synthetic.synthetic_rating_files(examples_per_subset=3)
    files['tweets_anonDataRatings.txt'] = b'9\t1\t0\t[1]'
    with self.assertRaisesRegex(
        ValueError,
        r"only in the first \['1', '2', '3'\], only in the second \['9'\]",
    ):
      vader_ratings.parse_examples(files)


class SplitForIdTest(absltest.TestCase):

  def test_matches_formula(self):
    for number in range(200):
      example_id = f'movie_reviews/{number}'
      self.assertEqual(
          vader_ratings.split_for_id(example_id), _split_by_formula(example_id)
      )

  def test_fractions_near_80_10_10(self):
    counts = collections.Counter(
        vader_ratings.split_for_id(f'tweets/{n}') for n in range(20_000)
    )
    # Binomial standard deviation of the train fraction: sqrt(.16 / 2e4) =
    # 0.0028, so 0.015 is more than 5 standard deviations.
    self.assertAlmostEqual(counts['train'] / 20_000, 0.8, delta=0.015)
    self.assertAlmostEqual(counts['validation'] / 20_000, 0.1, delta=0.015)
    self.assertAlmostEqual(counts['test'] / 20_000, 0.1, delta=0.015)


class BuildTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.data_dir = _tempdir(self)
    self.files = synthetic.synthetic_rating_files(examples_per_subset=15)
    self.sha256 = _write(self.data_dir, self.files)

  def _all_examples(self, data_dir, sha256):
    return {
        split: vader_ratings.load_examples(
            split, data_dir, archive_sha256=sha256
        )
        for split in vader_ratings.SPLITS
    }

  def test_features_match_source_files(self):
    by_split = self._all_examples(self.data_dir, self.sha256)
    seen = set()
    for split, examples in by_split.items():
      for example in examples:
        with self.subTest(example['id']):
          subset, source_id = example['id'].split('/')
          self.assertEqual(example['subset'], subset)
          row = _source_rows(self.files, subset)[source_id]
          self.assertEqual(example['text'], row['text'])
          self.assertEqual(example['mean_rating'], np.float32(row['mean']))
          np.testing.assert_array_equal(example['ratings'], row['ratings'])
          self.assertEqual(example['ratings'].dtype, np.int32)
          self.assertEqual(split, _split_by_formula(example['id']))
          self.assertNotIn(example['id'], seen)
          seen.add(example['id'])
    self.assertLen(seen, 4 * 15)

  def test_raw_data_source(self):
    source = vader_ratings.load(
        'train', self.data_dir, archive_sha256=self.sha256
    )
    examples = vader_ratings.load_examples(
        'train', self.data_dir, archive_sha256=self.sha256
    )
    self.assertLen(source, len(examples))
    last = source[len(source) - 1]
    self.assertIsInstance(last['id'], bytes)
    self.assertIsInstance(last['text'], bytes)
    self.assertEqual(last['id'].decode(), examples[-1]['id'])

  def test_splits_ignore_line_order(self):
    shuffled = {}
    for name, payload in self.files.items():
      bom = payload.startswith(b'\xef\xbb\xbf')
      lines = payload.decode('utf-8-sig').split('\r\n')[::-1]
      shuffled[name] = (b'\xef\xbb\xbf' if bom else b'') + '\r\n'.join(
          lines
      ).encode()
    other_dir = _tempdir(self)
    other_sha256 = _write(other_dir, shuffled)
    first = self._all_examples(self.data_dir, self.sha256)
    second = self._all_examples(other_dir, other_sha256)
    for split in vader_ratings.SPLITS:
      with self.subTest(split):
        self.assertEqual(
            sorted(e['id'] for e in first[split]),
            sorted(e['id'] for e in second[split]),
        )

  def test_subset_filter(self):
    examples = vader_ratings.load_examples(
        'train',
        self.data_dir,
        subsets=('tweets',),
        archive_sha256=self.sha256,
    )
    self.assertNotEmpty(examples)
    self.assertEqual({e['subset'] for e in examples}, {'tweets'})
    with self.assertRaisesRegex(ValueError, "Unknown subsets \\['movies'\\]"):
      vader_ratings.load_examples(
          'train',
          self.data_dir,
          subsets=('movies',),
          archive_sha256=self.sha256,
      )

  def test_second_build_reuses_files(self):
    vader_ratings.build(self.data_dir, archive_sha256=self.sha256)
    version_dir = self.data_dir / 'vader_ratings' / '1.0.0'
    mtimes = {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()}
    builder = vader_ratings.build(self.data_dir, archive_sha256=self.sha256)
    self.assertTrue(builder.is_prepared())
    self.assertEqual(
        {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()}, mtimes
    )

  def _check_damage_is_reported(self, damage):
    """Damages a built dataset; checks the error, then the advised fix."""
    vader_ratings.build(self.data_dir, archive_sha256=self.sha256)
    version_dir = self.data_dir / 'vader_ratings' / '1.0.0'
    damage(version_dir)
    with self.assertRaisesRegex(
        vader_ratings.DatasetDamagedError,
        f'{version_dir} cannot be read.*Delete that folder.*'
        f'python -m infalign_jax.data.fetch --data_dir={self.data_dir}',
    ):
      vader_ratings.load_examples(
          'train', self.data_dir, archive_sha256=self.sha256
      )
    shutil.rmtree(version_dir)
    self.assertNotEmpty(
        vader_ratings.load_examples(
            'train', self.data_dir, archive_sha256=self.sha256
        )
    )

  def test_truncated_array_record_is_reported(self):
    def truncate(version_dir):
      (path,) = version_dir.glob('*-train.array_record*')
      with open(path, 'r+b') as f:
        f.truncate(path.stat().st_size // 2)

    self._check_damage_is_reported(truncate)

  def test_garbled_dataset_info_is_reported(self):
    def garble(version_dir):
      (version_dir / 'dataset_info.json').write_text('{x')

    self._check_damage_is_reported(garble)

  def test_missing_archive_names_fetch_command(self):
    empty_dir = _tempdir(self)
    with self.assertRaisesRegex(
        fetch.ArchiveMissingError,
        f'python -m infalign_jax.data.fetch --data_dir={empty_dir}',
    ):
      vader_ratings.load('train', empty_dir)
    self.assertFalse((empty_dir / 'vader_ratings' / '1.0.0').exists())

  def test_malformed_line_leaves_no_dataset(self):
    name = 'nytEditorialSnippets_GroundTruth.txt'
    self.files[name] += b'\r\n9_9\tnot a number\tSome text.'
    sha256 = _write(self.data_dir, self.files)
    with self.assertRaises(fetch.ArchiveDamagedError) as raised:
      vader_ratings.build(self.data_dir, archive_sha256=sha256)
    message = str(raised.exception)
    self.assertIn(f'{name} line 16 is malformed', message)
    self.assertIn('Delete the archive', message)
    self.assertIn(fetch.fetch_command(self.data_dir), message)
    dataset_dir = self.data_dir / 'vader_ratings'
    self.assertEqual(
        sorted(p.name for p in dataset_dir.iterdir()), ['.build.lock']
    )

  def test_wrong_archive_hash(self):
    with self.assertRaisesRegex(fetch.ArchiveDamagedError, 'SHA-256 is'):
      vader_ratings.build(self.data_dir)

  def test_killed_build_is_not_complete(self):
    # A build large enough to take a few seconds, killed with SIGKILL as soon
    # as TFDS has created its temporary folder.
    big_dir = _tempdir(self)
    sha256 = _write(
        big_dir,
        synthetic.synthetic_rating_files(
            examples_per_subset=_KILLED_BUILD_SIZE
        ),
    )
    script = textwrap.dedent(f"""
        from infalign_jax.data import vader_ratings
        vader_ratings.build({str(big_dir)!r}, archive_sha256={sha256!r})
    """)
    process = subprocess.Popen(
        [sys.executable, '-c', script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO_ROOT,
    )
    dataset_dir = big_dir / 'vader_ratings'
    deadline = time.monotonic() + 60
    while not list(dataset_dir.glob('incomplete.*')):
      self.assertIsNone(process.poll(), 'the build ended before it was killed')
      self.assertLess(time.monotonic(), deadline)
      time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    self.assertNotEmpty(list(dataset_dir.glob('incomplete.*')))
    self.assertFalse((dataset_dir / '1.0.0').exists())
    builder = vader_ratings.VaderRatings(
        data_dir=big_dir, archive_sha256=sha256
    )
    self.assertFalse(builder.is_prepared())

    # The next build deletes the leftover and completes.
    builder = vader_ratings.build(big_dir, archive_sha256=sha256)
    self.assertTrue(builder.is_prepared())
    self.assertEqual(list(dataset_dir.glob('incomplete.*')), [])
    total = sum(
        len(builder.as_data_source(split)) for split in vader_ratings.SPLITS
    )
    self.assertEqual(total, 4 * _KILLED_BUILD_SIZE)


class RealArchiveTest(absltest.TestCase):

  @requires_real_archive
  def test_subset_counts(self):
    counts = collections.Counter()
    split_sizes = {}
    for split in vader_ratings.SPLITS:
      examples = vader_ratings.load_examples(split, REAL_DATA_DIR)
      split_sizes[split] = len(examples)
      for example in examples:
        counts[example['subset']] += 1
        if example['subset'] == 'movie_reviews':
          # Movie-review means agree with their raw ratings (to 1e-9 in the
          # files); float32 storage adds up to 2.4e-7 at |mean| <= 4.
          self.assertAlmostEqual(
              example['mean_rating'], np.mean(example['ratings']), delta=1e-6
          )
    self.assertEqual(
        dict(counts),
        {
            'movie_reviews': 10_605,
            'tweets': 4_200,
            'nyt_editorials': 5_190,
            'amazon_reviews': 3_708,
        },
    )
    self.assertEqual(sum(split_sizes.values()), 23_703)
    self.assertAlmostEqual(split_sizes['train'] / 23_703, 0.8, delta=0.01)


if __name__ == '__main__':
  absltest.main()
