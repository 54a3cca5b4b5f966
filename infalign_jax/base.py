"""Input checks shared by the library, run on the host before tracing.

Each check raises `ValueError` with a message that names the argument, the
offending value and what is allowed. Checks on array values (finiteness) only
run on concrete arrays: inside `jax.jit` the arguments are tracers, their
values are unknown, and the check is skipped. Each function that skips a check
under tracing documents what it computes for non-finite input.
"""

from collections.abc import Sequence
import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = (
    'is_traced',
    'check_finite',
    'check_rank',
    'check_same_leading_dims',
    'check_positive',
    'check_int_at_least',
    'check_choice',
)


def is_traced(x) -> bool:
  """Return whether `x` is an abstract value inside a JAX transformation."""
  return isinstance(x, jax.core.Tracer)


def check_finite(name: str, x) -> None:
  """Raise if a concrete array contains NaN or an infinity.

  Args:
    name: argument name used in the message.
    x: array-like. Tracers are skipped.

  Raises:
    ValueError: `x` contains a NaN or an infinite entry.
  """
  if is_traced(x):
    return
  values = np.asarray(x)
  # jnp.issubdtype also recognizes the ml_dtypes floats (bfloat16) that NumPy's
  # own type hierarchy does not.
  real = jnp.issubdtype(values.dtype, jnp.floating) or jnp.issubdtype(
      values.dtype, jnp.integer
  )
  if not real:
    raise ValueError(
        f'{name} must be a real numeric array (integer or floating, '
        f'bfloat16 included), got dtype {values.dtype}. Convert it, for '
        'example with .astype(np.float32).'
    )
  if jnp.issubdtype(values.dtype, jnp.integer):
    return
  values = values.astype(np.float32) if values.dtype.itemsize < 4 else values
  bad = ~np.isfinite(values)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f'{name} contains {int(bad.sum())} non-finite value(s) (first: '
        f'{values[index]!r} at index {index}). Remove or replace NaN and '
        'infinite rewards before calling, for example by dropping the '
        'affected responses or clipping the reward model output.'
    )


def check_rank(name: str, x, rank: int) -> None:
  """Raise unless `x` has exactly `rank` dimensions."""
  ndim = jnp.ndim(x)
  if ndim != rank:
    raise ValueError(
        f'{name} must have rank {rank}, got shape {jnp.shape(x)} (rank '
        f'{ndim}). Reshape it; for example add a leading batch axis with '
        'x[None] for a single prompt.'
    )


def check_same_leading_dims(names: Sequence[str], arrays: Sequence) -> None:
  """Raise unless all arrays have the same size along axis 0 (prompts B)."""
  sizes = [jnp.shape(a)[0] for a in arrays]
  if len(set(sizes)) > 1:
    shapes = ', '.join(
        f'{n} {jnp.shape(a)}' for n, a in zip(names, arrays, strict=True)
    )
    raise ValueError(
        f'Batch sizes differ along axis 0 (prompts): {shapes}. Pass rows '
        'for the same prompts, in the same order.'
    )


def check_positive(name: str, value) -> None:
  """Raise unless `value` is a finite real number > 0 (scalar or array)."""
  if is_traced(value):
    return
  try:
    values = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(
        f'{name} must be a finite real number > 0, got {value!r} (type '
        f'{type(value).__name__}). Pass a positive number.'
    ) from None
  if not (np.all(np.isfinite(values)) and np.all(values > 0)):
    raise ValueError(
        f'{name} must be finite and > 0, got {value!r}. Pass a positive '
        'number.'
    )


def check_int_at_least(name: str, value, minimum: int) -> None:
  """Raise unless `value` is a Python or NumPy integer >= `minimum`."""
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Integral)
      or value < minimum
  ):
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')


def check_choice(name: str, value, choices: Sequence[str]) -> None:
  """Raise unless `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(
        f'Unknown {name} {value!r}. Allowed values: '
        f'{", ".join(repr(c) for c in choices)}.'
    )
