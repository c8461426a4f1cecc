"""What makes training fast on XLA:CPU, kept apart from the models and the train step, which hold none of it.

- `conv`: the convolution of models built for a CPU run (`model_conv` decides which conv a model gets);
- `batch_parts`: a train step whose batch parts run side by side on host threads (``parallelism="batch_parts"``);
- `host_memory`: glibc's malloc set to reuse XLA's freed temporaries (every ``resnet-jax`` command sets it first);
- `processes`: the ``--cpu-processes`` launcher, one pinned process per group of cores.

Each module's docstring says what it answers; benchmarks/README.md has the measurements.
"""
