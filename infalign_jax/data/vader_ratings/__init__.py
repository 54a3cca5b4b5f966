"""TFDS dataset of the human-rated sentences published with VADER."""

from infalign_jax.data.vader_ratings.vader_ratings import (
    SPLITS,
    SUBSETS,
    DatasetDamagedError,
    VaderRatings,
    build,
    load,
    load_examples,
    parse_examples,
    parse_ground_truth,
    parse_raw_ratings,
    split_for_id,
)

__all__ = (
    'SPLITS',
    'SUBSETS',
    'DatasetDamagedError',
    'VaderRatings',
    'build',
    'load',
    'load_examples',
    'parse_examples',
    'parse_ground_truth',
    'parse_raw_ratings',
    'split_for_id',
)
