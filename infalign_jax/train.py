"""Train state, the shared train step, and how it runs on many devices.

One pure step function `train_step(state, batch, frozen) -> (state, metrics)`
runs in two ways that give the same result:

- primary: `jit_train_step` compiles it with jax.jit over a one-axis device
  mesh named 'data' (`make_mesh`). Every batch leaf is sharded on its leading
  axis, the state and the frozen arrays are replicated, the state is donated
  and the frozen arrays never are. XLA inserts the cross-device reductions.
- legacy: `pmap_train_step` wraps the same step, built with
  `axis_name='data'`, in jax.pmap. The step then averages gradients and
  metrics across devices itself (`jax.lax.pmean`). Use `replicate`,
  `split_batch` and `unreplicate` to move values in and out.

Both paths give the same parameters up to float summation order, provided
the loss is a mean over the leading batch axis and randomness is drawn per
example. tests/multidevice checks this for jit on 8 devices, pmap on 8
devices and one device, after 3 RL steps.

Notation: B prompts, S policy samples per prompt, M reference samples per
prompt, T tokens, V vocabulary.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

DATA_AXIS = 'data'


@flax.struct.dataclass
class TrainState:
  """Everything that decides the rest of a run, as one pytree.

  Attributes:
    step: int32 scalar, number of train steps completed so far. A step of
      `make_train_step` applies one optimizer update; a PPO step of
      `rl.make_rl_train_step` applies one per inner epoch.
    params: the trained parameters.
    opt_state: the optax optimizer state.
    key: typed PRNG key of the run; each step folds in `step`.
    data_position: int32 scalar, index of the next example the data pipeline
      yields, so a resumed run reads the same batches.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  key: jax.Array
  data_position: jax.Array


LossFn = Callable[
    [Any, Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]
]


def init_train_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    *,
    data_position: int = 0,
) -> TrainState:
  """Build the state of a fresh run from initial parameters."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      key=key,
      data_position=jnp.asarray(data_position, jnp.int32),
  )


TrainStepFn = Callable[
    [TrainState, Any, Any], tuple[TrainState, dict[str, jax.Array]]
]


def count_nonfinite(loss: jax.Array, grads: Any) -> jax.Array:
  """Count NaN and infinite entries in a loss and a gradient tree (int32)."""
  count = jnp.sum(jnp.logical_not(jnp.isfinite(loss)), dtype=jnp.int32)
  for leaf in jax.tree_util.tree_leaves(grads):
    count += jnp.sum(jnp.logical_not(jnp.isfinite(leaf)), dtype=jnp.int32)
  return count


def apply_gradients(
    params: Any,
    opt_state: Any,
    grads: Any,
    loss: jax.Array,
    metrics: dict[str, jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
) -> tuple[Any, Any, dict[str, jax.Array]]:
  """Average across devices (pmap only), then apply one optimizer update.

  This is the update shared by every train step in the project, so supervised
  and RL steps report the same metrics.

  Args:
    params: current parameters.
    opt_state: current optimizer state.
    grads: gradients of `loss` with respect to `params`, local to this device
      under pmap.
    loss: scalar loss.
    metrics: flat dict of scalar metrics. Under pmap they are cast to float32
      and averaged across devices, because `pmean` of an integer would
      truncate.
    optimizer: optax gradient transformation.
    axis_name: the pmap axis name, or None under jit.

  Returns:
    `(params, opt_state, metrics)`, with `loss`, `grad_norm` (global norm of
    the averaged gradients) and `nonfinite_count` (NaN and infinite entries
    in the averaged loss and gradients) added to the metrics.
  """
  metrics = dict(metrics)
  if axis_name is not None:
    metrics = {
        name: value.astype(jnp.float32) for name, value in metrics.items()
    }
    loss, metrics, grads = jax.lax.pmean(
        (loss, metrics, grads), axis_name=axis_name
    )
  nonfinite = count_nonfinite(loss, grads)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics['loss'] = loss
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['nonfinite_count'] = nonfinite
  return params, opt_state, metrics


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
) -> TrainStepFn:
  """Make a pure `train_step(state, batch, frozen) -> (state, metrics)`.

  Args:
    loss_fn: `loss_fn(params, batch, frozen, key) -> (loss, metrics)` with a
      scalar loss and a flat dict of scalar metrics. `frozen` holds arrays that
      are never trained (reference parameters, reward-model parameters).
    optimizer: an optax gradient transformation.
    axis_name: set only under `jax.pmap`; gradients and metrics are averaged
      over this axis. Under `jax.jit` over a mesh, XLA inserts the reductions.

  Returns:
    The step function. Each step derives its key as
    `fold_in(state.key, state.step)`, so a resumed run draws the same numbers.
    Under pmap every device gets the same key: draw randomness per example
    (fold in an example index) so that jit and pmap agree. Metrics gain
    `loss`, `grad_norm` and `nonfinite_count` (see `apply_gradients`).
  """

  def train_step(state, batch, frozen):
    step_key = jax.random.fold_in(state.key, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, batch, frozen, step_key)
    params, opt_state, metrics = apply_gradients(
        state.params,
        state.opt_state,
        grads,
        loss,
        metrics,
        optimizer,
        axis_name=axis_name,
    )
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state
    )
    return new_state, metrics

  return train_step


# ---------------------------------------------------------------------------
# jit over a device mesh (the primary path).


def make_mesh(num_devices: int | None = None) -> Mesh:
  """Build a one-axis mesh named 'data' over the first `num_devices` devices.

  Args:
    num_devices: number of devices; None takes all of `jax.devices()`.

  Returns:
    A `jax.sharding.Mesh` of shape (num_devices,) with axis name 'data'.
  """
  devices = jax.devices()
  if num_devices is None:
    num_devices = len(devices)
  if not 1 <= num_devices <= len(devices):
    raise ValueError(
        f'num_devices={num_devices} is invalid: this process sees '
        f'{len(devices)} devices. Pass a value in [1, {len(devices)}], or set '
        'XLA_FLAGS=--xla_force_host_platform_device_count=N for N CPU devices.'
    )
  # Auto axes: shardings stay out of the array types, and XLA propagates them
  # from `in_shardings`, so step functions index and gather without naming
  # the mesh (Explicit axes would make them sharding-aware).
  return jax.make_mesh(
      (num_devices,),
      (DATA_AXIS,),
      axis_types=(jax.sharding.AxisType.Auto,),
      devices=devices[:num_devices],
  )


def _check_batch_divisible(batch: Any, num_shards: int) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
    shape = jnp.shape(leaf)
    if not shape or shape[0] % num_shards:
      raise ValueError(
          f'Batch leaf {jax.tree_util.keystr(path)} has shape {shape}, whose '
          f'leading (batch) axis is not divisible by the {num_shards} '
          'devices of the data axis. Make the batch size a multiple of the '
          'device count.'
      )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Place every batch leaf on `mesh`, split on its leading axis."""
  _check_batch_divisible(batch, mesh.shape[DATA_AXIS])
  return jax.device_put(batch, NamedSharding(mesh, P(DATA_AXIS)))


