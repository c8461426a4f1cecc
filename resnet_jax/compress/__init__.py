"""Making a trained ResNet smaller.

- `numerics`: symmetric int8 quantization of arrays, fake quantization with straight-through gradients, and the
  calibration of activation ranges (min-max, percentile, MSE).
- `layers`: the convs a compressed model is built with, passed to `resnet_jax.models.ResNet` as its ``conv``.
- `quantize`: post-training int8 quantization of a run into a new run folder (``resnet-jax quantize``).
- `prune`: global magnitude pruning of conv kernels during training (``--config.prune.*``).
- `distill`: knowledge distillation from a teacher run (``--config.distill.*``).
- `channels`: channel pruning by BN scale into a narrower model (``resnet-jax prune-channels``).
- `lowrank`: SVD factorisation of convs into a new run folder, then a fine-tune (``resnet-jax lowrank``).
- `compare`: accuracy, size, multiply-adds and CPU latency of runs side by side (``resnet-jax compare``).
- `derived`: a compressed model written as a step of a new run folder, then fine-tuned there.
- `cli`: the commands.

docs/compression.md shows each method's measured trade-off.
"""
