"""The training loop shared by every experiment and training stage.

`run_training` restores the latest checkpoint of a stage or builds a fresh
state, runs the compiled train step up to `num_steps`, writes metrics and
progress lines, saves checkpoints, and stops at the first non-finite loss or
gradient. Run it once per stage (reference LM, reward model, each RL run),
each stage with its own workdir.

Resume is exact. The state carries the step, the PRNG key (each step folds in
its step number) and the data position. So a run killed at any point and
started again with the same arguments ends with the same parameters, bit for
bit, on the same machine and software.
"""

from collections.abc import Callable, Mapping, Sequence
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import checkpointing
from infalign_jax import metrics
from infalign_jax import train

CHECKPOINT_DIR = 'checkpoints'

# Steps after the start (or restart) that are always logged, so a slow or
# failing first step shows up at once.
_FIRST_LOGGED_STEPS = 5

TrainStep = Callable[
    [train.TrainState, Any, Any], tuple[train.TrainState, dict[str, jax.Array]]
]
BatchFn = Callable[[int], tuple[Any, int]]


class NonFiniteError(FloatingPointError):
  """A train step produced a non-finite loss or gradient."""


@jax.jit
def _update_first_nonfinite(
    first_step: jax.Array,
    step: jax.Array,
    loss: jax.Array,
    nonfinite_count: jax.Array,
) -> jax.Array:
  """Return `step` if it is the first step with a non-finite value, on device."""
  bad = jnp.logical_or(nonfinite_count > 0, jnp.logical_not(jnp.isfinite(loss)))
  return jnp.where(jnp.logical_and(first_step < 0, bad), step, first_step)


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m{seconds:02d}s'
  return f'{minutes}m{seconds:02d}s'


def _log_start(workdir: epath.Path, config_json: str) -> None:
  logging.info(
      'Training in %s with JAX %s; process %d of %d; %d devices: %s',
      workdir,
      jax.__version__,
      jax.process_index(),
      jax.process_count(),
      jax.device_count(),
      jax.devices(),
  )
  logging.info('Config:\n%s', config_json)


def run_training(
    *,
    workdir: epath.PathLike,
    train_step: TrainStep,
    init_state_fn: Callable[[], train.TrainState],
    batch_fn: BatchFn,
    num_steps: int,
    config_json: str,
    frozen: Any = None,
    table_identity: Mapping[str, Any] | None = None,
    save_every: int = 1000,
    log_every: int = 100,
    keep_last: int = 3,
    keep_every: int | None = None,
    state_sharding: jax.sharding.Sharding | None = None,
    extra_writers: Sequence[metrics.MetricWriter] = (),
) -> train.TrainState:
  """Train one stage from its latest checkpoint (or from scratch) to the end.

  Checkpoints go to `workdir/checkpoints/`, metrics to
  `workdir/metrics.jsonl`, `workdir/tensorboard/` and the log, each metric
  named `train/<name>`. Metrics are copied to the host only at log steps:
  the first 5 steps after the start, every `log_every` steps and the last
  step. Progress lines give steps per second over the last interval and the
  estimated time left; the first interval includes compilation.

  Non-finite values: each step's `loss` and `nonfinite_count` (from
  `train.make_train_step`) are checked on the device. At every log or save
  step, the run raises `NonFiniteError` naming the first bad step, before any
  checkpoint of that state is written, so the latest checkpoint is always a
  finite state from before the failure.

  Args:
    workdir: directory of this stage; created if missing.
    train_step: compiled `train_step(state, batch, frozen) -> (state,
      metrics)`, for example `jax.jit(train.make_train_step(...),
      donate_argnums=0)`. `metrics` must contain scalar `loss` and
      `nonfinite_count`.
    init_state_fn: zero-argument function that builds the initial
      `TrainState`. When a checkpoint exists it only runs under
      `jax.eval_shape`, to describe the state to restore.
    batch_fn: `batch_fn(data_position) -> (batch, next_data_position)`, a
      deterministic function of the position (an int), so a resumed run reads
      the same batches. It returns the batch in the layout `train_step`
      expects (host arrays, or arrays already sharded over the mesh).
    num_steps: total number of train steps of the stage (not the number left).
    config_json: the stage's full config as JSON, stored in every checkpoint.
      A restore under a different config raises
      `checkpointing.IncompatibleCheckpointError`.
    frozen: arrays passed to every step and never trained (reference policy,
      reward model parameters); not checkpointed.
    table_identity: identity of the calibration table, stored in every
      checkpoint and checked on restore; None when the stage uses none.
    save_every: save a checkpoint every this many steps, and at the last step.
    log_every: log and write metrics every this many steps.
    keep_last: number of latest checkpoints kept.
    keep_every: also keep each checkpoint whose step is a multiple of this.
    state_sharding: sharding of the restored state's leaves; defaults to
      replicated over all devices (see `checkpointing.abstract_state`).
    extra_writers: metric writers used in addition to the default ones.

  Returns:
    The final state, with `step == num_steps`, after its checkpoint has been
    written to disk.

  Raises:
    NonFiniteError: a step produced a non-finite loss or gradient.
    ValueError: a step count or interval is out of range.
    checkpointing.IncompatibleCheckpointError: the latest checkpoint belongs
      to another config, calibration table or model.
    checkpointing.CorruptCheckpointError: the latest checkpoint is damaged.
  """
  for name, value in (
      ('num_steps', num_steps),
      ('save_every', save_every),
      ('log_every', log_every),
  ):
    if value < 1:
      raise ValueError(f'{name} must be >= 1, got {value}.')
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _log_start(workdir, config_json)

  with checkpointing.RunCheckpointer(
      workdir / CHECKPOINT_DIR,
      config_json=config_json,
      table_identity=table_identity,
      keep_last=keep_last,
      keep_every=keep_every,
  ) as checkpointer:
    state, _ = checkpointer.restore_or_init(init_state_fn, state_sharding)
    start_step = int(state.step)
    if start_step > num_steps:
      raise ValueError(
          f'The checkpoint in {checkpointer.directory} is at step '
          f'{start_step}, past num_steps={num_steps}. Raise num_steps or use '
          'a new workdir.'
      )
    data_position = int(state.data_position)
    writer = metrics.MultiWriter(
        (
            metrics.create_default_writer(workdir, resume_step=start_step),
            *extra_writers,
        )
    )
    try:
      state = _run_steps(
          state=state,
          checkpointer=checkpointer,
          writer=writer,
          train_step=train_step,
          batch_fn=batch_fn,
          frozen=frozen,
          start_step=start_step,
          num_steps=num_steps,
          data_position=data_position,
          save_every=save_every,
          log_every=log_every,
      )
    finally:
      writer.close()
  # Leaving the `with` block waited for the last save.
  logging.info('Finished at step %d in %s.', num_steps, workdir)
  return state


