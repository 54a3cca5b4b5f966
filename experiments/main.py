r"""Entry point for every experiment.

  python -m experiments.main --config=experiments/configs/theory.py \
      --workdir=runs/theory

Any config field can be overridden on the command line, for example
`--config.beta=0.1`. The config's `experiment` field names the module in
`experiments/` whose `run(config, workdir)` does the work.
"""

import importlib

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for artifacts, checkpoints and the report.'
)
config_flags.DEFINE_config_file(
    'config', None, 'Path to an experiment config file.', lock_config=True
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected command-line arguments: {argv[1:]}')
  config = flags.FLAGS.config
  module = importlib.import_module(f'experiments.{config.experiment}')
  common.run_experiment(module.run, config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
