"""Tests for infalign_jax.metrics, read back with TensorBoard's own reader."""

import json
import pathlib
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.compat.proto import event_pb2

from infalign_jax import metrics


class Crc32cTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # Standard CRC-32C check values (iSCSI test vectors and '123456789').
      ('empty', b'', 0x00000000),
      ('digits', b'123456789', 0xE3069283),
      ('zeros', bytes(32), 0x8A9136AA),
      ('ones', b'\xff' * 32, 0x62A8AB43),
      ('ascending', bytes(range(32)), 0x46DD794E),
  )
  def test_known_values(self, data, expected):
    self.assertEqual(metrics.crc32c(data), expected)

  def test_masked_crc_formula(self):
    crc = 0xE3069283
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    self.assertEqual(
        metrics.masked_crc32c(b'123456789'),
        (rotated + 0xA282EAD8) & 0xFFFFFFFF,
    )


class TensorBoardWriterTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.logdir = pathlib.Path(
        self.enter_context(tempfile.TemporaryDirectory())
    )

  def _scalars(self, tag):
    accumulator = event_accumulator.EventAccumulator(str(self.logdir))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]

  def test_scalars_read_back_exactly(self):
    writer = metrics.TensorBoardWriter(self.logdir)
    values = [0.1, -2.5e-7, 3.0e8, 1.0 / 3.0]
    for step, value in enumerate(values, start=1):
      writer.write_scalars(
          step, {'train/loss': jnp.float32(value), 'train/count': step * 7}
      )
    writer.close()
    self.assertEqual(
        self._scalars('train/loss'),
        [(step, float(np.float32(v))) for step, v in enumerate(values, 1)],
    )
    self.assertEqual(
        self._scalars('train/count'), [(s, 7.0 * s) for s in range(1, 5)]
    )

  def test_raw_events_have_file_version_first(self):
    writer = metrics.TensorBoardWriter(self.logdir)
    writer.write_scalars(3, {'a': 1.5})
    writer.close()
    loader = event_file_loader.RawEventFileLoader(str(writer.path))
    events = [event_pb2.Event.FromString(record) for record in loader.Load()]
    self.assertLen(events, 3)
    self.assertEqual(events[0].file_version, 'brain.Event:2')
    self.assertEqual(events[1].session_log.status, 1)  # START
    self.assertEqual(events[2].step, 3)
    self.assertEqual(events[2].summary.value[0].tag, 'a')
    self.assertEqual(events[2].summary.value[0].simple_value, 1.5)

  def test_resume_discards_lost_steps(self):
    first = metrics.TensorBoardWriter(self.logdir)
    for step in range(1, 6):
      first.write_scalars(step, {'loss': float(step)})
    first.close()
    # The run is restored from step 3 and takes steps 4 to 6 again.
    second = metrics.TensorBoardWriter(self.logdir, resume_step=3)
    for step in range(4, 7):
      second.write_scalars(step, {'loss': 10.0 * step})
    second.close()
    self.assertLen(list(self.logdir.iterdir()), 2)
    self.assertEqual(
        self._scalars('loss'),
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)],
    )

  def test_corrupted_record_detected_by_reader(self):
    writer = metrics.TensorBoardWriter(self.logdir)
    writer.write_scalars(1, {'a': 1.0})
    writer.close()
    data = bytearray(writer.path.read_bytes())
    data[-6] ^= 0x01  # Flip one bit inside the last record's payload.
    writer.path.write_bytes(bytes(data))
    loader = event_file_loader.RawEventFileLoader(str(writer.path))
    # The reader stops at the record whose checksum fails.
    self.assertLen(list(loader.Load()), 2)

  def test_negative_step_rejected(self):
    writer = metrics.TensorBoardWriter(self.logdir)
    with self.assertRaisesRegex(ValueError, 'step must be >= 0, got -1'):
      writer.write_scalars(-1, {'a': 1.0})
    writer.close()


class JsonlWriterTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    tmp = pathlib.Path(self.enter_context(tempfile.TemporaryDirectory()))
    self.path = tmp / 'metrics.jsonl'

  def test_lines_round_trip(self):
    writer = metrics.JsonlWriter(self.path)
    writer.write_scalars(1, {'train/loss': jnp.float32(0.25), 'n': 3})
    writer.write_scalars(2, {'train/loss': float('nan'), 'n': jnp.int32(4)})
    writer.close()
    records = metrics.read_jsonl(self.path)
    self.assertEqual([r['step'] for r in records], [1, 2])
    self.assertEqual(records[0]['train/loss'], 0.25)
    self.assertEqual(records[0]['n'], 3)
    self.assertIsInstance(records[1]['n'], int)
    self.assertTrue(np.isnan(records[1]['train/loss']))

  def test_resume_drops_lines_past_step(self):
    writer = metrics.JsonlWriter(self.path)
    for step in range(1, 6):
      writer.write_scalars(step, {'loss': float(step)})
    writer.close()
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write('{"step": 6, "lo')  # A write cut short by SIGKILL.
    writer = metrics.JsonlWriter(self.path, resume_step=3)
    writer.write_scalars(4, {'loss': 40.0})
    writer.close()
    records = metrics.read_jsonl(self.path)
    self.assertEqual(
        [(r['step'], r['loss']) for r in records],
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)],
    )

  def test_fresh_run_starts_empty_file(self):
    self.path.write_text(json.dumps({'step': 2, 'loss': 1.0}) + '\n')
    writer = metrics.JsonlWriter(self.path, resume_step=0)
    writer.close()
    self.assertEqual(metrics.read_jsonl(self.path), [])

  def test_non_scalar_rejected(self):
    writer = metrics.JsonlWriter(self.path)
    with self.assertRaisesRegex(ValueError, r'got shape \(2,\)'):
      writer.write_scalars(1, {'loss': np.zeros(2)})
    writer.close()


class CreateDefaultWriterTest(parameterized.TestCase):

  def test_writes_jsonl_and_event_file(self):
    workdir = pathlib.Path(self.enter_context(tempfile.TemporaryDirectory()))
    writer = metrics.create_default_writer(workdir)
    writer.write_scalars(1, {'loss': 0.5})
    writer.close()
    self.assertEqual(
        metrics.read_jsonl(workdir / 'metrics.jsonl')[0]['loss'], 0.5
    )
    accumulator = event_accumulator.EventAccumulator(
        str(workdir / 'tensorboard')
    )
    accumulator.Reload()
    self.assertEqual(accumulator.Scalars('loss')[0].value, 0.5)


if __name__ == '__main__':
  absltest.main()
