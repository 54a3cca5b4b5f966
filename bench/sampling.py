r"""Benchmark KV-cached sampling against recomputation and transformers.

  .venv/bin/python bench/sampling.py
  .venv/bin/python bench/sampling.py --width=256 --layers=4 --heads=4

Needs the `bench` extra (torch==2.13.0 and transformers) for the baseline.

Measures completion tokens per second of three samplers on the same model
shape, all on the CPU, in one process:

- `sampling.sample`: jit-compiled, KV cache, one prefill per prompt;
- `sampling.sample_without_cache`: the same draws, but every step reruns the
  whole [B, P + L] sequence through the model;
- Hugging Face transformers' `GPT2LMHeadModel.generate` with random weights
  in PyTorch: KV cache, multinomial sampling at temperature 1 with top-k and
  top-p filtering turned off.

The GPT-2 model has the same width, depth, heads, MLP size, vocabulary and
context length as the JAX model (GPT-2 is also pre-layer-norm with learned
positions and a tied output projection). Every sampler generates exactly
`new_tokens` tokens for each of `batch` prompts of `prompt_len` tokens: EOS
is disabled in all three. Each sampler is warmed up once (compilation for
JAX), then the samplers run in turn `repeats` times, and the reported rate
uses the median time. Prints one JSON object.
"""

import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from infalign_jax import models
from infalign_jax import sampling

_WIDTH = flags.DEFINE_integer('width', 128, 'Model width.')
_LAYERS = flags.DEFINE_integer('layers', 2, 'Transformer blocks.')
_HEADS = flags.DEFINE_integer('heads', 4, 'Attention heads.')
_VOCAB = flags.DEFINE_integer('vocab_size', 259, 'Vocabulary size.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Prompts sampled in parallel.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 25, 'P, prompt tokens.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 64, 'L, tokens generated.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per sampler.')
_SKIP_TRANSFORMERS = flags.DEFINE_bool(
    'skip_transformers', False, 'Do not run the transformers baseline.'
)


def _time_runs(run, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return times


def _jax_samplers(config, prompts, new_tokens):
  """Return the cached and uncached JAX samplers as blocking thunks."""
  params = models.init_lm(jax.random.key(0), config)
  batch = prompts.shape[0]
  prompt_tokens = jnp.asarray(prompts, jnp.int32)
  prompt_lengths = jnp.full((batch,), prompts.shape[1], jnp.int32)
  counter = iter(range(1 << 30))

  def make(sample_fn):
    def run():
      out = sample_fn(
          jax.random.key(next(counter)),
          params,
          config,
          prompt_tokens,
          prompt_lengths,
          num_samples=1,
          max_new_tokens=new_tokens,
          temperature=1.0,
          eos_id=None,
          pad_id=0,
      )
      jax.block_until_ready(out)
      if out.tokens.shape != (batch, 1, new_tokens):
        raise RuntimeError(f'unexpected output shape {out.tokens.shape}')

    return run

  return make(sampling.sample), make(sampling.sample_without_cache)


def _transformers_sampler(config, prompts, new_tokens):
  """Return a thunk that runs transformers' generate on a random GPT-2."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  gpt2_config = transformers.GPT2Config(
      vocab_size=config.vocab_size,
      n_positions=config.max_len,
      n_embd=config.width,
      n_layer=config.num_layers,
      n_head=config.num_heads,
      n_inner=config.hidden_dim,
      bos_token_id=None,
      eos_token_id=None,
      pad_token_id=0,
  )
  model = transformers.GPT2LMHeadModel(gpt2_config).eval()
  input_ids = torch.as_tensor(prompts, dtype=torch.long)
  attention_mask = torch.ones_like(input_ids)
  generation_config = transformers.GenerationConfig(
      do_sample=True,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      max_new_tokens=new_tokens,
      min_new_tokens=new_tokens,
      use_cache=True,
      bos_token_id=None,
      eos_token_id=None,
      pad_token_id=0,
  )

  def run():
    with torch.inference_mode():
      out = model.generate(
          input_ids=input_ids,
          attention_mask=attention_mask,
          generation_config=generation_config,
      )
    expected = (input_ids.shape[0], input_ids.shape[1] + new_tokens)
    if tuple(out.shape) != expected:
      raise RuntimeError(f'unexpected generate output shape {tuple(out.shape)}')

  versions = {
      'torch': torch.__version__,
      'transformers': transformers.__version__,
      'torch_threads': torch.get_num_threads(),
  }
  return run, versions


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  batch, prompt_len, new_tokens = (
      _BATCH.value,
      _PROMPT_LEN.value,
      _NEW_TOKENS.value,
  )
  config = models.TransformerConfig(
      vocab_size=_VOCAB.value,
      width=_WIDTH.value,
      num_layers=_LAYERS.value,
      num_heads=_HEADS.value,
      max_len=prompt_len + new_tokens,
  )
  # Token 0 is the pad id; keeping it out of the prompts avoids a padding
  # warning from transformers.
  prompts = np.random.default_rng(0).integers(
      1, config.vocab_size, (batch, prompt_len)
  )

  samplers = {}
  samplers['jax_cached'], samplers['jax_uncached'] = _jax_samplers(
      config, prompts, new_tokens
  )
  versions = {'jax': jax.__version__}
  if not _SKIP_TRANSFORMERS.value:
    samplers['transformers_generate'], baseline_versions = (
        _transformers_sampler(config, prompts, new_tokens)
    )
    versions.update(baseline_versions)

  warmup_s = {}
  for name, run in samplers.items():
    start = time.perf_counter()
    run()
    warmup_s[name] = round(time.perf_counter() - start, 3)

  times = {name: [] for name in samplers}
  for _ in range(_REPEATS.value):
    for name, run in samplers.items():
      times[name] += _time_runs(run, 1)

  generated = batch * new_tokens
  tokens_per_s = {
      name: generated / statistics.median(seconds)
      for name, seconds in times.items()
  }
  result = {
      'benchmark': 'sampling',
      'model': {
          'vocab_size': config.vocab_size,
          'width': config.width,
          'layers': config.num_layers,
          'heads': config.num_heads,
          'mlp_dim': config.hidden_dim,
      },
      'batch': batch,
      'prompt_len': prompt_len,
      'new_tokens': new_tokens,
      'repeats': _REPEATS.value,
      'tokens_per_s': {k: round(v, 1) for k, v in tokens_per_s.items()},
      'median_s': {k: round(statistics.median(v), 4) for k, v in times.items()},
      'min_s': {k: round(min(v), 4) for k, v in times.items()},
      'warmup_s': warmup_s,
      'cached_over_uncached': round(
          tokens_per_s['jax_cached'] / tokens_per_s['jax_uncached'], 2
      ),
      'devices': [str(d) for d in jax.devices()],
      'cpu_count': os.cpu_count(),
      'machine': platform.machine(),
      'versions': versions,
  }
  if 'transformers_generate' in tokens_per_s:
    result['cached_over_transformers'] = round(
        tokens_per_s['jax_cached'] / tokens_per_s['transformers_generate'], 2
    )
    result['goal_cached_over_transformers'] = 2.0
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
