"""The convolution of models built for XLA:CPU (`resnet_jax.cpu.conv`): XLA's values and gradients in both modes,
each of its forms where it applies, and the choice `model_conv` makes for a run."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.cpu.conv import (
    KERNEL_GRAD_CHUNK,
    NHWC,
    CpuConvolution,
    conv_over_column_pairs,
    cpu_conv,
    model_conv,
)
from resnet_jax.models import create_model
from resnet_jax.models.blocks import Conv


def sine_loss(conv, x, w, **options):
    return jnp.sum(jnp.sin(conv(x, w, **options)))


@pytest.mark.parametrize("cores", [1, 2])
@pytest.mark.parametrize(
    "batch, strides, groups", [(20, 1, 1), (13, 2, 2), (3, 1, 1)], ids=["3-chunks", "stride2-groups", "one-chunk"]
)
def test_cpu_conv_keeps_values_gradients_and_forward_mode(batch, strides, groups, cores):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 9, 9, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4 // groups, 6)), jnp.float32)
    options = dict(
        window_strides=(strides, strides), padding=((1, 1), (1, 1)), dimension_numbers=NHWC, feature_group_count=groups
    )
    ours = partial(sine_loss, CpuConvolution(cores), **options)
    xla = partial(sine_loss, jax.lax.conv_general_dilated, **options)
    np.testing.assert_array_equal(ours(x, w), xla(x, w))
    (dx, dw), (dx_ref, dw_ref) = jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.jit(jax.grad(xla, (0, 1)))(x, w)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(dw_ref).max()))
    tangents = (jnp.cos(x), jnp.cos(w))
    np.testing.assert_allclose(jax.jvp(ours, (x, w), tangents)[1], jax.jvp(xla, (x, w), tangents)[1], rtol=1e-5)
    # The kernel gradient is one convolution per chunk of KERNEL_GRAD_CHUNK images (and one for the forward pass).
    compiled = jax.jit(jax.grad(ours, 1)).lower(x, w).compile().as_text()
    assert compiled.count(" convolution(") == -(-batch // KERNEL_GRAD_CHUNK) + 1


def test_column_pairs_conv_matches_xla_in_values_gradients_and_forward_mode():
    rng = np.random.default_rng(1)
    options = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=NHWC)
    for shape, kernel_shape in (((5, 8, 10, 5), (3, 3, 5, 7)), ((2, 28, 28, 3), (3, 3, 3, 16))):
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)
        pairs = partial(sine_loss, conv_over_column_pairs)
        xla = partial(sine_loss, jax.lax.conv_general_dilated, **options)
        np.testing.assert_allclose(pairs(x, w), xla(x, w), rtol=1e-5)
        grads, expected = jax.grad(pairs, (0, 1))(x, w), jax.grad(xla, (0, 1))(x, w)
        scale = max(float(jnp.abs(g).max()) for g in expected)
        chex.assert_trees_all_close(grads, expected, rtol=1e-4, atol=1e-5 * scale)
        tangents = (jnp.cos(x), jnp.cos(w))
        np.testing.assert_allclose(jax.jvp(pairs, (x, w), tangents)[1], jax.jvp(xla, (x, w), tangents)[1], rtol=1e-4)


def runs_over_column_pairs(cores: float, shape, features: int, strides: int = 1) -> bool:
    """Whether the compiled conv holds the kernel over pairs of columns, (3, 2, 2C, 2D)."""
    x, w = jnp.zeros(shape), jnp.zeros((3, 3, shape[-1], features))
    conv = partial(CpuConvolution(cores), padding=((1, 1), (1, 1)), dimension_numbers=NHWC)
    text = jax.jit(lambda x, w: conv(x, w, (strides, strides))).lower(x, w).compile().as_text()
    return f"f32[3,2,{2 * shape[-1]},{2 * features}]" in text


@pytest.mark.parametrize("cores", [1, 0.5])
def test_narrow_convs_run_over_column_pairs_in_programs_of_one_core_or_less(cores):
    assert runs_over_column_pairs(cores, (4, 8, 10, 16), 16)
    assert not runs_over_column_pairs(cores, (4, 8, 9, 16), 16)  # odd width
    assert not runs_over_column_pairs(cores, (4, 8, 10, 16), 17)  # YNNPACK takes it anyway
    assert not runs_over_column_pairs(cores, (4, 8, 10, 16), 16, strides=2)


def test_programs_with_more_cores_keep_xlas_narrow_convs():
    assert not runs_over_column_pairs(2, (4, 8, 10, 16), 16)


@pytest.mark.parametrize(
    ("platform", "parallelism", "batch_parts", "cores", "expected"),
    [
        ("gpu", "jit", 2, 8, Conv),
        ("tpu", "pmap", 2, 8, Conv),
        ("cpu", "jit", 2, 2, cpu_conv(2)),
        ("cpu", "pmap", 2, 1, cpu_conv(1)),  # a process of --cpu-processes, pinned to one core
        ("cpu", "batch_parts", 2, 2, cpu_conv(1)),  # two parts at once: a core each
        ("cpu", "batch_parts", 8, 2, cpu_conv(0.25)),
    ],
)
def test_model_conv_gives_each_program_its_share_of_the_cores(platform, parallelism, batch_parts, cores, expected):
    assert model_conv(platform, parallelism, batch_parts, cores) == expected


def test_models_built_twice_for_a_run_are_equal():
    """Equal models share compiled programs (`initial_variables` caches on the model)."""
    build = lambda: create_model("resnet8", conv=model_conv("cpu", "batch_parts", 2, 2))  # noqa: E731
    assert build() == build() and hash(build()) == hash(build())
    assert build() != create_model("resnet8", conv=model_conv("cpu", "jit", 2, 2))