def replicate_on_mesh(tree: Any, mesh: Mesh) -> Any:
  """Place a full copy of every leaf on each device of `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def jit_train_step(train_step: TrainStepFn, mesh: Mesh) -> TrainStepFn:
  """Compile `train_step` with jax.jit over `mesh`.

  The batch is sharded on its leading axis over 'data'; state, frozen arrays,
  the new state and the metrics are replicated. The input state is donated,
  so its buffers are reused for the new state and must not be read after the
  call. The frozen arrays are never donated, but they must not share a buffer
  with the state either (XLA rejects a donated buffer that is also passed as
  another argument): copy reference parameters initialized from the policy,
  for example with `jax.tree.map(jnp.copy, params)`.

  Args:
    train_step: a step built with `axis_name=None`.
    mesh: a mesh with a 'data' axis, for example from `make_mesh`.

  Returns:
    The compiled step, `step(state, batch, frozen) -> (state, metrics)`.
    Place the inputs with `replicate_on_mesh` and `shard_batch` first; other
    committed placements are rejected by jax.jit.
  """
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(
        f'mesh axes {mesh.axis_names} lack the {DATA_AXIS!r} axis; build the '
        'mesh with make_mesh().'
    )
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(DATA_AXIS))
  return jax.jit(
      train_step,
      in_shardings=(replicated, sharded, replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,),
  )


# ---------------------------------------------------------------------------
# The jax.pmap adapter.


def pmap_train_step(
    train_step: TrainStepFn,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> TrainStepFn:
  """Wrap a step built with `axis_name='data'` in jax.pmap.

  Args:
    train_step: a step whose gradients and metrics are averaged over the
      'data' axis, for example `make_train_step(..., axis_name='data')`.
    devices: devices to map over; None takes `jax.local_devices()`.

  Returns:
    `step(state, batch, frozen) -> (state, metrics)` taking a state replicated
    with `replicate`, a batch split with `split_batch` ([D, B / D, ...]) and
    unreplicated frozen arrays, which are broadcast to every device and never
    donated. The state is donated. The returned state and metrics have a
    leading device axis; `unreplicate` takes the first copy.
  """
  return jax.pmap(
      train_step,
      axis_name=DATA_AXIS,
      in_axes=(0, 0, None),
      devices=devices,
      donate_argnums=(0,),
  )


def replicate(tree: Any, num_devices: int) -> Any:
  """Stack `num_devices` copies of every leaf on a new leading axis."""
  return jax.tree.map(lambda x: jnp.stack([x] * num_devices), tree)


def unreplicate(tree: Any) -> Any:
  """Take the first copy of every leaf along the leading device axis."""
  return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch: Any, num_devices: int) -> Any:
  """Reshape every batch leaf from [B, ...] to [D, B / D, ...] for pmap."""
  _check_batch_divisible(batch, num_devices)
  return jax.tree.map(
      lambda x: jnp.reshape(x, (num_devices, -1, *jnp.shape(x)[1:])), batch
  )
