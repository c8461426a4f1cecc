"""The convolution of models built for XLA:CPU: the same values as `lax.conv_general_dilated` (up to summation
order), computed in forms that XLA:CPU runs faster.

A model takes its conv as a field (`ResNet.conv`); `model_conv` gives a model for a CPU run `cpu_conv`, whose
modules compute with `CpuConvolution`. Three changes, each for a weakness of XLA:CPU (measured in
benchmarks/README.md, "CPU: where the time went"):

- every conv input is a buffer of its own (`materialize`): XLA:CPU's fusion otherwise recomputes the
  elementwise chain that produces it (BN, ReLU, the residual adds of the stage) in each transpose that a
  kernel gradient makes of it;
- the kernel gradient is a sum of convolutions over `KERNEL_GRAD_CHUNK` images at a time: XLA:CPU computes it
  as one convolution whose "kernel" is the whole output gradient, which leaves the cache;
- in a program with at most one core, a narrow 3x3 convolution runs over pairs of columns
  (`conv_over_column_pairs`): XLA:CPU gives convolutions of at most `EIGEN_MAX_FEATURES` channels to Eigen, and
  their pair form, twice as wide, to the faster YNNPACK; with more cores Eigen keeps up.

`CpuConvolution` is a `jax.custom_jvp`, so forward mode (the Jacobian analyses) works as well as reverse mode.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from resnet_jax.models.blocks import Conv, ModuleDef

# Images per convolution of a kernel gradient: the fastest of 2 to 32 on XLA:CPU.
KERNEL_GRAD_CHUNK = 8
# XLA:CPU runs a convolution with at most this many input and output features on Eigen, with more on YNNPACK.
EIGEN_MAX_FEATURES = 16
NHWC = ("NHWC", "HWIO", "NHWC")
CONV_SIGNATURE = inspect.signature(lax.conv_general_dilated)


def process_cores() -> int:
    """The cores this process may run on: its affinity on Linux (where `--cpu-processes` pins each process),
    else every core. Read it once, where a model for a run is built, and pass it on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def model_conv(platform: str, parallelism: str, batch_parts: int, cores: int) -> ModuleDef:
    """The conv of a model for a run on ``platform`` ("cpu", "gpu", "tpu") with ``parallelism`` ("jit", "pmap",
    "batch_parts" of ``batch_parts`` parts) in a process with ``cores`` cores (`process_cores`).

    Off the CPU: the plain `Conv`. On it: `cpu_conv` with each program's share of the cores, the batch parts
    running at once.
    """
    if platform != "cpu":
        return Conv
    programs_at_once = batch_parts if parallelism == "batch_parts" else 1
    return cpu_conv(cores / max(programs_at_once, 1))


def cpu_conv(cores: float) -> ModuleDef:
    """`Conv` computing with `CpuConvolution` for a program with ``cores`` cores (a share: 0.5 is half of one)."""
    return conv_computing_with(CpuConvolution(float(cores)))


@functools.cache  # one ModuleDef per convolution, so that models built twice for one run compare equal
def conv_computing_with(convolution: CpuConvolution) -> ModuleDef:
    return functools.partial(Conv, conv_general_dilated=convolution)


@dataclasses.dataclass(frozen=True)
class CpuConvolution:
    """`lax.conv_general_dilated` for XLA:CPU (see the module's docstring), for a program with ``cores`` cores."""

    cores: float

    def __call__(self, lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        def conv(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
            return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)

        options = CONV_SIGNATURE.bind(lhs, rhs, *args, **kwargs)
        options.apply_defaults()
        forward = conv
        if self.cores <= 1 and column_pairs_eligible(lhs, rhs, options):
            forward = functools.partial(conv_over_column_pairs, precision=options.arguments["precision"])
        numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, options.arguments["dimension_numbers"])
        return convolve_in_chunks(conv, forward, numbers.lhs_spec[0], numbers.out_spec[0])(materialize(lhs), rhs)


