r"""CTRL end to end on human-rated movie-review sentences (the main job).

  python -m experiments.main --config=experiments/configs/sentiment.py \
      --workdir=runs/sentiment

Variants, selected with the ml_collections `file.py:arg` convention:

  --config=experiments/configs/sentiment.py:smoke   every stage, tiny model
  --config=experiments/configs/sentiment.py:large   one GPU or a TPU slice

The default config runs on a 2-core CPU. The variants start from it and
override fields, so a field added here reaches them too.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Return the config for `arg` in {None, 'default', 'smoke', 'large'}."""
  config = _default_config()
  if arg in (None, '', 'default'):
    pass
  elif arg == 'smoke':
    _apply_smoke(config)
  elif arg == 'large':
    _apply_large(config)
  else:
    raise ValueError(
        f'Unknown sentiment config variant {arg!r}; use one of '
        "'smoke', 'large' or none (sentiment.py)."
    )
  config.variant = arg or 'default'
  return config


def _default_config() -> ml_collections.ConfigDict:
  """Build the CPU config: end to end in about 20 minutes on 2 cores."""
  config = ml_collections.ConfigDict()
  # Module in experiments/ that runs this config.
  config.experiment = 'sentiment'
  # Name of the variant ('default', 'smoke', 'large'); set by get_config.
  config.variant = 'default'
  # Seed of every PRNG key in the pipeline (each stage folds in its own tag).
  config.seed = 0
  # Keep compiled XLA programs in WORKDIR/jax_cache, so a resumed pipeline
  # does not compile again (JAX_COMPILATION_CACHE_DIR, when set, wins).
  config.compilation_cache = True
  # Compile with most XLA optimizations off: much faster compiles, slower
  # steps. Worth it only for tiny models.
  config.disable_most_optimizations = False

  config.data = ml_collections.ConfigDict()
  # Folder holding the vaderSentiment source archive and the built TFDS data.
  config.data.data_dir = 'data'
  # Subsets the reference LM trains on. Movie reviews only: the prompts are
  # movie-review openings, and the other subsets (tweets, news, Amazon) have
  # their own style that a small LM would otherwise spend capacity on.
  config.data.lm_subsets = ('movie_reviews',)
  # Subsets the reward model trains on: every human rating helps the scorer,
  # and it is evaluated on movie-review pairs only.
  config.data.reward_subsets = (
      'movie_reviews',
      'tweets',
      'nyt_editorials',
      'amazon_reviews',
  )
  # Texts are cut to this many bytes (UTF-8) before tokenization.
  config.data.max_text_bytes = 96

  config.lm = ml_collections.ConfigDict()
  # Transformer width (embedding size) of the reference LM.
  config.lm.width = 128
  # Number of transformer blocks.
  config.lm.depth = 2
  # Attention heads per block.
  config.lm.num_heads = 4
  # Hidden size of each block's MLP.
  config.lm.mlp_width = 512
  # Optimizer steps of next-token training.
  config.lm.steps = 800
  # Texts per step.
  config.lm.batch_size = 32
  # Peak Adam learning rate (linear warmup, then cosine decay).
  config.lm.learning_rate = 3e-3
  # Warmup steps of the learning-rate schedule.
  config.lm.warmup_steps = 50
  # Validation texts used for bits per byte (capped by the split size).
  config.lm.num_eval_texts = 512
  # Samples logged and saved after training, from movie-review openings.
  config.lm.num_samples = 8
  # Steps between checkpoints (resume granularity).
  config.lm.checkpoint_every = 200

  config.reward = ml_collections.ConfigDict()
  # 'regression' to the mean human rating, or 'bradley_terry' on pairs of
  # texts ordered by their raters' mean.
  config.reward.loss = 'regression'
  # The reward model is a transformer of the LM's shape with a scalar head.
  # True: its trunk starts from the trained reference LM. False: from a
  # fresh initialization, which reached 0.745 held-out pair accuracy with
  # the n-gram inputs and mean pooling below.
  config.reward.init_from_reference = False
  # Pooling of the final hidden states: 'mean' over valid tokens or 'last'
  # (the last valid token). Last-token pooling without n-grams reached only
  # 0.516 pair accuracy in this budget.
  config.reward.pooling = 'mean'
  # Orders of hashed byte n-grams whose embeddings are added to the reward
  # model's inputs, so it can recognize words from its first layer.
  config.reward.ngram_orders = (2, 3, 4, 5)
  # Rows of each n-gram embedding table.
  config.reward.ngram_buckets = 8192
  # Optimizer steps.
  config.reward.steps = 600
  # Texts (regression) or pairs (Bradley-Terry) per step.
  config.reward.batch_size = 32
  # Peak Adam learning rate.
  config.reward.learning_rate = 1e-3
  # Warmup steps of the learning-rate schedule.
  config.reward.warmup_steps = 50
  # Held-out movie-review pairs count only if their mean ratings differ by at
  # least this much (on the raters' -4..+4 scale).
  config.reward.min_rating_gap = 1.0
  # Steps between checkpoints.
  config.reward.checkpoint_every = 200

  config.prompts = ml_collections.ConfigDict()
  # A prompt is the first this-many words of a movie-review sentence.
  config.prompts.num_words = 3
  # Prompts longer than this many bytes (after the words) are dropped.
  config.prompts.max_prompt_bytes = 24
  # Sentences with fewer words than num_words + this are dropped, so every
  # prompt has a real continuation in the data.
  config.prompts.min_continuation_words = 2
  # Train-split prompts used for RL (and the calibration table).
  config.prompts.num_train = 128
  # Held-out (test-split) prompts used for evaluation.
  config.prompts.num_eval = 64
  # Maximum continuation length in bytes (tokens) for every sampler call.
  config.prompts.continuation_length = 24

  config.calibration = ml_collections.ConfigDict()
  # M: reference continuations per prompt in the calibration table.
  config.calibration.num_samples = 64
  # Prompts per sampler call.
  config.calibration.batch_prompts = 32

  config.rl = ml_collections.ConfigDict()
  # Methods of the sweep: 'baseline' (raw reward, no calibration), and the
  # calibrated transforms 'identity', 'exp' (BoN) and 'neg_exp' (WoN).
  config.rl.methods = ('baseline', 'identity', 'exp', 'neg_exp')
  # KL targets of the sweep, in nats. Each method runs once per target, with
  # the beta at which the calibrated-space analysis predicts that KL for its
  # transform (raw rewards: the identity's beta).
  config.rl.kl_targets = (0.25, 1.0)
  # N of the inference-time procedures that exp and neg_exp target.
  config.rl.procedure_n = 4
  # KL budget (nats) at which analysis.choose_t picks t for exp and neg_exp.
  config.rl.kl_budget = 0.5
  # Optimizer steps per RL run.
  config.rl.steps = 60
  # Prompts per step (drawn in order from the train prompts, cycling).
  config.rl.batch_prompts = 16
  # S: policy samples per prompt per step (leave-one-out baseline needs >= 2).
  config.rl.samples_per_prompt = 4
  # Adam learning rate of the policy.
  config.rl.learning_rate = 3e-4
  # Policy-gradient loss: 'reinforce' (leave-one-out baseline) or 'ppo'.
  config.rl.loss = 'reinforce'
  # Steps between checkpoints.
  config.rl.checkpoint_every = 20
  # Scale the baseline's raw reward to the spread of a calibrated reward
  # (standard deviation 1/sqrt(12) on the calibration table's samples), so
  # that it can share the identity transform's beta.
  config.rl.normalize_baseline_reward = True

  config.evaluation = ml_collections.ConfigDict()
  # S: policy samples per held-out prompt.
  config.evaluation.samples_per_prompt = 16
  # M: reference samples per held-out prompt.
  config.evaluation.ref_samples_per_prompt = 32
  # Prompts per sampler call.
  config.evaluation.batch_prompts = 32
  # N of the BoN and WoN win rates reported.
  config.evaluation.procedure_n = 4
  return config


