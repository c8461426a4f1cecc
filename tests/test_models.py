"""The model zoo against shared/REFERENCE.md section 1, and its contracts (shapes, BN, dtypes, errors)."""

from __future__ import annotations

import math
from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from convs import CONVS, with_either_conv

from resnet_jax import create_model, list_models
from resnet_jax.models.complexity import count_params, model_cost

IMAGENET = (224, 224, 3)
CIFAR = (32, 32, 3)

# shared/REFERENCE.md section 1: (model, params, GMACs at 224x224, 1000 classes).
IMAGENET_REFERENCE = [
    ("resnet18", 11_689_512, 1.814),
    ("resnet34", 21_797_672, 3.664),
    ("resnet50", 25_557_032, 4.089),
    ("resnet101", 44_549_160, 7.801),
    ("resnet152", 60_192_808, 11.514),
    ("wide_resnet50_2", 68_883_240, 11.398),
    ("wide_resnet101_2", 126_886_696, 22.753),
    ("resnext50_32x4d", 25_028_904, 4.230),
    ("resnext101_32x8d", 88_791_336, 16.414),
    ("se_resnet50", 28_088_024, 4.09),
]
# (model, params, MMACs or None) at 32x32, 10 classes.
CIFAR_REFERENCE = [
    ("resnet20", 269_722, 40.6),
    ("resnet32", 464_154, None),
    ("resnet44", 658_586, None),
    ("resnet56", 853_018, 125.5),
    ("resnet110", 1_727_962, 252.9),
    ("resnet1202", 19_421_274, None),
    ("wrn28_10", 36_479_194, None),
    ("wrn16_8", 10_961_370, None),
    ("wrn40_4", 8_949_210, None),
    ("preact_resnet164", 1_703_258, None),
    ("preact_resnet1001", 10_327_706, None),
]


def init_shapes(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, *input_shape)), train=False))


DEEPEST = ("preact_resnet1001", "resnet1202")  # 30 s of tracing each: `make test-slow`
# The layers of resnet101/152 with the settings of resnet50_keras/resnet50v2_keras: 5 to 10 s each, `make test-slow`.
DEEP_KERAS = tuple(f"resnet{depth}{v2}_keras" for depth in (101, 152) for v2 in ("", "v2"))


@with_either_conv
@pytest.mark.parametrize(("name", "params", "gmacs"), IMAGENET_REFERENCE)
def test_imagenet_params_exact_and_macs_within_half_percent(name, params, gmacs, conv):
    cost = model_cost(create_model(name, conv=conv), IMAGENET)
    assert cost.params == params
    assert cost.macs / 1e9 == pytest.approx(gmacs, rel=5e-3)


@pytest.mark.parametrize(
    ("name", "params", "mmacs", "conv"),
    [  # the deepest two with the CPU conv in `make test-slow` only
        pytest.param(*case, conv, id=f"{case[0]}-{label}", marks=[pytest.mark.slow] if slow else [])
        for case in CIFAR_REFERENCE
        for label, conv in CONVS.items()
        for slow in [case[0] in DEEPEST and label == "cpu conv"]
    ],
)
def test_cifar_params_exact_and_macs_within_half_percent(name, params, mmacs, conv):
    model = create_model(name, conv=conv)
    if mmacs is None:
        assert count_params(init_shapes(model, CIFAR)) == params
        return
    cost = model_cost(model, CIFAR)
    assert cost.params == params
    assert cost.macs / 1e6 == pytest.approx(mmacs, rel=5e-3)


@with_either_conv
@pytest.mark.parametrize(("name", "millions"), [("resnext29_8x64d", 34.4), ("resnext29_16x64d", 68.1)])
def test_cifar_resnext_params_match_paper_to_its_precision(name, millions, conv):
    # Xie et al. (2017) print counts truncated to 0.1M (68,155,210 is reported as 68.1M).
    count = count_params(init_shapes(create_model(name, conv=conv), CIFAR))
    assert math.floor(count / 1e5) / 10 == millions


def test_v1_moves_stride_to_first_conv_with_same_params_fewer_macs():
    v15, v1 = (model_cost(create_model(n), IMAGENET) for n in ("resnet50", "resnet50_v1"))
    assert v1.params == v15.params
    assert v1.macs < v15.macs
    variables = init_shapes(create_model("resnet50_v1"), IMAGENET)
    assert variables["params"]["stage2"]["block0"]["branch"]["conv1"]["kernel"].shape == (1, 1, 256, 128)


