"""Checkpoints of a training run: the one module that calls Orbax.

This module uses the v1 API of orbax-checkpoint 0.12.8,
`orbax.checkpoint.experimental.v1.training.Checkpointer`, rather than the v0
`CheckpointManager`, because:

- it takes an explicit preservation policy object, so the keep rule below is
  one readable expression;
- it stores per-checkpoint JSON `custom_metadata` next to the array tree,
  without a `Composite` of save arguments;
- Orbax states that v1 becomes its top-level API at 1.0 and that v1 reads v0
  checkpoints, so this choice does not strand old runs.

Every Orbax call lives here, so reverting to v0 touches one file.

A checkpoint is a directory `<root>/<step>/` holding the whole `TrainState`
(params, optimizer state, step, typed PRNG key, data position) as one pytree,
plus JSON metadata: the run's config and the identity of its calibration
table. Saves are asynchronous. Orbax writes each step into a temporary
directory and renames it when the save completes, so a process killed during
a save leaves the previous checkpoints intact. The next `RunCheckpointer`
opened on the same root removes the leftover temporary directory.

Keep policy: the latest `keep_last` checkpoints, plus every checkpoint whose
step is a multiple of `keep_every` (when given). All others are deleted after
each save.

Restores go against an abstract state (`abstract_state`: `jax.eval_shape` of
the init function, with shardings). Before Orbax reads any array, the stored
config, calibration-table identity and tree structure, shapes and dtypes are
compared with the expected ones, and any difference raises
`IncompatibleCheckpointError` naming it. A checkpoint that cannot be read
(truncated, corrupted or missing files) raises `CorruptCheckpointError` naming
the step directory to delete.
"""

from collections.abc import Callable, Mapping
import json
import logging as std_logging
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
from orbax.checkpoint.experimental import v1 as ocp

from infalign_jax import train

# Version of the metadata layout written below; bump it when the layout
# changes, so old checkpoints fail with a clear message.
_FORMAT_VERSION = 1


class _QuietOrbaxInfo(std_logging.Filter):
  """Drop Orbax's INFO and DEBUG records; warnings and errors pass.

  Orbax logs a dozen INFO lines per save through absl, which buries the
  training loop's progress lines.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    quiet_source = '/orbax/' in record.pathname.replace('\\', '/')
    return record.levelno >= std_logging.WARNING or not quiet_source


std_logging.getLogger('absl').addFilter(_QuietOrbaxInfo())


class CorruptCheckpointError(ValueError):
  """A checkpoint directory exists but cannot be read back."""


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint does not match the run that tries to resume it."""


def abstract_state(
    init_state_fn: Callable[[], train.TrainState],
    sharding: jax.sharding.Sharding | None = None,
) -> train.TrainState:
  """Shapes, dtypes and shardings of the state `init_state_fn` would build.

  Nothing is computed: `init_state_fn` runs under `jax.eval_shape`.

  Args:
    init_state_fn: zero-argument function that builds a fresh `TrainState`.
    sharding: sharding given to every leaf. Defaults to a state replicated
      over all devices (a mesh with one 'data' axis), the layout of the
      shared train step.

  Returns:
    A `TrainState` of `jax.ShapeDtypeStruct` leaves.
  """
  if sharding is None:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shapes = jax.eval_shape(init_state_fn)
  return jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(
          leaf.shape, leaf.dtype, sharding=sharding
      ),
      shapes,
  )


def _path_name(path: tuple[Any, ...]) -> str:
  """Render a pytree key path as 'params/dense/kernel'."""
  parts = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      parts.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      parts.append(entry.name)
    elif isinstance(entry, jax.tree_util.SequenceKey):
      parts.append(str(entry.idx))
    else:
      parts.append(str(entry))
  return '/'.join(parts)


def _stored_layout(leaf: Any) -> tuple[tuple[int, ...], str]:
  """Shape and dtype under which Orbax stores an abstract leaf.

  Typed PRNG keys are stored as their raw key data, for example uint32 [2]
  per threefry key.
  """
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(
        jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    )
  return tuple(leaf.shape), str(np.dtype(leaf.dtype))


def _describe_tree_mismatch(stored: Any, expected: Any) -> list[str]:
  """List every structure, shape and dtype difference, as readable lines."""
  stored_leaves = {
      _path_name(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
      for path, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]
  }
  expected_leaves = {
      _path_name(path): _stored_layout(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]
  }
  lines = []
  for name in sorted(set(stored_leaves) | set(expected_leaves)):
    if name not in expected_leaves:
      lines.append(f'{name}: in the checkpoint but not in the run')
    elif name not in stored_leaves:
      lines.append(f'{name}: in the run but not in the checkpoint')
    elif stored_leaves[name] != expected_leaves[name]:
      stored_shape, stored_dtype = stored_leaves[name]
      shape, dtype = expected_leaves[name]
      lines.append(
          f'{name}: checkpoint has {stored_dtype}{list(stored_shape)}, '
          f'run expects {dtype}{list(shape)}'
      )
  return lines


