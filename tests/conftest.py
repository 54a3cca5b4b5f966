"""JAX settings for every test: loud broadcasting bugs, exact matmuls."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')
jax.config.update('jax_default_matmul_precision', 'highest')
jax.config.update('jax_threefry_partitionable', True)