@pytest.mark.parametrize(
    ("name", "input_shape"), [("resnet20", CIFAR), ("preact_resnet164", CIFAR), ("resnet50", IMAGENET)]
)
def test_either_conv_gives_the_same_variables_names_shapes_and_dtypes(name, input_shape):
    """Checkpoints and torchvision weights load whichever conv the model computes with."""
    plain, cpu = (init_shapes(create_model(name, conv=conv), input_shape) for conv in CONVS.values())
    chex.assert_trees_all_equal_structs(plain, cpu)
    chex.assert_trees_all_equal_shapes_and_dtypes(plain, cpu)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in DEEPEST + DEEP_KERAS else []) for n in list_models()]
)
def test_every_model_gives_logits_for_its_dataset_and_for_fashion_mnist(name):
    model = create_model(name)
    native = IMAGENET if model.stem == "imagenet" else CIFAR
    for input_shape, num_classes in [(native, model.num_classes), ((28, 28, 1), 7)]:
        model = create_model(name, num_classes=num_classes)
        variables = init_shapes(model, input_shape)
        logits, features = jax.eval_shape(
            lambda v, m=model, s=input_shape: m.apply(v, jnp.zeros((2, *s)), train=False), variables
        )
        assert logits.shape == (2, num_classes)
        assert logits.dtype == jnp.float32
        assert features["pre_logits"].shape[0] == 2


@with_either_conv
def test_imagenet_features_are_c2_to_c5_at_strides_4_to_32(conv):
    model = create_model("resnet50", conv=conv)
    variables = init_shapes(model, IMAGENET)
    _, features = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *IMAGENET)), train=False), variables)
    assert {k: v.shape for k, v in features.items()} == {
        "stem": (2, 56, 56, 64),
        "c2": (2, 56, 56, 256),
        "c3": (2, 28, 28, 512),
        "c4": (2, 14, 14, 1024),
        "c5": (2, 7, 7, 2048),
        "pre_logits": (2, 2048),
    }
    assert model.stage_strides == (4, 8, 16, 32)


@with_either_conv
def test_cifar_features_are_named_by_their_stride(conv):
    model = create_model("resnet20", conv=conv)
    variables = init_shapes(model, CIFAR)
    _, features = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *CIFAR)), train=False), variables)
    assert {k: v.shape for k, v in features.items()} == {
        "stem": (2, 32, 32, 16),
        "c0": (2, 32, 32, 16),
        "c1": (2, 16, 16, 32),
        "c2": (2, 8, 8, 64),
        "pre_logits": (2, 64),
    }


@pytest.fixture(scope="module")
def resnet20():
    model = create_model("resnet20")
    images = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
    return model, model.init(jax.random.key(0), images, train=False), images


def test_batch_stats_change_only_in_train_mode(resnet20):
    model, variables, images = resnet20
    (_, _), updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"])
    assert all(jax.tree.leaves(changed))
    _, state = model.apply(variables, images, train=False, mutable=["batch_stats"])
    chex.assert_trees_all_equal(variables["batch_stats"], state["batch_stats"])
    with pytest.raises(Exception, match="batch_stats"):  # train mode must be told where the statistics go
        model.apply(variables, images, train=True)


def test_eval_is_deterministic_and_per_example(resnet20):
    model, variables, images = resnet20
    full, _ = model.apply(variables, images, train=False)
    again, _ = model.apply(variables, images, train=False)
    single, _ = model.apply(variables, images[:1], train=False)
    np.testing.assert_array_equal(full, again)
    np.testing.assert_allclose(full[:1], single, rtol=1e-5, atol=1e-6)
    trained, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert not np.allclose(trained[0], full)  # train mode normalises with the batch's statistics


def test_bfloat16_compute_keeps_float32_params_and_close_logits(resnet20):
    model, variables, images = resnet20
    half = create_model("resnet20", dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(half.init(jax.random.key(0), images, train=False))} == {
        jnp.dtype("float32")
    }
    reference, _ = model.apply(variables, images, train=False)
    logits, features = half.apply(variables, images, train=False)
    assert features["c2"].dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference, atol=0.05 * float(jnp.abs(reference).max()))


def test_blocks_sow_input_branch_output_skip_and_output(resnet20):
    model, variables, images = resnet20
    _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    block = state["intermediates"]["stage1"]["block1"]  # identity shortcut
    (x,), (f,), (y,) = block["input"], block["branch_output"], block["output"]
    np.testing.assert_allclose(y, jax.nn.relu(x + f), rtol=1e-6)
    np.testing.assert_array_equal(block["skip"][0], x)
    down = state["intermediates"]["stage2"]["block0"]  # shortcut "A": subsample and zero-pad
    (x,), (f,), (s,), (y,) = down["input"], down["branch_output"], down["skip"], down["output"]
    padded = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (0, 16)))
    np.testing.assert_array_equal(s, padded)
    np.testing.assert_allclose(y, jax.nn.relu(padded + f), rtol=1e-6)


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet110", "resnet18"])
def test_zero_init_residual_makes_every_branch_start_at_zero(name):
    model = create_model(name, zero_init_residual=True)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images, train=False)
    _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    branches = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state) if "branch_output" in str(path[-2])]
    assert len(branches) == sum(model.stage_sizes)
    assert all(float(jnp.abs(f).max()) == 0.0 for f in branches)


