"""Kill-and-resume tests with real processes running the regression experiment.

Each run is `python -m experiments.main --config=experiments/configs/
regression.py` with a checkpoint after every step, so that saves are almost
always in flight and a kill lands at a random point of the run.
"""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest

_REPO = pathlib.Path(__file__).resolve().parent.parent
_NUM_STEPS = 30
_COMMAND = (
    sys.executable,
    '-m',
    'experiments.main',
    '--config=experiments/configs/regression.py',
    f'--config.num_steps={_NUM_STEPS}',
    '--config.save_every=1',
    '--config.log_every=1',
)
_TMP_SUFFIX = '.orbax-checkpoint-tmp'
_TIMEOUT_SECONDS = 120


def _start(workdir: pathlib.Path) -> subprocess.Popen:
  """Start the experiment; its output goes to workdir/../<name>.log."""
  log = open(workdir.parent / f'{workdir.name}.log', 'ab')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  process = subprocess.Popen(
      (*_COMMAND, f'--workdir={workdir}'),
      cwd=_REPO,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
  )
  log.close()
  return process


def _run(workdir: pathlib.Path) -> tuple[int, str]:
  """Run the experiment to the end; return its exit code and output."""
  process = _start(workdir)
  returncode = process.wait(timeout=_TIMEOUT_SECONDS)
  return returncode, (workdir.parent / f'{workdir.name}.log').read_text()


def _wait_until(condition, process: subprocess.Popen, what: str) -> None:
  deadline = time.monotonic() + _TIMEOUT_SECONDS
  while not condition():
    if process.poll() is not None:
      raise AssertionError(f'The run exited ({process.returncode}) {what}.')
    if time.monotonic() > deadline:
      process.kill()
      raise AssertionError(f'Timed out {what}.')
    time.sleep(0.002)


def _logged_steps(workdir: pathlib.Path) -> list[int]:
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  steps = []
  for line in path.read_text().splitlines(keepends=True):
    if line.endswith('\n'):
      steps.append(json.loads(line)['step'])
  return steps


def _checkpoint_entries(workdir: pathlib.Path) -> list[str]:
  directory = workdir / 'checkpoints'
  return (
      sorted(p.name for p in directory.iterdir()) if directory.exists() else []
  )


def _summary(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / 'summary.json').read_text())


class ResumeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = pathlib.Path(tempfile.mkdtemp())
    cls.reference_dir = cls.tmp / 'reference'
    returncode, output = _run(cls.reference_dir)
    assert returncode == 0, output[-3000:]
    cls.reference = _summary(cls.reference_dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp)
    super().tearDownClass()

  def test_reference_run_completes(self):
    self.assertEqual(self.reference['final_step'], _NUM_STEPS)
    self.assertEqual(
        _logged_steps(self.reference_dir), list(range(1, _NUM_STEPS + 1))
    )

  def test_sigkill_at_random_step_then_resume_is_bitwise(self):
    kill_after = random.randint(3, _NUM_STEPS - 10)
    workdir = self.tmp / f'killed_after_{kill_after}'
    process = _start(workdir)
    _wait_until(
        lambda: any(s >= kill_after for s in _logged_steps(workdir)),
        process,
        f'before step {kill_after}',
    )
    process.send_signal(signal.SIGKILL)
    self.assertEqual(process.wait(), -signal.SIGKILL)
    self.assertFalse((workdir / 'summary.json').exists())

    returncode, output = _run(workdir)
    self.assertEqual(returncode, 0, output[-3000:])
    self.assertRegex(output, r'Restored step \d+ from')
    summary = _summary(workdir)
    self.assertEqual(summary['final_step'], _NUM_STEPS)
    self.assertEqual(
        summary['final_params_sha256'],
        self.reference['final_params_sha256'],
        f'killed after step {kill_after}',
    )
    self.assertEqual(
        _logged_steps(workdir),
        list(range(1, _NUM_STEPS + 1)),
        f'killed after step {kill_after}',
    )

  def test_sigkill_during_save_keeps_previous_checkpoint(self):
    for attempt in range(3):
      workdir = self.tmp / f'killed_in_save_{attempt}'
      process = _start(workdir)
      # Skip the first saves, which may overlap compilation.
      _wait_until(
          lambda: any(
              name.endswith(_TMP_SUFFIX) and int(name.split('.')[0]) > 5
              for name in _checkpoint_entries(workdir)  # noqa: B023
          ),
          process,
          'before a save was in progress',
      )
      process.send_signal(signal.SIGKILL)
      self.assertEqual(process.wait(), -signal.SIGKILL)
      entries = _checkpoint_entries(workdir)
      in_progress = [int(n.split('.')[0]) for n in entries if _TMP_SUFFIX in n]
      if in_progress:
        break
    else:
      self.fail('Three kills all landed between saves; no save was cut.')
    complete = [int(name) for name in entries if name.isdigit()]
    self.assertNotEmpty(complete)
    self.assertLess(max(complete), min(in_progress))

    returncode, output = _run(workdir)
    self.assertEqual(returncode, 0, output[-3000:])
    self.assertIn(f'Restored step {max(complete)} from', output)
    self.assertFalse(
        any(_TMP_SUFFIX in name for name in _checkpoint_entries(workdir))
    )
    self.assertEqual(
        _summary(workdir)['final_params_sha256'],
        self.reference['final_params_sha256'],
    )

  def test_truncated_checkpoint_gives_clear_error(self):
    workdir = self.tmp / 'truncated'
    shutil.copytree(self.reference_dir, workdir)
    last = workdir / 'checkpoints' / str(_NUM_STEPS)
    data_files = [p for p in last.rglob('*') if p.parent.name == 'd']
    self.assertNotEmpty(data_files)
    for path in data_files:
      path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])

    returncode, output = _run(workdir)
    self.assertNotEqual(returncode, 0)
    self.assertIn('CorruptCheckpointError', output)
    self.assertIn(f'Checkpoint {last} is truncated or corrupted', output)
    self.assertIn(
        f'Delete {last} to resume from the previous checkpoint', output
    )

    # Following the advice resumes from the step before and ends identically.
    shutil.rmtree(last)
    returncode, output = _run(workdir)
    self.assertEqual(returncode, 0, output[-3000:])
    self.assertIn(f'Restored step {_NUM_STEPS - 1} from', output)
    self.assertEqual(
        _summary(workdir)['final_params_sha256'],
        self.reference['final_params_sha256'],
    )


if __name__ == '__main__':
  absltest.main()