def convolve_in_chunks(conv: Any, forward: Any, lhs_batch: int, out_batch: int) -> Any:
    """``conv`` (lhs, rhs) computed by ``forward``, with its tangent in rhs (hence the kernel gradient) a
    concatenation over chunks of `KERNEL_GRAD_CHUNK` images along the batch axes ``lhs_batch`` and ``out_batch``."""

    def kernel_tangent_in_chunks(lhs: jax.Array, rhs_dot: jax.Array) -> jax.Array:
        size = lhs.shape[lhs_batch]
        chunks = [
            conv(lax.slice_in_dim(lhs, start, min(start + KERNEL_GRAD_CHUNK, size), axis=lhs_batch), rhs_dot)
            for start in range(0, size, KERNEL_GRAD_CHUNK)
        ]
        return lax.concatenate(chunks, out_batch)

    @jax.custom_jvp
    def convolve(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return forward(lhs, rhs)

    @functools.partial(convolve.defjvp, symbolic_zeros=True)
    def convolve_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]) -> tuple[jax.Array, jax.Array]:
        (lhs, rhs), (lhs_dot, rhs_dot) = primals, tangents
        out = forward(lhs, rhs)
        terms = []
        if not isinstance(lhs_dot, SymbolicZero):
            terms.append(conv(lhs_dot, rhs))
        if not isinstance(rhs_dot, SymbolicZero):
            # Linear in rhs_dot, so reverse mode transposes each chunk into one chunk's kernel gradient.
            terms.append(kernel_tangent_in_chunks(lhs, rhs_dot))
        tangent = sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)
        return out, tangent

    return convolve


def materialize(x: jax.Array) -> jax.Array:
    """``x`` unchanged, computed once into a buffer of its own.

    XLA:CPU fuses the cheap elementwise ops that produce a conv input (BN, ReLU, the residual add and, through
    the identity shortcuts, those of all earlier blocks of the stage) into every consumer, and the kernel
    gradient of each conv transposes its input: each transpose recomputed that chain. Its fusion never
    duplicates a division, so dividing by a 1.0 computed at run time (a constant would be folded away) makes
    the value a buffer of its own; x / 1.0 == x exactly.
    """
    finite = jnp.isfinite(lax.stop_gradient(x.ravel()[0]))
    return x / (1 + 0 * finite.astype(x.dtype))  # 1.0 for any x, unknown to the compiler


def column_pairs_eligible(lhs: jax.Array, rhs: jax.Array, options: inspect.BoundArguments) -> bool:
    """Whether `conv_over_column_pairs` can compute this convolution and XLA:CPU would give it to Eigen: NHWC,
    3x3, stride 1, padding 1, no dilation or groups, an even width and at most `EIGEN_MAX_FEATURES` channels."""
    o = options.arguments
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC) if lhs.ndim == rhs.ndim == 4 else None
    return (
        nhwc is not None
        and o["dimension_numbers"] is not None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, o["dimension_numbers"]) == nhwc
        and rhs.shape[:2] == (3, 3)
        and max(rhs.shape[2:]) <= EIGEN_MAX_FEATURES
        and lhs.shape[2] % 2 == 0
        and tuple(o["window_strides"]) == (1, 1)
        and not isinstance(o["padding"], str)
        and tuple(map(tuple, o["padding"])) == ((1, 1), (1, 1))
        and tuple(o["lhs_dilation"] or (1, 1)) == tuple(o["rhs_dilation"] or (1, 1)) == (1, 1)
        and o["feature_group_count"] == o["batch_group_count"] == 1
    )


def column_pairs_kernel(kernel: jax.Array) -> jax.Array:
    """3x3 taps (3, 3, C, D) as a kernel over pairs of columns, (3, 2, 2C, 2D).

    Input pair k holds columns (2k-1, 2k) of the image padded by a column either side, output pair j columns
    (2j, 2j+1); input column 2k-1+a reaches output column 2j+b through tap 2(k-j)+a-b, and the blocks whose tap
    falls outside 0..2 are zero (6 of 24: 4/3 the arithmetic of the 3x3 convolution).
    """
    d, a, b = np.meshgrid(range(2), range(2), range(2), indexing="ij")
    taps = jnp.pad(kernel, ((0, 0), (1, 1), (0, 0), (0, 0)))[:, 2 * d + a - b + 1]  # (3, d, a, b, C, D)
    height, _, channels, features = kernel.shape
    return taps.transpose(0, 1, 2, 4, 3, 5).reshape(height, 2, 2 * channels, 2 * features)


def conv_over_column_pairs(lhs: jax.Array, rhs: jax.Array, precision: Any = None) -> jax.Array:
    """A 3x3, stride-1, padding-1 NHWC convolution computed over pairs of columns with twice the channels.

    A narrow convolution that XLA:CPU would run on Eigen runs on YNNPACK in this form, which is faster on one
    core; pairing columns is a free reshape in NHWC. Values change only by summation order.
    """
    batch, height, width, channels = lhs.shape
    pairs = jnp.pad(lhs, ((0, 0), (0, 0), (1, 1), (0, 0))).reshape(batch, height, width // 2 + 1, 2 * channels)
    kernel = column_pairs_kernel(rhs)
    out = lax.conv_general_dilated(pairs, kernel, (1, 1), ((1, 1), (0, 0)), dimension_numbers=NHWC, precision=precision)
    return out.reshape(batch, height, width, rhs.shape[-1])
