"""CTRL end to end on human-rated movie-review sentences (the main job).

`run(config, workdir)` runs or resumes every stage; see `pipeline`.
"""


def run(config, workdir):
  """Run or resume the pipeline; see `experiments.sentiment.pipeline.run`."""
  # Imported here so the pure helpers (prompts, report, stages) import
  # without the training stack.
  from experiments.sentiment import pipeline  # noqa: PLC0415

  return pipeline.run(config, workdir)
