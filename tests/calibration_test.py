"""Tests for infalign_jax.calibration."""

import functools
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import calibration

_VARIANTS = (('eager', lambda f: f), ('jit', jax.jit))


def _brute_force(rewards, ref_rewards):
  """ECDF with ties one half, by comparing every pair."""
  rewards = np.asarray(rewards, np.float64)
  ref = np.asarray(ref_rewards, np.float64)
  below = (ref[:, None, :] < rewards[:, :, None]).sum(-1)
  equal = (ref[:, None, :] == rewards[:, :, None]).sum(-1)
  return (below + 0.5 * equal) / ref.shape[1]


def _brute_force_loo(ref_rewards):
  ref = np.asarray(ref_rewards, np.float64)
  num_prompts, num_reference = ref.shape
  out = np.zeros_like(ref)
  for b in range(num_prompts):
    for j in range(num_reference):
      others = np.delete(ref[b], j)
      below = (others < ref[b, j]).sum()
      equal = (others == ref[b, j]).sum()
      out[b, j] = (below + 0.5 * equal) / (num_reference - 1)
  return out


class CalibratedRewardsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    # Row 0 has ties, row 1 is all equal, row 2 is distinct.
    self.ref = np.array(
        [[1.0, 2.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0], [0.4, 0.1, 0.3, 0.2]],
        np.float32,
    )
    self.rewards = np.array(
        [[0.0, 2.0, 2.5, 9.0], [5.0, 4.0, 6.0, 5.0], [0.1, 0.25, 0.4, 0.05]],
        np.float32,
    )

  @parameterized.named_parameters(*_VARIANTS)
  def test_by_hand(self, variant):
    sorted_ref = variant(calibration.sort_reference_rewards)(self.ref)
    got = variant(calibration.calibrated_rewards)(self.rewards, sorted_ref)
    expected = np.array(
        [
            # Below all, equal to both 2s (1 + 2/2), between, above all.
            [0.0, 2.0 / 4, 3.0 / 4, 1.0],
            # Equal to all four counts 1/2; below all 0; above all 1.
            [0.5, 0.0, 1.0, 0.5],
            [0.125, 2.0 / 4, 0.875, 0.0],
        ],
        np.float32,
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    self.assertEqual(got.dtype, jnp.float32)

  @parameterized.named_parameters(*_VARIANTS)
  def test_matches_brute_force_random_ties(self, variant):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 6, size=(7, 33)).astype(np.float32)
    rewards = rng.integers(-1, 8, size=(7, 5)).astype(np.float32)
    got = variant(calibration.calibrated_rewards)(
        rewards, calibration.sort_reference_rewards(ref)
    )
    np.testing.assert_allclose(got, _brute_force(rewards, ref), atol=1e-7)

  def test_blocked_rows_with_padding(self):
    # Above 2**20 entries the table is searched in blocks. M = 4096 puts 16
    # rows in a block, so 300 rows need 19 blocks, the last one padded.
    rng = np.random.default_rng(5)
    ref = rng.integers(0, 50, size=(300, 4096)).astype(np.float32)
    rewards = rng.integers(-2, 52, size=(300, 5)).astype(np.float32)
    got = jax.jit(calibration.calibrated_rewards)(
        rewards, calibration.sort_reference_rewards(ref)
    )
    np.testing.assert_allclose(got, _brute_force(rewards, ref), atol=1e-7)

  @parameterized.parameters(128, 200, 512)
  def test_two_level_search_matches_brute_force(self, num_reference):
    # M in [128, 512] takes the two-level search; 200 needs +inf padding.
    rng = np.random.default_rng(num_reference)
    ref = np.round(rng.normal(size=(3, num_reference)) * 4) / 4
    rewards = np.round(rng.normal(size=(3, 9)) * 4) / 4
    rewards[0, :3] = [ref.min() - 1, ref.max() + 1, ref.max()]
    sorted_ref = calibration.sort_reference_rewards(ref.astype(np.float32))
    got = jax.jit(calibration.calibrated_rewards)(
        rewards.astype(np.float32), sorted_ref
    )
    # float32 division by 2 M; the counts themselves are exact.
    np.testing.assert_allclose(got, _brute_force(rewards, ref), atol=1e-7)
    scan = calibration.calibrated_rewards(
        rewards.astype(np.float32), sorted_ref, method='scan'
    )
    np.testing.assert_array_equal(got, scan)
    # Under jit +inf must still give exactly 1, not count the padding.
    inf_row = np.full((3, 1), np.inf, np.float32)
    got_inf = jax.jit(calibration.calibrated_rewards)(inf_row, sorted_ref)
    np.testing.assert_array_equal(got_inf, np.ones((3, 1)))

  def test_single_reference_sample(self):
    got = calibration.calibrated_rewards(
        np.array([[0.0, 1.0, 2.0]]), np.array([[1.0]])
    )
    np.testing.assert_array_equal(got, [[0.0, 0.5, 1.0]])

  @parameterized.parameters('scan', 'scan_unrolled', 'sort', 'compare_all')
  def test_methods_agree(self, method):
    rng = np.random.default_rng(1)
    ref = np.sort(rng.integers(0, 10, size=(3, 17)).astype(np.float32), -1)
    rewards = rng.integers(-2, 12, size=(3, 6)).astype(np.float32)
    got = calibration.calibrated_rewards(rewards, ref, method=method)
    np.testing.assert_array_equal(
        got, calibration.calibrated_rewards(rewards, ref)
    )

  def test_float64_distinguishes_close_values(self):
    with jax.enable_x64(True):
      ref = jnp.array([[1.0, 1.0 + 1e-12, 1.0 + 2e-12]], jnp.float64)
      rewards = jnp.array([[1.0 + 1e-12]], jnp.float64)
      got = calibration.calibrated_rewards(rewards, ref)
      self.assertEqual(got.dtype, jnp.float64)
      # float32 would round all four values to 1.0 and return 1/2.
      np.testing.assert_allclose(got, [[0.5]], rtol=0, atol=0)
      rewards = jnp.array([[1.0 + 1.5e-12]], jnp.float64)
      np.testing.assert_allclose(
          calibration.calibrated_rewards(rewards, ref), [[2.0 / 3]]
      )

  def test_vmap_over_extra_axis(self):
    ref = np.sort(np.random.default_rng(2).normal(size=(4, 3, 8)), -1)
    rewards = np.random.default_rng(3).normal(size=(4, 3, 5))
    got = jax.vmap(calibration.calibrated_rewards)(rewards, ref)
    for i in range(4):
      np.testing.assert_allclose(
          got[i], _brute_force(rewards[i], ref[i]), atol=1e-6
      )

  def test_gradient_is_zero(self):
    # Piecewise constant in the rewards: the gradient exists and is 0.
    ref = jnp.array([[0.0, 1.0, 2.0]])
    grad = jax.grad(lambda r: calibration.calibrated_rewards(r, ref).sum())(
        jnp.array([[0.5, 1.5]])
    )
    np.testing.assert_array_equal(grad, np.zeros((1, 2)))

  def test_jit_non_finite_behaviour(self):
    rewards = jnp.array([[jnp.nan, jnp.inf, -jnp.inf]])
    ref = jnp.array([[0.0, 1.0]])
    got = jax.jit(calibration.calibrated_rewards)(rewards, ref)
    np.testing.assert_array_equal(got, [[0.0, 1.0, 0.0]])
    got = jax.jit(
        functools.partial(calibration.calibrated_rewards, method='scan')
    )(rewards, ref)
    np.testing.assert_array_equal(got, [[1.0, 1.0, 0.0]])

  # Few distinct shapes, so that eager dispatch compiles only a few times.
  @hypothesis.settings(max_examples=25, deadline=None)
  @hypothesis.given(
      ref=st.sampled_from([1, 4, 9]).flatmap(
          lambda m: hnp.arrays(
              np.float32, (3, m), elements=st.integers(-5, 5).map(float)
          )
      ),
      rewards=hnp.arrays(
          np.float32, (3, 5), elements=st.integers(-6, 6).map(float)
      ),
  )
  def test_properties(self, ref, rewards):
    got = np.asarray(
        calibration.calibrated_rewards(
            rewards, calibration.sort_reference_rewards(ref)
        )
    )
    self.assertTrue(np.all(got >= 0.0))
    self.assertTrue(np.all(got <= 1.0))
    np.testing.assert_allclose(got, _brute_force(rewards, ref), atol=1e-7)

    # Invariant under a strictly increasing map of all rewards.
    def increasing(x):
      return np.exp(0.3 * x) * 2.0 - 7.0

    mapped = calibration.calibrated_rewards(
        increasing(rewards),
        calibration.sort_reference_rewards(increasing(ref)),
    )
    np.testing.assert_array_equal(mapped, got)

  @parameterized.named_parameters(
      ('nan_reward', [[np.nan]], [[0.0]], 'rewards contains 1 non-finite'),
      ('inf_ref', [[0.0]], [[np.inf]], 'sorted_ref_rewards contains'),
      ('rank', [0.0], [[0.0]], 'rewards must have rank 2'),
      ('batch', [[0.0], [1.0]], [[0.0]], 'Batch sizes differ'),
  )
  def test_bad_input(self, rewards, ref, message):
    with self.assertRaisesRegex(ValueError, message):
      calibration.calibrated_rewards(np.array(rewards), np.array(ref))

  @parameterized.named_parameters(
      ('m_zero', np.zeros((1, 2), np.float32), np.zeros((1, 0)), 'M=0'),
      ('complex', np.array([[1j]]), np.array([[1.0 + 0j]]), 'complex128'),
      ('strings', np.array([['a']]), np.array([['b']]), 'real numeric'),
      (
          'int_beyond_float32',
          np.array([[2**24 + 1]], np.int32),
          np.array([[float(2**24)]], np.float32),
          r'beyond 2\*\*24',
      ),
  )
  def test_bad_dtype_or_size(self, rewards, ref, message):
    with self.assertRaisesRegex(ValueError, message):
      calibration.calibrated_rewards(rewards, ref)

  def test_bfloat16_accepted(self):
    ref = jnp.array([[0.125, 0.25, 0.5]], jnp.bfloat16)
    got = calibration.calibrated_rewards(
        jnp.array([[0.25, 1.0]], jnp.bfloat16), ref
    )
    self.assertEqual(got.dtype, jnp.float32)
    np.testing.assert_array_equal(got, [[0.5, 1.0]])

  def test_int_beside_float_exact_under_x64(self):
    with jax.enable_x64(True):
      got = calibration.calibrated_rewards(
          np.array([[2**24 + 1]], np.int32),
          np.array([[float(2**24)]], np.float32),
      )
    np.testing.assert_array_equal(got, [[1.0]])

  def test_bad_method(self):
    with self.assertRaisesRegex(ValueError, "Unknown method 'binary'"):
      calibration.calibrated_rewards(
          np.zeros((1, 1)), np.zeros((1, 1)), method='binary'
      )

  def test_sort_rejects_nan(self):
    with self.assertRaisesRegex(ValueError, 'ref_rewards contains'):
      calibration.sort_reference_rewards(np.array([[1.0, np.nan]]))


