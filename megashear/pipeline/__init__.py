"""The shearing pipeline: ``megashear shear RECIPE.yaml``, the whole job from one file.

- :mod:`~megashear.pipeline.recipe`: the recipe (dataclasses, read by :mod:`megashear.config_io`)
  and its checks;
- :mod:`~megashear.pipeline.runner`: launching stage processes (torchrun for several ranks),
  their logs, timing and progress lines;
- :mod:`~megashear.pipeline.stages`: each stage as a command, with typed results read back from
  the files the stage wrote;
- :mod:`~megashear.pipeline.worker`: the pipeline's own stage process (evaluation to a file);
- :mod:`~megashear.pipeline.shear`: the job, resumable by stage (docs/pipeline.md).

It sits above :mod:`megashear.jobs` and below :mod:`megashear.cli`.
"""
