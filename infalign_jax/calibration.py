"""Calibrated rewards: each reward's quantile among reference-policy rewards.

For a prompt x with M reference rewards r(x, z_1..z_M), z_j ~ pi_ref, the
calibrated reward of a response y is

  C(x, y) = (#{j: r(x, z_j) < r(x, y)} + 1/2 #{j: r(x, z_j) = r(x, y)}) / M,

so ties count one half. With the row sorted ascending, the two counts are two
binary searches (`searchsorted` left and right), O(log M) per query. The
sorted rows are computed once per reference policy, reward model and prompt
set, and stored as a `CalibrationTable` with an identity record, so a table
built for other prompts or another reward model is detected on load.

Notation: B prompts, S policy samples per prompt, M reference samples per
prompt.

References:
  Balashankar, Sun et al., "InfAlign: Inference-aware language model
  alignment", ICML 2025, arXiv:2412.19792 (calibrated reward, CTRL step 1).
"""

from collections.abc import Mapping, Sequence
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import base

__all__ = (
    'sort_reference_rewards',
    'calibrated_rewards',
    'leave_one_out_calibrated_rewards',
    'prompts_fingerprint',
    'CalibrationTable',
)

_SEARCH_METHODS = ('flat', 'scan', 'scan_unrolled', 'sort', 'compare_all')


def _float_dtype(*arrays) -> jnp.dtype:
  """Float dtype for outputs: float32 unless an input is a wider float."""
  dtype = jnp.result_type(*arrays)
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.dtype(jnp.float32)
  return jnp.promote_types(dtype, jnp.float32)


# Integers up to 2**24 in magnitude are exact in float32.
_FLOAT32_EXACT_INT = 2**24


def _comparison_dtype(rewards: jax.Array, sorted_ref: jax.Array) -> jnp.dtype:
  """Dtype in which both arrays are compared, exact for both when possible.

  Floats keep their dtype (float64 rewards are not rounded to float32). An
  integer array beside a float array is compared in float64 when x64 is
  enabled. Without x64 the comparison is in float32, and integers beyond
  2**24 in magnitude, which float32 cannot hold exactly, are rejected
  outside `jax.jit`.
  """
  common = jnp.promote_types(rewards.dtype, sorted_ref.dtype)
  mixed = jnp.issubdtype(common, jnp.floating) and any(
      jnp.issubdtype(a.dtype, jnp.integer) for a in (rewards, sorted_ref)
  )
  if not mixed:
    return common
  if jax.config.jax_enable_x64:
    return jnp.dtype(jnp.float64)
  if common == jnp.float32:
    for name, array in (
        ('rewards', rewards),
        ('sorted_ref_rewards', sorted_ref),
    ):
      if jnp.issubdtype(array.dtype, jnp.integer) and not base.is_traced(array):
        if array.size and int(jnp.max(jnp.abs(array))) > _FLOAT32_EXACT_INT:
          raise ValueError(
              f'{name} contains integers beyond 2**24 in magnitude, which are '
              'not exact in float32, next to float rewards. Enable x64 '
              "(jax.config.update('jax_enable_x64', True)) or pass both "
              'arrays as the same dtype.'
          )
  return common


def sort_reference_rewards(ref_rewards: jax.typing.ArrayLike) -> jax.Array:
  """Sort each prompt's reference rewards ascending.

  Args:
    ref_rewards: [B, M] rewards of M reference-policy samples per prompt.

  Returns:
    [B, M] the same values, each row sorted ascending. Inside `jax.jit` a NaN
    sorts to the end of its row.

  Raises:
    ValueError: `ref_rewards` is not rank 2, or (outside `jax.jit`) contains
      NaN or an infinity.
  """
  base.check_rank('ref_rewards', ref_rewards, 2)
  base.check_finite('ref_rewards', ref_rewards)

  return jnp.sort(jnp.asarray(ref_rewards), axis=-1)


def _rank_counts_searchsorted(
    rewards: jax.Array, sorted_ref_rewards: jax.Array, method: str
) -> tuple[jax.Array, jax.Array]:
  """Count reference rewards < and <= each reward with `jnp.searchsorted`."""

  def one(row_rewards, sorted_row):
    below = jnp.searchsorted(
        sorted_row, row_rewards, side='left', method=method
    )
    below_or_equal = jnp.searchsorted(
        sorted_row, row_rewards, side='right', method=method
    )
    return below, below_or_equal

  return jax.vmap(one)(rewards, sorted_ref_rewards)