def test_plain_nets_have_no_shortcuts_and_residual_nets_do():
    plain, residual = (init_shapes(create_model(n), CIFAR)["params"] for n in ("plain20", "resnet18"))
    assert not any("shortcut" in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(plain))
    assert "shortcut" in residual["stage2"]["block0"]
    model = create_model("plain20")
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images, train=False)
    _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    block = state["intermediates"]["stage1"]["block1"]
    np.testing.assert_allclose(block["output"][0], jax.nn.relu(block["branch_output"][0]))


def test_shortcut_c_projects_every_block_and_shortcut_a_none():
    count = {s: count_params(init_shapes(create_model("resnet20", shortcut=s), CIFAR)) for s in "ABC"}
    assert count["A"] == 269_722
    assert count["A"] < count["B"] < count["C"]
    params = init_shapes(create_model("resnet20", shortcut="C"), CIFAR)["params"]
    assert all("shortcut" in params[f"stage{i}"][f"block{j}"] for i in (1, 2, 3) for j in (0, 1, 2))


def test_he_fan_out_initialisation():
    variables = create_model("resnet20").init(jax.random.key(0), jnp.zeros((1, *CIFAR)), train=False)
    kernel = variables["params"]["stage3"]["block1"]["branch"]["conv1"]["kernel"]  # 3x3x64x64
    assert float(jnp.std(kernel)) == pytest.approx(math.sqrt(2.0 / (9 * 64)), rel=0.03)
    assert float(jnp.mean(kernel)) == pytest.approx(0.0, abs=3e-3)


def test_any_cifar_depth_by_name():
    assert create_model("resnet74").stage_sizes == (12, 12, 12)
    assert create_model("plain8").skip_connections is False
    assert create_model("wrn22_2").stage_widths == (32, 64, 128)
    assert create_model("preact_resnet56").block == "basic"
    assert create_model("preact_resnet218").block == "bottleneck"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: create_model("resnet51"), r"6n\+2.*got 51"),
        (lambda: create_model("resnet"), r"Unknown model 'resnet'.*Did you mean"),
        (lambda: create_model("alexnet"), r"Unknown model 'alexnet'.*resnet50"),
        (lambda: create_model("wrn30_10"), r"WRN depth must be 6n\+4.*got 30"),
        (lambda: create_model("preact_resnet1000"), r"6n\+2.*got 1000"),
        (lambda: create_model("resnet20", groups=3), r"groups=3 does not divide"),
        (lambda: create_model("resnet50", shortcut="D"), r"shortcut='D'.*'A'"),
        (lambda: create_model("resnet50", block="dense"), r"block='dense'.*basic"),
        (lambda: create_model("resnet50", widht=2), r"Unknown setting.*widht"),
        (lambda: create_model("resnet18", width_per_group=128), r"bottleneck blocks only"),
        (lambda: create_model("resnet20", num_classes=0), r"num_classes=0"),
    ],
)
def test_invalid_settings_fail_at_construction_with_the_valid_choices(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def count_convs_traced(fn) -> int:
    calls = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv):
            calls.append(context.module.name)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy), pytest.raises(ValueError) as error:
        fn()
    return len(calls), str(error.value)


def test_wrong_input_rank_fails_before_any_layer_is_traced():
    model = create_model("resnet20")
    traced, message = count_convs_traced(lambda: model.init(jax.random.key(0), jnp.zeros((2, 28, 28)), train=False))
    assert traced == 0
    assert "NHWC" in message and "images[..., None]" in message


def test_wrong_channel_count_fails_before_any_layer_is_traced(resnet20):
    model, variables, _ = resnet20
    traced, message = count_convs_traced(lambda: model.apply(variables, jnp.zeros((2, 28, 28, 3)), train=False))
    assert traced == 0
    assert "1-channel" in message and "got 3 channels" in message


class ModelUnderTransforms(chex.TestCase):
    """The model is one function of (variables, images) with either conv, under jit, without it and under pmap
    (the pmap variant runs on fake CPU devices: tests/test_scale.py)."""

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters(*((label.replace(" ", "_"), conv) for label, conv in CONVS.items()))
    def test_logits_and_batch_statistics_are_those_of_the_plain_model_under_jit(self, conv):
        images = jax.random.normal(jax.random.key(1), (4, 12, 12, 3))
        plain = create_model("resnet8")
        variables = plain.init(jax.random.key(0), images, train=False)
        expected = jax.jit(partial(eval_and_train_outputs, plain))(variables, images)
        outputs = self.variant(partial(eval_and_train_outputs, create_model("resnet8", conv=conv)))(variables, images)
        chex.assert_trees_all_close(outputs, expected, rtol=1e-5, atol=1e-5)


def eval_and_train_outputs(model: nn.Module, variables: dict, images: jax.Array) -> tuple:
    """Logits in inference mode; logits and the updated running statistics in training mode."""
    logits, _ = model.apply(variables, images, train=False)
    (train_logits, _), updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return logits, train_logits, updates["batch_stats"]
