"""Data for the main job: the VADER-rated sentences, tokenizer and judge.

Modules (import the one you need; this package imports none of them, so that
`import infalign_jax.data` stays cheap):

- `fetch`: downloads and verifies the vaderSentiment 3.3.2 source archive.
- `vader_ratings`: the TFDS builder, `build` and `load`.
- `tokenizer`: byte-level tokenizer with PAD, BOS and EOS.
- `judge`: the VADER compound score and pairwise accuracy against ratings.
- `synthetic`: small archives with the same layout, for tests.
"""
