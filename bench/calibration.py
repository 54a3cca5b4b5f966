r"""Benchmark calibrated rewards and the calibrated-space trade-off sweep.

  .venv/bin/python bench/calibration.py [--num_prompts=4096] [--repeats=5]

Prints one JSON object. For B prompts, S = 16 policy rewards and M in
{64, 512, 4096} reference rewards per prompt it times, in the same process:

* library: `jax.jit(calibrated_rewards)` on pre-sorted rows (two binary
  searches per query), for the default 'flat' method and the
  `jnp.searchsorted` methods;
* numpy_loop: a Python loop over prompts calling `np.searchsorted` twice;
* pairwise: the S x M comparison `(ref < r).sum() + 0.5 (ref == r).sum()` in
  jax.numpy under `jax.jit`.

Compiled functions are run once before timing; each time is the median of
`--repeats` runs. Ratios divide the library's throughput (queries per
second) by the others'. It also times a trade-off sweep in
`infalign_jax.analysis`: 100 betas x 4 transforms, best-of-N with N = 4,
once cold (including compilation) and once warm.
"""

import json
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np

from infalign_jax import analysis
from infalign_jax import calibration
from infalign_jax import transforms

_NUM_PROMPTS = flags.DEFINE_integer('num_prompts', 4096, 'B, prompts.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 16, 'S, rewards per prompt.')
_NUM_REFERENCE = flags.DEFINE_list(
    'num_reference', ['64', '512', '4096'], 'Values of M to benchmark.'
)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per measurement.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random rewards.')

_METHODS = ('flat', 'scan', 'sort', 'compare_all')


def _median_seconds(fn, repeats: int) -> float:
  fn()  # Warm-up: compilation and first-touch allocations.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _numpy_loop(rewards: np.ndarray, sorted_ref: np.ndarray) -> np.ndarray:
  out = np.empty(rewards.shape, np.float32)
  num_reference = sorted_ref.shape[1]
  for b in range(rewards.shape[0]):
    left = np.searchsorted(sorted_ref[b], rewards[b], side='left')
    right = np.searchsorted(sorted_ref[b], rewards[b], side='right')
    out[b] = (left + right) / (2 * num_reference)
  return out


@jax.jit
def _pairwise(rewards: jax.Array, ref: jax.Array) -> jax.Array:
  below = (ref[:, None, :] < rewards[:, :, None]).sum(-1)
  equal = (ref[:, None, :] == rewards[:, :, None]).sum(-1)
  return (below + 0.5 * equal) / ref.shape[1]


def _bench_calibration(num_reference: int) -> dict:
  rng = np.random.default_rng(_SEED.value)
  num_prompts, num_samples = _NUM_PROMPTS.value, _NUM_SAMPLES.value
  # Rounded to 1/8 so that ties occur, as with a quantized reward model.
  ref = np.round(rng.normal(size=(num_prompts, num_reference)) * 8) / 8
  rewards = np.round(rng.normal(size=(num_prompts, num_samples)) * 8) / 8
  ref, rewards = ref.astype(np.float32), rewards.astype(np.float32)
  sorted_ref_np = np.sort(ref, axis=1)
  sorted_ref = jax.device_put(sorted_ref_np)
  rewards_device = jax.device_put(rewards)
  queries = num_prompts * num_samples

  expected = _numpy_loop(rewards, sorted_ref_np)
  result = {'M': num_reference}
  library_seconds = {}
  for method in _METHODS:
    fn = jax.jit(
        lambda r, s, method=method: calibration.calibrated_rewards(
            r, s, method=method
        )
    )
    np.testing.assert_allclose(
        fn(rewards_device, sorted_ref), expected, atol=1e-6
    )
    library_seconds[method] = _median_seconds(
        lambda fn=fn: fn(rewards_device, sorted_ref).block_until_ready(),
        _REPEATS.value,
    )
  best_method = min(library_seconds, key=library_seconds.get)
  numpy_seconds = _median_seconds(
      lambda: _numpy_loop(rewards, sorted_ref_np), _REPEATS.value
  )
  ref_device = jax.device_put(ref)
  np.testing.assert_allclose(
      _pairwise(rewards_device, ref_device), expected, atol=1e-6
  )
  pairwise_seconds = _median_seconds(
      lambda: _pairwise(rewards_device, ref_device).block_until_ready(),
      _REPEATS.value,
  )
  default_seconds = library_seconds['flat']
  result.update(
      {
          'library_queries_per_s': {
              m: round(queries / s) for m, s in library_seconds.items()
          },
          'library_best_method': best_method,
          'numpy_loop_queries_per_s': round(queries / numpy_seconds),
          'pairwise_queries_per_s': round(queries / pairwise_seconds),
          'speedup_vs_numpy_loop_default': round(
              numpy_seconds / default_seconds, 2
          ),
          'speedup_vs_pairwise_default': round(
              pairwise_seconds / default_seconds, 2
          ),
          'speedup_vs_numpy_loop_best': round(
              numpy_seconds / library_seconds[best_method], 2
          ),
          'speedup_vs_pairwise_best': round(
              pairwise_seconds / library_seconds[best_method], 2
          ),
      }
  )
  return result


def _bench_sweep() -> dict:
  betas = np.geomspace(1e-2, 1e2, 100)
  sweep_transforms = (
      transforms.make_transform('identity'),
      transforms.make_transform('log'),
      transforms.make_transform('exp', t=5.0),
      transforms.make_transform('neg_exp', t=5.0),
  )

  def sweep():
    return [
        analysis.tradeoff_curve(t, betas, 'bon', 4) for t in sweep_transforms
    ]

  start = time.perf_counter()
  sweep()
  cold = time.perf_counter() - start
  warm = _median_seconds(sweep, _REPEATS.value)
  return {
      'betas': len(betas),
      'transforms': len(sweep_transforms),
      'procedure': 'bon',
      'n': 4,
      'num_points': analysis.DEFAULT_NUM_POINTS,
      'cold_seconds': round(cold, 3),
      'warm_seconds': round(warm, 4),
  }


def main(argv):
  del argv
  report = {
      'jax': jax.__version__,
      'backend': jax.default_backend(),
      'devices': [str(d) for d in jax.devices()],
      'machine': platform.machine(),
      'B': _NUM_PROMPTS.value,
      'S': _NUM_SAMPLES.value,
      'repeats': _REPEATS.value,
      'calibration': [_bench_calibration(int(m)) for m in _NUM_REFERENCE.value],
      'tradeoff_sweep': _bench_sweep(),
  }
  print(json.dumps(report, indent=2))


if __name__ == '__main__':
  app.run(main)
