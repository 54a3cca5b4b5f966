"""Train state and the compiled train step.

Notation: B prompts, S policy samples per prompt, M reference samples per
prompt, T tokens, V vocabulary.
"""

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Everything that decides the rest of a run, as one pytree.

  Attributes:
    step: int32 scalar, number of optimizer updates applied so far.
    params: the trained parameters.
    opt_state: the optax optimizer state.
    key: typed PRNG key of the run; each step folds in `step`.
    data_position: int64 scalar, index of the next example the data pipeline
      yields, so a resumed run reads the same batches.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  key: jax.Array
  data_position: jax.Array
