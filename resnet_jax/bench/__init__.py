"""Benchmarks of the train step and the input pipelines, JAX against PyTorch: ``resnet-jax bench``.

`harness` times runners in turn and reduces them to medians and ratios; `jax_side` runs the project's
own train step, `torch_side` the same model (`torch_models`), loss, optimizer and precision in PyTorch;
`inputs` times the input pipelines; `report` prints the rows and writes the JSON results.
benchmarks/README.md has the measured numbers and what was tried to make the CPU step fast.
"""