def _run_steps(
    *,
    state: train.TrainState,
    checkpointer: checkpointing.RunCheckpointer,
    writer: metrics.MetricWriter,
    train_step: TrainStep,
    batch_fn: BatchFn,
    frozen: Any,
    start_step: int,
    num_steps: int,
    data_position: int,
    save_every: int,
    log_every: int,
) -> train.TrainState:
  """Run steps `start_step + 1 .. num_steps`; see `run_training`."""
  logging.info(
      'Starting at step %d of %d (data position %d).',
      start_step,
      num_steps,
      data_position,
  )
  first_nonfinite = jnp.asarray(-1, jnp.int32)
  last_log_time = time.perf_counter()
  last_log_step = start_step
  last_saved = checkpointer.latest_step
  for step in range(start_step + 1, num_steps + 1):
    batch, data_position = batch_fn(data_position)
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      state, step_metrics = train_step(state, batch, frozen)
    first_nonfinite = _update_first_nonfinite(
        first_nonfinite,
        np.int32(step),
        step_metrics['loss'],
        step_metrics['nonfinite_count'],
    )
    is_log_step = (
        step <= start_step + _FIRST_LOGGED_STEPS
        or step % log_every == 0
        or step == num_steps
    )
    is_save_step = step % save_every == 0 or step == num_steps
    if not (is_log_step or is_save_step):
      continue

    # Fetching the flag waits for this step, so the checks below see it.
    bad_step = int(first_nonfinite)
    if bad_step >= 0:
      if last_saved is None:
        where = (
            f'No checkpoint exists in {checkpointer.directory}, so a new '
            'run starts from step 0.'
        )
      else:
        where = (
            f'A re-run resumes from the checkpoint of step {last_saved} in '
            f'{checkpointer.directory}.'
        )
      raise NonFiniteError(
          f'Non-finite loss or gradient at step {bad_step}. {where} Check '
          'the rewards and inputs of that step first (a NaN reward, or a '
          'reward transform that overflows, such as exp(t u) with t u > 88 '
          'in float32); if they are finite, lower the learning rate.'
      )
    if is_log_step:
      host_metrics = jax.device_get(step_metrics)
      now = time.perf_counter()
      steps_per_second = (step - last_log_step) / max(now - last_log_time, 1e-9)
      eta = (num_steps - step) / steps_per_second
      logging.info(
          'step %d/%d (%.1f%%): %.3g steps/s, ETA %s, loss %.6g',
          step,
          num_steps,
          100.0 * step / num_steps,
          steps_per_second,
          _format_seconds(eta),
          float(host_metrics['loss']),
      )
      scalars = {f'train/{name}': v for name, v in host_metrics.items()}
      scalars['train/steps_per_second'] = steps_per_second
      writer.write_scalars(step, scalars)
      writer.flush()
      last_log_time, last_log_step = now, step
    if is_save_step:
      state = state.replace(data_position=jnp.asarray(data_position, jnp.int32))
      checkpointer.save(step, state)
      last_saved = step
  return state
