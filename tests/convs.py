"""The two convolutions a model can hold, for the model tests that must pass with either."""

import pytest

from resnet_jax.cpu.conv import cpu_conv
from resnet_jax.models.blocks import Conv

# The plain conv, and XLA:CPU's for a program of one core: every one of its forms in use (each conv input a buffer
# of its own, kernel gradients in chunks of images, narrow 3x3 convs over pairs of columns).
CONVS = {"plain conv": Conv, "cpu conv": cpu_conv(1)}

with_either_conv = pytest.mark.parametrize("conv", list(CONVS.values()), ids=list(CONVS))
