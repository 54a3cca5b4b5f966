"""Run bookkeeping shared by every experiment.

Each run owns its workdir. The first run writes `config.json` there. A later
run with the same workdir resumes when its config is the same, and a run with
a different config is rejected before it touches anything. At the end
every run writes `summary.json` with the final step and a SHA-256 over the
final parameters.
"""

from collections.abc import Callable, Mapping
import hashlib
import json
import os
import platform
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

CONFIG_FILE = 'config.json'
SUMMARY_FILE = 'summary.json'


def config_to_json(config: ml_collections.ConfigDict) -> str:
  """Serialize a config deterministically (sorted keys)."""
  return json.dumps(config.to_dict(), sort_keys=True, indent=2, default=str)


def write_json_atomic(path: os.PathLike[str] | str, payload: Any) -> None:
  """Write JSON to `path` through a temporary file and a rename.

  A reader never sees a half-written file, even if the process is killed.
  """
  path = epath.Path(path)
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
  os.replace(tmp, path)


def check_workdir_config(
    config: ml_collections.ConfigDict, workdir: epath.Path
) -> None:
  """Record the config in `workdir`, or check it matches the recorded one.

  Raises:
    ValueError: the workdir contains a run made with another config.
  """
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / CONFIG_FILE
  current = json.loads(config_to_json(config))
  if path.exists():
    recorded = json.loads(path.read_text())
    if recorded != current:
      differing = sorted(
          key
          for key in set(recorded) | set(current)
          if recorded.get(key) != current.get(key)
      )
      raise ValueError(
          f'Workdir {workdir} contains a run made with another config (fields '
          f'that differ: {differing}; recorded config in {path}). Resume '
          'with the recorded config, or choose a new --workdir.'
      )
    return
  write_json_atomic(path, current)


def params_sha256(params: Any) -> str:
  """SHA-256 over the bytes of the parameter leaves, in tree order."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params):
    digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()


def log_environment(config: ml_collections.ConfigDict) -> None:
  """Log the JAX version, processes, devices and the full config."""
  logging.info(
      'JAX %s on Python %s; process %d of %d; %d devices: %s',
      jax.__version__,
      platform.python_version(),
      jax.process_index(),
      jax.process_count(),
      jax.device_count(),
      jax.devices(),
  )
  logging.info('Config:\n%s', config_to_json(config))


def _forget_failed_start(workdir: epath.Path, *, remove_dir: bool) -> None:
  """Undo the config record of a first run that failed on invalid input.

  A config rejected by the experiment's own validation must not lock the
  workdir: the corrected command has to be able to start there. Artifacts
  the failed run wrote stay, and each experiment checks their identity
  (stage identities, checkpoint config) before it reuses them.
  """
  (workdir / CONFIG_FILE).unlink(missing_ok=True)
  if remove_dir and not any(workdir.iterdir()):
    workdir.rmdir()
  logging.info('Removed the config record of the failed start in %s', workdir)


def run_experiment(
    run_fn: Callable[
        [ml_collections.ConfigDict, epath.Path], Mapping[str, Any]
    ],
    config: ml_collections.ConfigDict,
    workdir: str,
) -> dict[str, Any]:
  """Check the workdir, run `run_fn` and write `summary.json`.

  `run_fn(config, workdir)` returns a mapping with at least `final_step` and
  `final_params_sha256` (None for runs without parameters); every other key
  lands in the summary as is.
  """
  workdir_path = epath.Path(workdir).resolve()
  jax.config.update('jax_threefry_partitionable', True)
  log_environment(config)
  created = not workdir_path.exists()
  fresh = created or not (workdir_path / CONFIG_FILE).exists()
  check_workdir_config(config, workdir_path)
  start = time.time()
  try:
    result = dict(run_fn(config, workdir_path))
  except ValueError:
    # Invalid config values and inputs raise ValueError. Other failures,
    # such as a crash or a non-finite loss, keep the record, so only a
    # resume with the same config continues the run.
    if fresh:
      _forget_failed_start(workdir_path, remove_dir=created)
    raise
  for key in ('final_step', 'final_params_sha256'):
    if key not in result:
      raise KeyError(f'{run_fn!r} returned no {key!r}: got {sorted(result)}')
  summary = {
      'experiment': config.experiment,
      'workdir': str(workdir_path),
      'wall_seconds': round(time.time() - start, 3),
      **result,
  }
  write_json_atomic(workdir_path / SUMMARY_FILE, summary)
  logging.info('Wrote %s', workdir_path / SUMMARY_FILE)
  return summary