class LeaveOneOutTest(parameterized.TestCase):

  @parameterized.named_parameters(*_VARIANTS)
  def test_matches_brute_force(self, variant):
    rng = np.random.default_rng(4)
    ref = rng.integers(0, 4, size=(5, 9)).astype(np.float32)
    ref[0] = 2.0  # All equal: every value is 1/2.
    got = variant(calibration.leave_one_out_calibrated_rewards)(ref)
    np.testing.assert_allclose(got, _brute_force_loo(ref), atol=1e-7)
    np.testing.assert_array_equal(got[0], np.full(9, 0.5))

  def test_distinct_values_are_uniform_grid(self):
    ref = np.array([[3.0, 0.0, 2.0, 1.0]])
    got = calibration.leave_one_out_calibrated_rewards(ref)
    np.testing.assert_allclose(got, [[1.0, 0.0, 2.0 / 3, 1.0 / 3]])

  def test_rejects_single_sample(self):
    with self.assertRaisesRegex(ValueError, 'M >= 2'):
      calibration.leave_one_out_calibrated_rewards(np.zeros((2, 1)))


class CalibrationTableTest(parameterized.TestCase):

  def _tempdir(self):
    return self.enter_context(tempfile.TemporaryDirectory())

  def setUp(self):
    super().setUp()
    self.identity = {
        'reference_policy': 'ref-policy-sha-1',
        'reward_model': 'rm-sha-2',
        'prompts': calibration.prompts_fingerprint(['a', 'b', 'c']),
        'seed': 7,
    }
    self.table = calibration.CalibrationTable.build(
        np.array([[3.0, 1.0], [2.0, 2.0], [0.0, -1.0]]),
        np.array([10, 11, 12]),
        self.identity,
    )

  def test_build_sorts_and_records_m(self):
    np.testing.assert_array_equal(
        self.table.sorted_rewards, [[1.0, 3.0], [2.0, 2.0], [-1.0, 0.0]]
    )
    # float64 input stays float64; float32 input stays float32.
    self.assertEqual(self.table.sorted_rewards.dtype, np.float64)
    self.assertEqual(self.table.identity['M'], 2)
    self.assertEqual(self.table.num_reference, 2)

  def test_rows_and_index_of(self):
    rows = self.table.rows(self.table.index_of([12, 10]))
    np.testing.assert_array_equal(rows, [[-1.0, 0.0], [1.0, 3.0]])
    with self.assertRaisesRegex(ValueError, r'must lie in \[0, 3\)'):
      self.table.rows([3])
    with self.assertRaisesRegex(ValueError, 'not in the calibration table'):
      self.table.index_of([99])

  def test_save_load_round_trip(self):
    directory = os.path.join(self._tempdir(), 'table')
    self.table.save(directory)
    loaded = calibration.CalibrationTable.load(
        directory, expected_identity=self.identity
    )
    np.testing.assert_array_equal(
        loaded.sorted_rewards, self.table.sorted_rewards
    )
    np.testing.assert_array_equal(loaded.prompt_ids, self.table.prompt_ids)
    self.assertEqual(loaded.fingerprint, self.table.fingerprint)
    self.assertLen(loaded.fingerprint, 64)
    # Only the table itself is left: no temporary directories.
    self.assertEqual(os.listdir(os.path.dirname(directory)), ['table'])

  def test_save_refuses_and_overwrites(self):
    directory = os.path.join(self._tempdir(), 'table')
    self.table.save(directory)
    with self.assertRaises(FileExistsError):
      self.table.save(directory)
    other = calibration.CalibrationTable.build(
        np.zeros((1, 4)), np.array([1]), {'reward_model': 'other'}
    )
    other.save(directory, overwrite=True)
    loaded = calibration.CalibrationTable.load(directory)
    self.assertEqual(loaded.identity['reward_model'], 'other')
    self.assertEqual(os.listdir(os.path.dirname(directory)), ['table'])

  def test_failed_save_leaves_nothing(self):
    parent = self._tempdir()
    bad = calibration.CalibrationTable.build(
        np.zeros((1, 2)), np.array([1]), {'seed': 1}
    )
    # An identity that stops being serialisable after construction makes
    # json.dump fail half way through the save.
    bad.identity['oops'] = object()
    with self.assertRaises(TypeError):
      bad.save(os.path.join(parent, 'table'))
    self.assertEqual(os.listdir(parent), [])

  def test_identity_mismatch_names_field(self):
    expected = dict(self.identity, reward_model='rm-sha-3')
    with self.assertRaisesRegex(
        ValueError, "reward_model: table has 'rm-sha-2', expected 'rm-sha-3'"
    ):
      self.table.check_identity(expected)
    directory = os.path.join(self._tempdir(), 'table')
    self.table.save(directory)
    other_prompts = calibration.prompts_fingerprint(['a', 'b', 'd'])
    with self.assertRaisesRegex(ValueError, 'prompts: table has'):
      calibration.CalibrationTable.load(
          directory, expected_identity={'prompts': other_prompts}
      )

  def test_corrupt_table_detected(self):
    directory = os.path.join(self._tempdir(), 'table')
    self.table.save(directory)
    np.save(
        os.path.join(directory, 'sorted_rewards.npy'),
        np.zeros((3, 2), np.float32),
    )
    with self.assertRaisesRegex(ValueError, 'corrupt'):
      calibration.CalibrationTable.load(directory)

  def test_float64_rows_keep_their_dtype(self):
    # 1 + 1.5e-9 lies between the middle two rows values; float32 would
    # round all five numbers to 1.
    ref = np.array([[1.0, 1.0 + 1e-9, 1.0 + 2e-9, 1.0 + 3e-9]])
    table = calibration.CalibrationTable.build(ref, np.array([7]), {})
    self.assertEqual(table.sorted_rewards.dtype, np.float64)
    directory = os.path.join(self._tempdir(), 'table')
    table.save(directory)
    loaded = calibration.CalibrationTable.load(directory)
    self.assertEqual(loaded.sorted_rewards.dtype, np.float64)
    with jax.enable_x64(True):
      got = calibration.calibrated_rewards(
          np.array([[1.0 + 1.5e-9]]), loaded.rows([0])
      )
    np.testing.assert_array_equal(got, [[0.5]])

  @parameterized.named_parameters(
      ('garbled_json', 'identity.json', b'{broken'),
      ('garbage_rows', 'sorted_rewards.npy', b'garbage'),
      ('missing_ids', 'prompt_ids.npy', None),
      ('truncated_rows', 'sorted_rewards.npy', 'truncate'),
      ('no_checksum', 'identity.json', b'{"identity": {}}'),
  )
  def test_damaged_table_names_directory_and_fix(self, name, content):
    directory = os.path.join(self._tempdir(), 'table')
    self.table.save(directory)
    path = os.path.join(directory, name)
    if content is None:
      os.remove(path)
    elif content == 'truncate':
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) - 4)
    else:
      with open(path, 'wb') as f:
        f.write(content)
    with self.assertRaisesRegex(
        ValueError, f'{directory} is damaged.*Delete the directory and rebuild'
    ):
      calibration.CalibrationTable.load(directory)

  def test_load_missing(self):
    with self.assertRaisesRegex(FileNotFoundError, 'No calibration table'):
      calibration.CalibrationTable.load(self._tempdir())

  @parameterized.named_parameters(
      ('unsorted', [[2.0, 1.0]], [0], 'not sorted'),
      ('duplicate_ids', [[1.0], [2.0]], [0, 0], 'duplicates'),
      ('id_count', [[1.0], [2.0]], [0], 'one id per row'),
      ('nan', [[np.nan]], [0], 'non-finite'),
  )
  def test_bad_table(self, rows, ids, message):
    with self.assertRaisesRegex(ValueError, message):
      calibration.CalibrationTable(
          sorted_rewards=np.array(rows), prompt_ids=np.array(ids), identity={}
      )

  def test_prompts_fingerprint_is_length_prefixed(self):
    self.assertNotEqual(
        calibration.prompts_fingerprint(['ab', 'c']),
        calibration.prompts_fingerprint(['a', 'bc']),
    )


if __name__ == '__main__':
  jax.config.update('jax_numpy_rank_promotion', 'raise')
  absltest.main()
