"""Metric writers: absl log lines, a JSONL file and TensorBoard event files.

Every writer follows the `MetricWriter` protocol, the shape of
`clu.metric_writers` without the dependency: `write_scalars(step, scalars)`,
`flush()` and `close()`. `create_default_writer` builds the set a training run
uses, on process 0 only, so a multi-host run writes each line once.

TensorBoard files are written without TensorFlow: each `Event` protocol
buffer is encoded by hand (the few fields used are listed at
`_encode_event`) and framed as a TFRecord, with the masked CRC32C checksums
that TensorBoard's reader verifies.

Resuming: a run restored from the checkpoint of step `resume_step` must not
show metrics from the lost steps after it. The JSONL writer therefore drops
the lines with `step > resume_step` when it opens the file (and a trailing
line cut short by a crash). The TensorBoard writer starts a new event file
whose first entry is a `SessionLog.START` event at `resume_step + 1`, which
makes TensorBoard discard the older points at or after that step.
"""

from collections.abc import Mapping, Sequence
import json
import os
import socket
import struct
import time
from typing import Any, Protocol

from absl import logging
from etils import epath
import jax
import numpy as np

Scalars = Mapping[str, Any]

JSONL_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


class MetricWriter(Protocol):
  """Destination for scalar metrics of a run."""

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    """Record `scalars` (name -> number or 0-d array) at `step`."""

  def flush(self) -> None:
    """Push buffered data to its destination."""

  def close(self) -> None:
    """Flush and release the destination."""


def _to_number(value: Any) -> int | float:
  """Convert a Python or NumPy/JAX scalar to int (integer dtypes) or float."""
  array = np.asarray(value)
  if array.shape != ():
    raise ValueError(
        f'Metric values must be scalars, got shape {array.shape}; reduce the '
        'metric (for example with a mean) before writing it.'
    )
  if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
    return int(array)
  return float(array)


def _check_step(step: int) -> int:
  step = int(step)
  if step < 0:
    raise ValueError(f'step must be >= 0, got {step}.')
  return step


class LoggingWriter:
  """Writes each call as one absl INFO line: `step 10: train/loss=0.5, ...`."""

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    text = ', '.join(
        f'{name}={_to_number(value):.6g}'
        for name, value in sorted(scalars.items())
    )
    logging.info('step %d: %s', _check_step(step), text)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class JsonlWriter:
  """Appends one JSON object per call to a file: `{"step": 10, ...}`.

  Each line has `step`, `wall_time` (seconds since the epoch) and the
  scalars. Non-finite floats are written as Python's json module writes them
  (`NaN`, `Infinity`), which `json.loads` reads back.
  """

  def __init__(self, path: epath.PathLike, *, resume_step: int = 0):
    """Open `path` for appending, after dropping lines past `resume_step`.

    Args:
      path: the JSONL file; created if missing.
      resume_step: step of the state the run starts from (0 for a fresh
        run). Lines with a larger step, and a last line without its newline,
        are removed, so the file never shows steps that the restored state
        has not taken.
    """
    self._path = epath.Path(path)
    self._path.parent.mkdir(parents=True, exist_ok=True)
    self._drop_lines_after(_check_step(resume_step))
    self._file = open(self._path, 'a', encoding='utf-8')

  def _drop_lines_after(self, resume_step: int) -> None:
    if not self._path.exists():
      return
    text = self._path.read_text(encoding='utf-8')
    kept = []
    for line in text.splitlines(keepends=True):
      if not line.endswith('\n'):
        break  # Cut short by a crash during the write.
      try:
        step = json.loads(line)['step']
      except (json.JSONDecodeError, KeyError, TypeError):
        logging.warning('Dropping unreadable line in %s: %r', self._path, line)
        continue
      if step <= resume_step:
        kept.append(line)
    if len(kept) == len(text.splitlines()):
      return
    logging.info(
        'Dropped %d lines past step %d from %s.',
        len(text.splitlines()) - len(kept),
        resume_step,
        self._path,
    )
    # Rewrite through a rename, so a crash here leaves the old file intact.
    tmp = self._path.parent / f'.{self._path.name}.tmp-{os.getpid()}'
    tmp.write_text(''.join(kept), encoding='utf-8')
    os.replace(tmp, self._path)

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    record = {'step': _check_step(step), 'wall_time': time.time()}
    for name, value in scalars.items():
      if name in record:
        raise ValueError(
            f'Metric name {name!r} clashes with a field of every JSONL line; '
            'rename the metric.'
        )
      record[name] = _to_number(value)
    self._file.write(json.dumps(record, sort_keys=True) + '\n')

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_jsonl(path: epath.PathLike) -> list[dict[str, Any]]:
  """Read every line of a metrics JSONL file, in order."""
  text = epath.Path(path).read_text(encoding='utf-8')
  return [json.loads(line) for line in text.splitlines() if line]


# CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, as TFRecord uses.
def _make_crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (pure Python, fine for records of a few KB)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """CRC-32C rotated right by 15 bits plus 0xA282EAD8, as TFRecord stores it."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
  """Frame one record: length, CRC of length, data, CRC of data."""
  length = struct.pack('<Q', len(data))
  return b''.join(
      (
          length,
          struct.pack('<I', masked_crc32c(length)),
          data,
          struct.pack('<I', masked_crc32c(data)),
      )
  )


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    low = value & 0x7F
    value >>= 7
    if value:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  """Encode a length-delimited field (wire type 2): a string or sub-message."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _encode_event(
    wall_time: float,
    step: int,
    *,
    file_version: str | None = None,
    scalars: Mapping[str, float] | None = None,
    session_start: bool = False,
) -> bytes:
  """Encode a tensorflow.Event protocol buffer.

  Fields used (numbers from tensorboard/compat/proto/event.proto and
  summary.proto): Event.wall_time = 1 (double), Event.step = 2 (int64),
  Event.file_version = 3 (string), Event.summary = 5, Event.session_log = 7;
  Summary.value = 1 (repeated); Summary.Value.tag = 1 (string),
  Summary.Value.simple_value = 2 (float); SessionLog.status = 1 (enum,
  START = 1).
  """
  out = bytearray()
  out += _varint(1 << 3 | 1) + struct.pack('<d', wall_time)
  out += _varint(2 << 3 | 0) + _varint(step)
  if file_version is not None:
    out += _field_bytes(3, file_version.encode())
  if scalars:
    summary = bytearray()
    for tag, value in scalars.items():
      entry = _field_bytes(1, tag.encode())
      entry += _varint(2 << 3 | 5) + struct.pack('<f', value)
      summary += _field_bytes(1, entry)
    out += _field_bytes(5, bytes(summary))
  if session_start:
    out += _field_bytes(7, _varint(1 << 3 | 0) + _varint(1))
  return bytes(out)


class TensorBoardWriter:
  """Writes scalars to a new TensorBoard event file in `logdir`.

  Values are stored as float32 `simple_value`s, the precision TensorBoard
  shows. Records are buffered in memory until `flush`.
  """

  _files_opened = 0

  def __init__(self, logdir: epath.PathLike, *, resume_step: int = 0):
    """Create the event file.

    Args:
      logdir: directory of the event files; created if missing.
      resume_step: step of the state the run starts from (0 for a fresh
        run). TensorBoard discards points from older files at larger steps.
    """
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    # Names sort by creation time, the order TensorBoard reads files in.
    TensorBoardWriter._files_opened += 1
    name = (
        f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}'
        f'.{os.getpid()}.{TensorBoardWriter._files_opened}'
    )
    self.path = logdir / name
    self._file = open(self.path, 'wb')
    self._pending = [
        _encode_event(time.time(), 0, file_version='brain.Event:2'),
        _encode_event(
            time.time(), _check_step(resume_step) + 1, session_start=True
        ),
    ]
    self.flush()

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    values = {name: _to_number(value) for name, value in scalars.items()}
    self._pending.append(
        _encode_event(time.time(), _check_step(step), scalars=values)
    )

  def flush(self) -> None:
    self._file.write(b''.join(tfrecord_frame(data) for data in self._pending))
    self._pending = []
    self._file.flush()

  def close(self) -> None:
    self.flush()
    self._file.close()


class MultiWriter:
  """Forwards every call to each of several writers, in order."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self._writers = tuple(writers)

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def flush(self) -> None:
    for writer in self._writers:
      writer.flush()

  def close(self) -> None:
    for writer in self._writers:
      writer.close()


def create_default_writer(
    workdir: epath.PathLike, *, resume_step: int = 0
) -> MultiWriter:
  """Build the writers of a training run in `workdir`.

  On process 0: log lines, `workdir/metrics.jsonl` and event files in
  `workdir/tensorboard/`. On every other process: a writer that drops
  everything.

  Args:
    workdir: directory of the run (one training stage).
    resume_step: step of the state the run starts from (0 for a fresh run).
  """
  if jax.process_index() != 0:
    return MultiWriter(())
  workdir = epath.Path(workdir)
  return MultiWriter(
      (
          LoggingWriter(),
          JsonlWriter(workdir / JSONL_FILE, resume_step=resume_step),
          TensorBoardWriter(workdir / TENSORBOARD_DIR, resume_step=resume_step),
      )
  )
