"""Keras weights in: the ResNets of keras.applications, saved to real files, give Keras' own logits once converted
into the registry's ``*_keras`` models, with Keras' parameter counts; `resnet-jax convert --from-keras` writes a
run that `load_run` reads, and refuses a file of another model, a missing Keras and an existing output in one line.

Keras models are built with ``weights=None`` (no download) and then given random batch-norm statistics and conv
biases, so that every weight the conversion moves changes the logits. Logits are compared in eval mode on a batch of
2 at 64x64, by max|flax - keras| / max|keras| <= 1e-4.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import keras
import numpy as np
import pytest

from resnet_jax.cli import main
from resnet_jax.deploy.fold import fold_batch_norm
from resnet_jax.models import create_model, list_models
from resnet_jax.models.keras_weights import KERAS_MODELS, load_keras_weights, parameter_count
from resnet_jax.train.runs import load_run

REPO = Path(__file__).resolve().parent.parent
RTOL = 1e-4
SIZE = 64
# keras.applications' own count_params(): trainable weights and the batch norms' moving statistics.
KERAS_PARAMS = {"ResNet50": 25_636_712, "ResNet50V2": 25_613_800}


def random_keras_resnet(application: str) -> keras.Model:
    """``keras.applications.<application>`` at 64x64 with logits out, random BN statistics and conv biases."""
    model = getattr(keras.applications, application)(
        weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None
    )
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape),
                    rng.normal(0, 0.1, beta.shape),
                    rng.normal(0, 0.1, mean.shape),
                    rng.uniform(0.5, 1.5, var.shape),
                ]
            )
        elif isinstance(layer, keras.layers.Conv2D) and layer.use_bias:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
    return model


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def v2_file(tmp_path_factory) -> tuple[Path, keras.Model]:
    """A ResNet50V2 saved as a .keras file, and the model."""
    model = random_keras_resnet("ResNet50V2")
    path = tmp_path_factory.mktemp("keras") / "resnet50v2.keras"
    model.save(path)
    return path, model


def test_convert_from_keras_writes_a_run_with_resnet50s_logits_over_an_output_only_with_force(tmp_path, images, capsys):
    reference = random_keras_resnet("ResNet50")
    reference.save(tmp_path / "resnet50.h5")  # the whole model in Keras' HDF5 format
    out = tmp_path / "converted"
    out.mkdir()
    (out / "old.txt").write_text("an earlier output")
    args = ["convert", "--from-keras", str(tmp_path / "resnet50.h5"), "--model", "resnet50_keras", "--out", str(out)]
    args += ["--config", str(REPO / "configs" / "default.py")]
    assert main(args) == 2  # the output exists
    assert capsys.readouterr().err.splitlines() == [
        f"resnet-jax convert: error: --out {out} exists; choose a new folder, or add --force to replace it."
    ]
    assert main([*args, "--force"]) == 0
    assert "resnet50_keras with 1000 classes as step 0 of a run on imagenet2012" in capsys.readouterr().out
    assert not (out / "old.txt").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    model, state, config = load_run(out)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    assert config.model == "resnet50_keras"
    assert parameter_count(variables) == reference.count_params() == KERAS_PARAMS["ResNet50"]
    logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    assert relative_error(logits, np.asarray(reference(images, training=False))) <= RTOL


def test_resnet50v2_from_keras_and_from_its_weights_alone_gives_its_logits(v2_file, images, tmp_path):
    path, reference = v2_file
    model, variables = load_keras_weights(path, "resnet50v2_keras")
    assert parameter_count(variables) == reference.count_params() == KERAS_PARAMS["ResNet50V2"]
    expected = np.asarray(reference(images, training=False))
    logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    assert relative_error(logits, expected) <= RTOL

    # weights alone (save_weights) load into keras.applications' model of the name
    reference.save_weights(tmp_path / "resnet50v2.weights.h5")
    _, alone = load_keras_weights(tmp_path / "resnet50v2.weights.h5", "resnet50v2_keras")
    assert jax.tree.all(jax.tree.map(np.array_equal, alone, variables))


def test_a_file_of_another_model_is_refused_naming_the_one_it_holds(v2_file, tmp_path, capsys):
    out = tmp_path / "out"

    def convert(path: Path, name: str = "resnet50_keras") -> tuple[int, list[str]]:
        code = main(["convert", "--from-keras", str(path), "--model", name, "--out", str(out)])
        return code, capsys.readouterr().err.splitlines()

    code, (error,) = convert(v2_file[0])
    assert code == 2
    assert error.startswith(f"resnet-jax convert: error: {v2_file[0]} does not fit resnet50_keras: missing weights")
    assert error.endswith("It holds Keras' ResNet50V2: convert it with --model resnet50v2_keras.")

    other = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="conv"), keras.layers.Flatten()])
    other.save(tmp_path / "other.keras")
    code, (error,) = convert(tmp_path / "other.keras")
    assert code == 2
    assert error.endswith(
        "It is not one of Keras' ResNets (ResNet50, ResNet101, ResNet152, ResNet50V2, ResNet101V2, ResNet152V2)."
    )

    (tmp_path / "broken.h5").write_bytes(b"not an HDF5 file")
    code, (error,) = convert(tmp_path / "broken.h5")
    assert code == 65  # damaged data
    assert "broken.h5 does not read as a Keras model or its weights" in error
    code, (error,) = convert(v2_file[0], "resnet50")
    assert code == 2 and error.endswith("is not one of Keras' ResNets; use one of " + ", ".join(KERAS_MODELS) + ".")
    assert not out.exists()


def test_without_keras_convert_names_the_pip_install(v2_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "keras", None)  # as if not installed
    path, _ = v2_file
    args = ["convert", "--from-keras", str(path), "--model", "resnet50v2_keras", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "resnet-jax convert: error: keras is not installed, and Keras weight files (resnet-jax convert --from-keras) "
        "need it: pip install 'resnet-jax[keras]'"
    ]


def test_keras_v2_downsamples_at_the_end_of_stages_one_to_three():
    model = create_model("resnet50v2_keras")
    shapes = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32), train=False)
    )[0][1]
    assert {k: v.shape[1:3] for k, v in shapes.items() if k.startswith("c")} == {
        "c2": (28, 28),
        "c3": (14, 14),
        "c4": (7, 7),
        "c5": (7, 7),
    }
    assert model.stage_strides == (8, 16, 32, 32)
    assert sorted(KERAS_MODELS) == [name for name in list_models() if name.endswith("_keras")]


@pytest.mark.slow  # another ResNet-50 to compile
def test_batch_norm_folds_into_keras_biased_convs(v2_file, images):
    """The pre-activation V2 with biases on its unnormalised convs: its norms fold or stay as affine maps."""
    path, reference = v2_file
    folded, variables = fold_batch_norm(*load_keras_weights(path, "resnet50v2_keras"))
    logits, _ = jax.jit(lambda v, x: folded.apply(v, x, train=False))(variables, images)
    assert relative_error(logits, np.asarray(reference(images, training=False))) <= RTOL