def _rank_counts_flat(
    rewards: jax.Array, sorted_ref_rewards: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Count reference rewards < and <= each reward by binary lifting.

  Both counts advance together through the powers of two <= M: a count c
  moves to c + step when the reference reward at position c + step - 1
  still compares below the query. Every lookup is a gather from the
  flattened [B * M] table, which XLA:CPU runs faster than the batched
  gather of a vmapped `jnp.searchsorted`.
  """
  num_prompts, num_reference = sorted_ref_rewards.shape
  flat = sorted_ref_rewards.reshape(-1)
  row_start = (jnp.arange(num_prompts, dtype=jnp.int32) * num_reference)[
      :, None
  ]
  below = jnp.zeros(rewards.shape, jnp.int32)
  below_or_equal = jnp.zeros(rewards.shape, jnp.int32)
  step = 1 << (num_reference.bit_length() - 1)
  while step >= 1:
    candidate = jnp.minimum(below + step, num_reference)
    value = flat.at[row_start + candidate - 1].get(mode='promise_in_bounds')
    below = jnp.where(value < rewards, candidate, below)
    candidate = jnp.minimum(below_or_equal + step, num_reference)
    value = flat.at[row_start + candidate - 1].get(mode='promise_in_bounds')
    below_or_equal = jnp.where(value <= rewards, candidate, below_or_equal)
    step //= 2
  return below, below_or_equal


# Rows per block of the 'flat' method: about 2**16 table entries (256 KiB of
# float32), so a block stays in cache through all its binary-search steps.
# On the 2-core development CPU this ran 1.4-1.5x faster than one block of
# B * M entries at B = 4096, M in {512, 4096}. Tables of at most
# _UNBLOCKED_ENTRIES (4 MiB) are searched whole, which was faster at M = 64.
_BLOCK_ENTRIES = 2**16
_UNBLOCKED_ENTRIES = 2**20


def _rank_counts_blocked(
    rewards: jax.Array, sorted_ref_rewards: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Run `_rank_counts_flat` over blocks of rows with `jax.lax.map`."""
  num_prompts, num_reference = sorted_ref_rewards.shape
  rows = max(1, _BLOCK_ENTRIES // num_reference)
  if rows >= num_prompts or sorted_ref_rewards.size <= _UNBLOCKED_ENTRIES:
    return _rank_counts_flat(rewards, sorted_ref_rewards)
  num_blocks = -(-num_prompts // rows)
  padding = ((0, num_blocks * rows - num_prompts), (0, 0))
  # Padded rows are computed and dropped.
  blocked_rewards = jnp.pad(rewards, padding).reshape(num_blocks, rows, -1)
  blocked_ref = jnp.pad(sorted_ref_rewards, padding).reshape(
      num_blocks, rows, num_reference
  )
  below, below_or_equal = jax.lax.map(
      lambda block: _rank_counts_flat(*block), (blocked_rewards, blocked_ref)
  )
  num_samples = rewards.shape[1]
  below = below.reshape(-1, num_samples)[:num_prompts]
  below_or_equal = below_or_equal.reshape(-1, num_samples)[:num_prompts]
  return below, below_or_equal


# Flat indices are int32: a block of the 'flat' method must have fewer than
# 2**31 entries, which holds unless M itself is that large.
_MAX_FLAT_SIZE = 2**31 - 1


# Two-level search: rows cut into blocks of _TWO_LEVEL_BLOCK sorted values.
# Used for _TWO_LEVEL_MIN <= M <= _TWO_LEVEL_MAX. Against binary lifting,
# interleaved in one process on the 2-core development CPU (B = 4096,
# S = 16), it ran 1.8-2.2x as fast at M = 256, 1.2x at M = 512 and 0.8x at
# M = 1024. Block sizes 8 and 64 were 7x slower at M = 512 (XLA:CPU lowers
# those gathers differently).
_TWO_LEVEL_BLOCK = 32
_TWO_LEVEL_MIN = 128
_TWO_LEVEL_MAX = 512


def _rank_counts_two_level(
    rewards: jax.Array, sorted_ref_rewards: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Count reference rewards < and <= each reward in two dense steps.

  The last value of each block of K sorted values forms a coarse row of M/K
  values. Comparing a query with the whole coarse row counts the blocks
  that lie entirely below it; one gather of the next block and K
  comparisons count the rest. Rows are padded with +inf to a multiple of K.
  """
  num_prompts, num_reference = sorted_ref_rewards.shape
  size = _TWO_LEVEL_BLOCK
  num_blocks = -(-num_reference // size)
  padded = jnp.pad(
      sorted_ref_rewards,
      ((0, 0), (0, num_blocks * size - num_reference)),
      constant_values=jnp.inf,
  )
  blocks = padded.reshape(num_prompts, num_blocks, size)
  coarse = blocks[:, :, -1]
  queries = rewards[:, :, None]

  def count(compare):
    full = jnp.sum(compare(coarse[:, None, :], queries), axis=-1)
    index = jnp.minimum(full, num_blocks - 1)[:, :, None]
    block = jnp.take_along_axis(blocks, index, axis=1, mode='promise_in_bounds')
    inner = jnp.sum(compare(block, queries), axis=-1)
    total = jnp.where(
        full == num_blocks, num_blocks * size, full * size + inner
    )
    # A +inf query (possible only under jit) also counts the padding.
    return jnp.minimum(total, num_reference).astype(jnp.int32)

  return count(jnp.less), count(jnp.less_equal)


def _rank_counts(
    rewards: jax.Array, sorted_ref_rewards: jax.Array, method: str
) -> tuple[jax.Array, jax.Array]:
  """Count reference rewards < and <= each reward, row by row."""
  num_reference = sorted_ref_rewards.shape[1]
  if method == 'flat' and _TWO_LEVEL_MIN <= num_reference <= _TWO_LEVEL_MAX:
    return _rank_counts_two_level(rewards, sorted_ref_rewards)
  if method == 'flat' and num_reference <= _MAX_FLAT_SIZE // 2:
    return _rank_counts_blocked(rewards, sorted_ref_rewards)
  if method == 'flat':
    method = 'scan'
  return _rank_counts_searchsorted(rewards, sorted_ref_rewards, method)


def calibrated_rewards(
    rewards: jax.typing.ArrayLike,
    sorted_ref_rewards: jax.typing.ArrayLike,
    *,
    method: str = 'flat',
) -> jax.Array:
  """Calibrate rewards against each prompt's sorted reference rewards.

  C = (#below + 1/2 #equal) / M, computed as (left + right) / (2 M) with
  `left` and `right` the two `searchsorted` insertion points. A reward below
  every reference reward gets 0, above every one gets 1, and one equal to all
  M reference rewards gets 1/2.

  Args:
    rewards: [B, S] rewards of S responses per prompt.
    sorted_ref_rewards: [B, M] reference rewards of the same B prompts, each
      row sorted ascending (see `sort_reference_rewards`). Unsorted rows give
      wrong results without an error.
    method: 'flat' (default): for 128 <= M <= 512 a two-level search
      (a dense comparison with every 32nd value, then with one block of
      32); otherwise a binary search over the flattened table, in blocks of
      rows of about 2**16 entries. Or a `jnp.searchsorted`
      method, vmapped over prompts: 'scan', 'scan_unrolled', 'sort' or
      'compare_all' (the last two may be faster on accelerators for small
      M). All give identical results for finite rewards.

  Returns:
    [B, S] calibrated rewards in [0, 1], in the floating dtype of the inputs
    (float32 for float32, bfloat16 or integer inputs, float64 for float64
    inputs when x64 is enabled). Integer rewards next to float reference
    rewards are compared in float64 under x64; without x64 in float32, and
    integers beyond 2**24 in magnitude are then rejected (outside jit). Under `jax.jit` the finiteness check is skipped: +inf
    then gets 1 and -inf gets 0. A NaN reward compares false with every
    reference reward, so it gets 0 with 'flat' (and 1 with the
    `jnp.searchsorted` methods).

  Raises:
    ValueError: a rank or batch-size mismatch, M = 0, an unknown `method`,
      a complex or non-numeric dtype, or (outside `jax.jit`) a NaN or
      infinite reward.
  """
  base.check_rank('rewards', rewards, 2)
  base.check_rank('sorted_ref_rewards', sorted_ref_rewards, 2)
  base.check_same_leading_dims(
      ('rewards', 'sorted_ref_rewards'), (rewards, sorted_ref_rewards)
  )
  base.check_choice('method', method, _SEARCH_METHODS)
  base.check_finite('rewards', rewards)
  base.check_finite('sorted_ref_rewards', sorted_ref_rewards)
  if jnp.shape(sorted_ref_rewards)[1] < 1:
    raise ValueError(
        'sorted_ref_rewards has M=0 reference rewards per prompt; calibration '
        'needs M >= 1. Sample at least one reference response per prompt.'
    )

  rewards = jnp.asarray(rewards)
  sorted_ref_rewards = jnp.asarray(sorted_ref_rewards)
  dtype = _float_dtype(rewards, sorted_ref_rewards)
  num_reference = sorted_ref_rewards.shape[1]
  common = _comparison_dtype(rewards, sorted_ref_rewards)
  below, below_or_equal = _rank_counts(
      rewards.astype(common), sorted_ref_rewards.astype(common), method
  )
  # Integer sum first, one rounding at the division: exact for M < 2**23
  # in float32.
  return (below + below_or_equal).astype(dtype) / (2 * num_reference)


def leave_one_out_calibrated_rewards(
    ref_rewards: jax.typing.ArrayLike, *, method: str = 'flat'
) -> jax.Array:
  """Calibrate each reference reward against the other M - 1 of its prompt.

  A diagnostic: with continuous rewards the values are spread uniformly over
  {0, 1/(M-1), ..., 1}, so their mean is 1/2 for every prompt and a histogram
  far from flat reveals ties (for example a saturated reward model).
  For value v with l rewards < v and r rewards <= v in its row (itself
  included), the result is (l + 1/2 (r - l - 1)) / (M - 1).

  Args:
    ref_rewards: [B, M] reference rewards, in any order, M >= 2.
    method: `jnp.searchsorted` implementation, as in `calibrated_rewards`.

  Returns:
    [B, M] leave-one-out calibrated rewards in [0, 1], in the order of the
    input.

  Raises:
    ValueError: a rank mismatch, M < 2, or (outside `jax.jit`) non-finite
      rewards.
  """
  base.check_rank('ref_rewards', ref_rewards, 2)
  base.check_choice('method', method, _SEARCH_METHODS)
  base.check_finite('ref_rewards', ref_rewards)
  num_reference = jnp.shape(ref_rewards)[1]
  if num_reference < 2:
    raise ValueError(
        f'leave-one-out calibration needs M >= 2 reference rewards per '
        f'prompt, got ref_rewards of shape {jnp.shape(ref_rewards)}.'
    )

  ref_rewards = jnp.asarray(ref_rewards)
  dtype = _float_dtype(ref_rewards)
  sorted_rows = jnp.sort(ref_rewards, axis=-1)
  below, below_or_equal = _rank_counts(ref_rewards, sorted_rows, method)
  return (below + below_or_equal - 1).astype(dtype) / (2 * (num_reference - 1))


def prompts_fingerprint(prompts: Sequence[str | bytes]) -> str:
  """SHA-256 of an ordered list of prompts, for a table's identity record.

  Each prompt is length-prefixed, so ['ab', 'c'] and ['a', 'bc'] differ.
  """
  digest = hashlib.sha256()
  for prompt in prompts:
    data = prompt.encode('utf-8') if isinstance(prompt, str) else bytes(prompt)
    digest.update(len(data).to_bytes(8, 'little'))
    digest.update(data)
  return digest.hexdigest()


def _canonical_json(record: Mapping[str, Any]) -> str:
  return json.dumps(record, sort_keys=True, separators=(',', ':'))


_ROWS_FILE = 'sorted_rewards.npy'
_IDS_FILE = 'prompt_ids.npy'
_META_FILE = 'identity.json'


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class CalibrationTable:
  """Sorted reference rewards for a prompt set, with the identity that made it.

  A table is valid only for the reference policy, reward model and prompts it
  was built from. `identity` records them (for example `reference_policy`,
  `reward_model`, `prompts` fingerprints from `prompts_fingerprint`, `seed`),
  and `M` is always added from the array shape. `fingerprint` is the SHA-256
  of the identity record, so checkpoints can store one string.

  Attributes:
    sorted_rewards: [P, M] NumPy array, each row sorted ascending. float64
      input stays float64 (so x64 calibration keeps its resolution); every
      other dtype (float32, float16, bfloat16, integers) is stored as
      float32.
    prompt_ids: [P] NumPy array of prompt ids (integers or strings), row i
      belongs to prompt `prompt_ids[i]`.
    identity: JSON-serialisable record of what produced the table.
  """

  sorted_rewards: np.ndarray
  prompt_ids: np.ndarray
  identity: Mapping[str, Any]

  def __post_init__(self):
    rows = np.asarray(self.sorted_rewards)
    ids = np.asarray(self.prompt_ids)
    base.check_rank('sorted_rewards', rows, 2)
    base.check_rank('prompt_ids', ids, 1)
    base.check_finite('sorted_rewards', rows)

    if ids.shape[0] != rows.shape[0]:
      raise ValueError(
          f'prompt_ids has {ids.shape[0]} entries but sorted_rewards has '
          f'{rows.shape[0]} rows; pass one id per row.'
      )
    if len(np.unique(ids)) != len(ids):
      raise ValueError('prompt_ids contains duplicates; ids must be unique.')
    if rows.shape[1] < 1:
      raise ValueError('sorted_rewards needs M >= 1 reference rewards per row.')
    if np.any(np.diff(rows, axis=1) < 0):
      raise ValueError(
          'sorted_rewards rows are not sorted ascending; build the table '
          'with CalibrationTable.build(ref_rewards, ...), which sorts them.'
      )

    identity = dict(self.identity)
    if identity.get('M', rows.shape[1]) != rows.shape[1]:
      raise ValueError(
          f'identity records M={identity["M"]} but sorted_rewards has '
          f'{rows.shape[1]} columns.'
      )
    identity['M'] = int(rows.shape[1])
    try:
      _canonical_json(identity)
    except TypeError as error:
      raise ValueError(
          f'identity must be JSON-serialisable (str, numbers, lists, dicts): '
          f'{error}'
      ) from error

    dtype = np.float64 if rows.dtype == np.float64 else np.float32
    rows = np.ascontiguousarray(rows, dtype=dtype)
    rows.setflags(write=False)
    ids = np.ascontiguousarray(ids)
    ids.setflags(write=False)
    object.__setattr__(self, 'sorted_rewards', rows)
    object.__setattr__(self, 'prompt_ids', ids)
    object.__setattr__(self, 'identity', identity)

  @classmethod
  def build(
      cls,
      ref_rewards: jax.typing.ArrayLike,
      prompt_ids: jax.typing.ArrayLike,
      identity: Mapping[str, Any],
  ) -> 'CalibrationTable':
    """Sort [P, M] reference rewards into a table for prompts `prompt_ids`.

    Sorted with NumPy on the host, so float64 rewards stay float64 whether
    or not JAX has x64 enabled.
    """
    rows = np.asarray(ref_rewards)
    base.check_rank('ref_rewards', rows, 2)
    base.check_finite('ref_rewards', rows)
    if rows.dtype != np.float64:
      rows = rows.astype(np.float32)
    rows = np.sort(rows, axis=1)
    return cls(sorted_rewards=rows, prompt_ids=prompt_ids, identity=identity)

  @property
  def num_reference(self) -> int:
    """M, the number of reference rewards per prompt."""
    return self.sorted_rewards.shape[1]

  @property
  def fingerprint(self) -> str:
    """SHA-256 (hex) of the canonical JSON of `identity`."""
    return hashlib.sha256(
        _canonical_json(self.identity).encode('utf-8')
    ).hexdigest()

  def content_sha256(self) -> str:
    """SHA-256 (hex) over the sorted rewards and prompt ids bytes."""
    digest = hashlib.sha256()
    digest.update(self.sorted_rewards.tobytes())
    digest.update(str(self.prompt_ids.dtype).encode('utf-8'))
    digest.update(self.prompt_ids.tobytes())
    return digest.hexdigest()

  def rows(self, prompt_indices: jax.typing.ArrayLike) -> np.ndarray:
    """Gather rows by position in the table.

    Args:
      prompt_indices: [B] integer row positions in [0, P).

    Returns:
      [B, M] sorted reference rewards (the table's dtype), ready for
      `calibrated_rewards(rewards, rows)`.

    Raises:
      ValueError: an index out of range or a non-integer index array.
    """
    indices = np.asarray(prompt_indices)
    if not np.issubdtype(indices.dtype, np.integer):
      raise ValueError(
          f'prompt_indices must be integers, got dtype {indices.dtype}.'
      )
    num_prompts = self.sorted_rewards.shape[0]
    if indices.size and (indices.min() < 0 or indices.max() >= num_prompts):
      raise ValueError(
          f'prompt_indices must lie in [0, {num_prompts}), got min '
          f'{indices.min()} and max {indices.max()}.'
      )
    return self.sorted_rewards[indices]

  def index_of(self, prompt_ids: Sequence[Any]) -> np.ndarray:
    """Return [B] row positions of the given prompt ids.

    Raises:
      ValueError: an id that the table does not contain.
    """
    lookup = {key.item(): i for i, key in enumerate(self.prompt_ids)}
    missing = [p for p in prompt_ids if p not in lookup]
    if missing:
      raise ValueError(
          f'{len(missing)} prompt id(s) not in the calibration table (first: '
          f'{missing[0]!r}); rebuild the table for this prompt set.'
      )
    return np.asarray([lookup[p] for p in prompt_ids], dtype=np.int64)

  def check_identity(self, expected: Mapping[str, Any]) -> None:
    """Raise unless every field of `expected` matches the table's identity.

    Fields absent from `expected` are not compared, so a caller can check
    only the fields it has (for example just `reward_model` and `prompts`).

    Raises:
      ValueError: naming each differing field with both values.
    """
    differing = []
    for field, value in sorted(expected.items()):
      recorded = self.identity.get(field, '<missing>')
      if _canonical_json({'v': recorded}) != _canonical_json({'v': value}):
        differing.append(f'{field}: table has {recorded!r}, expected {value!r}')
    if differing:
      raise ValueError(
          'Calibration table was built for a different setup ('
          + '; '.join(differing)
          + '). Rebuild the table for this reference policy, reward model '
          'and prompt set, or point to the table that matches.'
      )

  def save(self, directory: str | os.PathLike[str], *, overwrite=False) -> None:
    """Write the table to `directory` atomically.

    The files go to a temporary sibling directory that is renamed into place
    at the end, so a save killed half way leaves either no table or the
    previous complete one, never a partial table.

    Raises:
      FileExistsError: `directory` exists and `overwrite` is False.
    """
    target = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(target) and not overwrite:
      raise FileExistsError(
          f'{target} exists; pass overwrite=True to replace that table.'
      )
    tmp = tempfile.mkdtemp(
        prefix=f'.{os.path.basename(target)}.tmp-', dir=parent
    )
    try:
      np.save(os.path.join(tmp, _ROWS_FILE), self.sorted_rewards)
      np.save(os.path.join(tmp, _IDS_FILE), self.prompt_ids)
      meta = {
          'identity': self.identity,
          'fingerprint': self.fingerprint,
          'content_sha256': self.content_sha256(),
      }
      with open(os.path.join(tmp, _META_FILE), 'w', encoding='utf-8') as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
      if os.path.exists(target):
        old = tempfile.mkdtemp(
            prefix=f'.{os.path.basename(target)}.old-', dir=parent
        )
        os.replace(target, os.path.join(old, 'table'))
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.replace(tmp, target)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise

  @classmethod
  def load(
      cls,
      directory: str | os.PathLike[str],
      *,
      expected_identity: Mapping[str, Any] | None = None,
  ) -> 'CalibrationTable':
    """Read a table written by `save`, and check it if `expected_identity`.

    Raises:
      FileNotFoundError: no table in `directory` (no identity.json).
      ValueError: a damaged table (unreadable or missing file, bad JSON or
        array, missing field, unsorted rows, a checksum mismatch), naming
        the directory and the fix; or the identity differs from
        `expected_identity`.
    """
    directory = os.fspath(directory)
    meta_path = os.path.join(directory, _META_FILE)
    if not os.path.exists(meta_path):
      raise FileNotFoundError(
          f'No calibration table in {directory} (missing {_META_FILE}); '
          'build one with CalibrationTable.build(...).save(directory).'
      )
    try:
      with open(meta_path, encoding='utf-8') as f:
        meta = json.load(f)
      # allow_pickle=False: a table contains numbers and strings only.
      table = cls(
          sorted_rewards=np.load(
              os.path.join(directory, _ROWS_FILE), allow_pickle=False
          ),
          prompt_ids=np.load(
              os.path.join(directory, _IDS_FILE), allow_pickle=False
          ),
          identity=meta['identity'],
      )
      recorded_sha256 = meta['content_sha256']
    except (OSError, ValueError, KeyError, TypeError, EOFError) as error:
      raise ValueError(
          f'Calibration table in {directory} is damaged and cannot be read '
          f'({type(error).__name__}: {error}). Delete the directory and '
          'rebuild the table with CalibrationTable.build(...).save(directory).'
      ) from error
    if table.content_sha256() != recorded_sha256:
      raise ValueError(
          f'Calibration table in {directory} is corrupt: its arrays do not '
          'match the recorded SHA-256. Delete the directory and rebuild the '
          'table with CalibrationTable.build(...).save(directory).'
      )
    if expected_identity is not None:
      table.check_identity(expected_identity)
    return table
