"""Resumable pipeline stages, each owning one subfolder of the workdir.

A stage's identity is a SHA-256 over its name, its slice of the config and the
identities of the stages it reads. The stage writes `stage.json` (its identity)
when it starts and `done.json` (identity plus its result record) last, through
an atomic rename. A stage whose `done.json` carries the expected identity is
skipped. A stage folder with a `stage.json` but no `done.json` was interrupted:
training stages resume from their checkpoints there, every other stage redoes
its work and overwrites its files. A folder started for another identity is
cleared before the stage runs again.
"""

from collections.abc import Callable, Mapping
import dataclasses
import hashlib
import json
import shutil
import time
from typing import Any

from absl import logging
from etils import epath

from experiments import common

STARTED_FILE = 'stage.json'
DONE_FILE = 'done.json'


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageResult:
  """A completed stage.

  Attributes:
    name: the stage's subfolder name.
    directory: the stage's folder in the workdir.
    identity: hex SHA-256 over name, config slice and input identities.
    record: the JSON-serializable mapping the stage returned (metrics, file
      names); stored in `done.json`.
  """

  name: str
  directory: epath.Path
  identity: str
  record: Mapping[str, Any]


def stage_identity(
    name: str, config_slice: Any, inputs: Mapping[str, StageResult]
) -> str:
  """Hash a stage's name, config slice and upstream identities."""
  payload = {
      'name': name,
      'config': config_slice,
      'inputs': {
          key: result.identity for key, result in sorted(inputs.items())
      },
  }
  text = json.dumps(payload, sort_keys=True, default=_to_jsonable)
  return hashlib.sha256(text.encode()).hexdigest()


def _to_jsonable(value: Any) -> Any:
  if hasattr(value, 'to_dict'):
    return value.to_dict()
  if isinstance(value, tuple | set | frozenset):
    return list(value)
  return str(value)


def run_stage(
    workdir: epath.Path,
    name: str,
    config_slice: Any,
    inputs: Mapping[str, StageResult],
    body: Callable[[epath.Path], Mapping[str, Any]],
) -> StageResult:
  """Run `body(directory)` unless the stage is already complete.

  Args:
    workdir: the run's workdir.
    name: the stage's subfolder name, unique within the run.
    config_slice: the config values the stage's output depends on (anything
      JSON-serializable, ConfigDicts included).
    inputs: completed upstream stages whose artifacts the body reads.
    body: does the work, writing its files into the folder it gets, and
      returns a JSON-serializable record. It must tolerate files left by an
      interrupted earlier attempt (resume from them or overwrite them).

  Returns:
    The completed stage.
  """
  directory = workdir / name
  identity = stage_identity(name, config_slice, inputs)
  done_path = directory / DONE_FILE
  if done_path.exists():
    done = json.loads(done_path.read_text())
    if done.get('identity') == identity:
      logging.info('Stage %s: complete, skipped (%s).', name, directory)
      return StageResult(
          name=name,
          directory=directory,
          identity=identity,
          record=done['record'],
      )
    logging.warning(
        'Stage %s: %s was made from other inputs or code (identity %s, '
        'expected %s); clearing it and running the stage again.',
        name,
        directory,
        done.get('identity'),
        identity,
    )
    shutil.rmtree(directory)

  started_path = directory / STARTED_FILE
  if started_path.exists():
    started = json.loads(started_path.read_text())
    if started.get('identity') != identity:
      logging.warning(
          'Stage %s: clearing an interrupted attempt made for identity %s.',
          name,
          started.get('identity'),
      )
      shutil.rmtree(directory)
    else:
      logging.info('Stage %s: resuming an interrupted attempt.', name)
  directory.mkdir(parents=True, exist_ok=True)
  common.write_json_atomic(started_path, {'identity': identity})

  logging.info('Stage %s: start.', name)
  start, start_cpu = time.time(), time.process_time()
  record = dict(body(directory))
  seconds = time.time() - start
  # Wall and CPU time of this attempt only (not of interrupted ones). CPU
  # time sums every thread, so on a busy machine it is the steadier number.
  record.setdefault('seconds', round(seconds, 3))
  record.setdefault('cpu_seconds', round(time.process_time() - start_cpu, 3))
  common.write_json_atomic(
      done_path, {'identity': identity, 'name': name, 'record': record}
  )
  logging.info('Stage %s: done in %.1f s.', name, seconds)
  return StageResult(
      name=name, directory=directory, identity=identity, record=record
  )