def _describe_json_mismatch(
    stored: Any, expected: Any, prefix: str = ''
) -> list[str]:
  """List the dotted keys whose values differ between two JSON values."""
  if isinstance(stored, dict) and isinstance(expected, dict):
    lines = []
    for key in sorted(set(stored) | set(expected), key=str):
      name = f'{prefix}.{key}' if prefix else str(key)
      if key not in expected:
        lines.append(f'{name}: only in the checkpoint')
      elif key not in stored:
        lines.append(f'{name}: only in the run')
      else:
        lines.extend(_describe_json_mismatch(stored[key], expected[key], name))
    return lines
  if stored != expected:
    return [
        f'{prefix or "<root>"}: checkpoint has {stored!r}, run has '
        f'{expected!r}'
    ]
  return []


class RunCheckpointer:
  """Saves and restores the `TrainState` of one run under one directory.

  Use it as a context manager: leaving the block waits for pending
  asynchronous saves and closes Orbax. All methods must be called from the
  main thread of every process (Orbax coordinates multi-host saves).

  Example:
    with RunCheckpointer(workdir / 'checkpoints', config_json=cfg) as ckpt:
      state = ckpt.restore_or_init(init_state_fn)
      ...
      ckpt.save(step, state)
  """

  def __init__(
      self,
      directory: epath.PathLike,
      *,
      config_json: str,
      table_identity: Mapping[str, Any] | None = None,
      keep_last: int = 3,
      keep_every: int | None = None,
  ):
    """Open (or create) the checkpoint directory.

    Args:
      directory: root directory; each checkpoint is a subdirectory named by
        its step.
      config_json: the run's full config as a JSON string. It is stored with
        every checkpoint, and a restore under another config is rejected.
      table_identity: JSON-serializable identity of the calibration table the
        run uses (None when it uses none); checked like the config.
      keep_last: number of most recent checkpoints kept, at least 1.
      keep_every: also keep every checkpoint whose step is a multiple of
        this; None keeps no extra ones.

    Raises:
      ValueError: `config_json` is not valid JSON, or a keep setting is out
        of range.
      CorruptCheckpointError: Orbax cannot list the existing checkpoints.
    """
    if keep_last < 1:
      raise ValueError(f'keep_last must be >= 1, got {keep_last}.')
    if keep_every is not None and keep_every < 1:
      raise ValueError(f'keep_every must be >= 1 or None, got {keep_every}.')
    try:
      self._config = json.loads(config_json)
    except json.JSONDecodeError as err:
      raise ValueError(
          f'config_json is not valid JSON ({err}); pass the output of '
          'json.dumps(config).'
      ) from err
    self._table_identity = (
        None
        if table_identity is None
        else json.loads(json.dumps(table_identity, sort_keys=True))
    )
    self._directory = epath.Path(directory)
    policies = ocp.training.preservation_policies
    keep = [policies.LatestN(keep_last)]
    if keep_every is not None:
      keep.append(policies.EveryNSteps(keep_every))
    try:
      # The loop decides when to save and passes force=True, so the save
      # decision policy below never skips a requested save.
      self._checkpointer = ocp.training.Checkpointer(
          self._directory,
          save_decision_policy=(
              ocp.training.save_decision_policies.FixedIntervalPolicy(1)
          ),
          preservation_policy=policies.AnyPreservationPolicy(keep),
          cleanup_tmp_directories=True,
      )
    except (OSError, ValueError, KeyError, TypeError) as err:
      raise CorruptCheckpointError(
          f'Cannot list the checkpoints in {self._directory}: {err}. Delete '
          'the step directory that fails to parse, or the whole directory to '
          'start over.'
      ) from err

  @property
  def directory(self) -> epath.Path:
    """Root directory of the checkpoints."""
    return self._directory

  @property
  def steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending."""
    return [checkpoint.step for checkpoint in self._checkpointer.checkpoints]

  @property
  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None if there is none."""
    latest = self._checkpointer.latest
    return None if latest is None else latest.step

  def step_directory(self, step: int) -> epath.Path:
    """Directory that contains the checkpoint of `step`."""
    return self._directory / str(step)

  def save(self, step: int, state: train.TrainState) -> None:
    """Start an asynchronous save of `state` as checkpoint `step`.

    Returns as soon as the arrays are copied off the accelerator. The
    previous save, if still running, is finished first. Call `wait` (or leave
    the `with` block) before the process exits.

    Args:
      step: step number; must equal `state.step` and be larger than every
        saved step.
      state: the state to save. It may be donated to the next train step once
        this returns.
    """
    self._checkpointer.save_async(
        step,
        state,
        force=True,
        custom_metadata={
            'format_version': _FORMAT_VERSION,
            'config': self._config,
            'calibration_table': self._table_identity,
        },
    )

  def wait(self) -> None:
    """Block until every pending save has been committed to disk."""
    self._checkpointer.wait()

  def close(self) -> None:
    """Wait for pending saves and release Orbax's resources."""
    self._checkpointer.close()

  def __enter__(self) -> 'RunCheckpointer':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def restore(
      self, abstract: train.TrainState, step: int | None = None
  ) -> train.TrainState:
    """Restore checkpoint `step` (default: the latest) into `abstract`'s layout.

    Args:
      abstract: expected state, as built by `abstract_state`; leaves carry
        shape, dtype and sharding.
      step: step to restore; None restores the latest.

    Returns:
      The restored `TrainState`, with arrays placed by `abstract`'s shardings
      and the PRNG key as a typed key.

    Raises:
      FileNotFoundError: there is no checkpoint (at `step`).
      IncompatibleCheckpointError: the stored config, calibration table
        identity, tree structure, shapes or dtypes differ from this run's.
      CorruptCheckpointError: the checkpoint's files cannot be read.
    """
    if step is None:
      step = self.latest_step
      if step is None:
        raise FileNotFoundError(f'No checkpoint in {self._directory}.')
    elif step not in self.steps:
      raise FileNotFoundError(
          f'No checkpoint at step {step} in {self._directory}; saved steps: '
          f'{self.steps}.'
      )
    path = self.step_directory(step)
    fix = (
        f'Delete {path} to resume from the previous checkpoint, or delete '
        f'{self._directory} to start the run over.'
    )
    try:
      metadata = self._checkpointer.metadata(step)
      stored_tree = metadata.metadata
      custom = metadata.custom_metadata
    except Exception as err:  # Orbax raises many types for unreadable files.
      raise CorruptCheckpointError(
          f'Checkpoint {path} is truncated or corrupted: its metadata cannot '
          f'be read ({type(err).__name__}: {err}). {fix}'
      ) from err
    if stored_tree is None:
      # Orbax logs a warning and returns no tree when `_METADATA` is garbled.
      raise CorruptCheckpointError(
          f'Checkpoint {path} is truncated or corrupted: its tree metadata '
          f'cannot be read. {fix}'
      )
    self._check_compatible(path, custom, stored_tree, abstract)
    try:
      return self._checkpointer.load(step, abstract_state=abstract)
    except Exception as err:  # Orbax raises many types for unreadable files.
      raise CorruptCheckpointError(
          f'Checkpoint {path} is truncated or corrupted: its arrays cannot be '
          f'read ({type(err).__name__}: {err}). {fix}'
      ) from err

  def _check_compatible(
      self,
      path: epath.Path,
      custom: Any,
      stored_tree: Any,
      abstract: train.TrainState,
  ) -> None:
    """Raise `IncompatibleCheckpointError` if the checkpoint is not this run's."""
    if not isinstance(custom, dict) or 'config' not in custom:
      raise CorruptCheckpointError(
          f'Checkpoint {path} has no run metadata (config and calibration '
          'table); it was not written by infalign_jax.checkpointing, or its '
          f'metadata file is damaged. Delete {path} to resume from the '
          'previous checkpoint.'
      )
    if custom.get('format_version') != _FORMAT_VERSION:
      raise IncompatibleCheckpointError(
          f'Checkpoint {path} has metadata format '
          f'{custom.get("format_version")!r}; this code reads format '
          f'{_FORMAT_VERSION}. Start a new run in a fresh workdir.'
      )
    differences = _describe_json_mismatch(custom['config'], self._config)
    if differences:
      raise IncompatibleCheckpointError(
          f'Checkpoint {path} was made with another config; differing '
          f'fields: {"; ".join(differences)}. Resume with the config it was '
          'made with, or choose a new workdir.'
      )
    differences = _describe_json_mismatch(
        custom.get('calibration_table'), self._table_identity
    )
    if differences:
      raise IncompatibleCheckpointError(
          f'Checkpoint {path} was made with another calibration table; '
          f'differences: {"; ".join(differences)}. Resume with the table it '
          'was made with, or choose a new workdir.'
      )
    differences = _describe_tree_mismatch(stored_tree, abstract)
    if differences:
      raise IncompatibleCheckpointError(
          f'Checkpoint {path} does not match the train state of this run: '
          f'{"; ".join(differences)}. Resume with the model and optimizer it '
          'was made with, or choose a new workdir.'
      )

  def restore_or_init(
      self,
      init_state_fn: Callable[[], train.TrainState],
      sharding: jax.sharding.Sharding | None = None,
  ) -> tuple[train.TrainState, bool]:
    """Restore the latest checkpoint, or build a fresh state if there is none.

    Args:
      init_state_fn: zero-argument function that builds a fresh state; only
        traced abstractly when a checkpoint exists.
      sharding: passed to `abstract_state`.

    Returns:
      `(state, restored)`, where `restored` is True when `state` came from a
      checkpoint.
    """
    step = self.latest_step
    if step is None:
      logging.info(
          'No checkpoint in %s; starting from scratch.', self._directory
      )
      return init_state_fn(), False
    state = self.restore(abstract_state(init_state_fn, sharding), step)
    logging.info('Restored step %d from %s.', step, self.step_directory(step))
    return state, True
