"""Train state and the compiled train step.

Notation: B prompts, S policy samples per prompt, M reference samples per
prompt, T tokens, V vocabulary.
"""

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything that decides the rest of a run, as one pytree.

  Attributes:
    step: int32 scalar, number of optimizer updates applied so far.
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


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, jax.Array]]]:
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
    Metrics gain `grad_norm` and `nonfinite_count` (non-finite entries in the
    loss and gradients).
  """

  def train_step(state, batch, frozen):
    step_key = jax.random.fold_in(state.key, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, batch, frozen, step_key)
    if axis_name is not None:
      loss, metrics, grads = jax.lax.pmean(
          (loss, metrics, grads), axis_name=axis_name
      )
    nonfinite = jnp.logical_not(jnp.isfinite(loss)).astype(jnp.int32)
    for leaf in jax.tree_util.tree_leaves(grads):
      nonfinite += jnp.sum(jnp.logical_not(jnp.isfinite(leaf)), dtype=jnp.int32)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics['loss'] = loss
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['nonfinite_count'] = nonfinite
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state
    )
    return new_state, metrics

  return train_step