def _apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrink every stage to a tiny model: under 2 minutes on 2 cores."""
  config.disable_most_optimizations = True
  config.data.max_text_bytes = 48
  config.data.reward_subsets = ('movie_reviews',)
  config.lm.width = 32
  config.lm.depth = 1
  config.lm.num_heads = 2
  config.lm.mlp_width = 64
  config.lm.steps = 30
  config.lm.batch_size = 8
  config.lm.num_eval_texts = 32
  config.lm.num_samples = 2
  config.lm.checkpoint_every = 10
  config.reward.steps = 30
  config.reward.batch_size = 8
  config.reward.ngram_buckets = 512
  config.reward.checkpoint_every = 10
  config.prompts.num_train = 8
  config.prompts.num_eval = 8
  config.prompts.continuation_length = 8
  config.calibration.num_samples = 8
  config.calibration.batch_prompts = 8
  config.rl.methods = ('baseline', 'exp', 'neg_exp')
  config.rl.kl_targets = (0.5,)
  config.rl.steps = 4
  config.rl.batch_prompts = 4
  config.rl.samples_per_prompt = 4
  config.rl.checkpoint_every = 2
  config.evaluation.samples_per_prompt = 4
  config.evaluation.ref_samples_per_prompt = 4
  config.evaluation.batch_prompts = 8


def _apply_large(config: ml_collections.ConfigDict) -> None:
  """Scale up for one GPU or a TPU slice (batches shard over 'data')."""
  config.data.max_text_bytes = 192
  config.lm.width = 512
  config.lm.depth = 8
  config.lm.num_heads = 8
  config.lm.mlp_width = 2048
  config.lm.steps = 20000
  config.lm.batch_size = 256
  config.lm.learning_rate = 1e-3
  config.lm.warmup_steps = 500
  config.lm.num_eval_texts = 2048
  config.lm.checkpoint_every = 1000
  config.reward.steps = 8000
  config.reward.batch_size = 256
  config.reward.learning_rate = 3e-4
  config.reward.warmup_steps = 300
  config.reward.checkpoint_every = 1000
  config.prompts.num_words = 4
  config.prompts.max_prompt_bytes = 40
  config.prompts.num_train = 2048
  config.prompts.num_eval = 512
  config.prompts.continuation_length = 48
  config.calibration.num_samples = 512
  config.calibration.batch_prompts = 128
  config.rl.kl_targets = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
  config.rl.steps = 2000
  config.rl.batch_prompts = 128
  config.rl.samples_per_prompt = 8
  config.rl.learning_rate = 3e-5
  config.rl.checkpoint_every = 200
  config.evaluation.samples_per_prompt = 64
  config.evaluation.ref_samples_per_prompt = 256
  config.evaluation.batch_prompts = 128
