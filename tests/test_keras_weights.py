"""Keras weights in: the ResNets of keras.applications, saved to real files, give Keras' own logits once converted
into the registry's ``*_keras`` models, with Keras' parameter counts; `resnet-jax convert --from-keras` writes a
run that reads image files (and exports) as Keras' ``preprocess_input`` and model compute, and refuses a file of
another model, a missing Keras and an existing output in one line.

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
from PIL import Image

from resnet_jax import data
from resnet_jax.cli import main
from resnet_jax.deploy.export import export_checkpoint
from resnet_jax.deploy.fold import fold_batch_norm
from resnet_jax.deploy.formats import FLOAT_FORMATS
from resnet_jax.deploy.verify import run_in_fresh_process
from resnet_jax.inference import checkpoint_inference, input_channels, load_images
from resnet_jax.models import create_model, list_models
from resnet_jax.models.keras_weights import KERAS_MODELS, load_keras_weights, parameter_count
from resnet_jax.train.runs import load_run

REPO = Path(__file__).resolve().parent.parent
RTOL = 1e-4
SIZE = 64
# keras.applications' own count_params(): trainable weights and the batch norms' moving statistics.
KERAS_PARAMS = {"ResNet50": 25_636_712, "ResNet50V2": 25_613_800}


def random_keras_resnet(application: str, size: int = SIZE) -> keras.Model:
    """``keras.applications.<application>`` at ``size`` x ``size`` with logits out, random BN statistics and conv
    biases."""
    model = getattr(keras.applications, application)(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
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


def saved_keras_resnet(folder: Path, application: str, file_name: str) -> tuple[Path, keras.Model]:
    """A random ``keras.applications.<application>`` saved whole to ``folder / file_name``, and the model."""
    model = random_keras_resnet(application)
    model.save(folder / file_name)
    return folder / file_name, model


@pytest.fixture(scope="module")
def v2_file(tmp_path_factory) -> tuple[Path, keras.Model]:
    return saved_keras_resnet(tmp_path_factory.mktemp("keras"), "ResNet50V2", "resnet50v2.keras")


@pytest.fixture(scope="module")
def v1_file(tmp_path_factory) -> tuple[Path, keras.Model]:
    return saved_keras_resnet(tmp_path_factory.mktemp("keras"), "ResNet50", "resnet50.h5")  # Keras' HDF5 format


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[list[Path], np.ndarray]:
    """Two RGB PNG files of SIZE x SIZE random pixels, and their pixels (0..255, float32)."""
    folder = tmp_path_factory.mktemp("photos")
    pixels = np.random.default_rng(2).integers(0, 256, size=(2, SIZE, SIZE, 3), dtype=np.uint8)
    paths = [folder / f"photo{i}.png" for i in range(len(pixels))]
    for path, image in zip(paths, pixels, strict=True):
        Image.fromarray(image).save(path)
    return paths, pixels.astype(np.float32)


def run_logits_of_files(run: Path, paths: list[Path]) -> np.ndarray:
    """The logits `resnet-jax predict` computes for image files under ``run`` (no resize at SIZE x SIZE)."""
    inference, config = checkpoint_inference(run, batch_size=len(paths))
    images = load_images(paths, config, input_channels(inference), size=SIZE, resize=SIZE)
    return inference.run(images, ["logits"])["logits"]


def test_convert_from_keras_writes_a_run_with_resnet50s_logits_over_an_output_only_with_force(
    v1_file, photos, tmp_path, capsys
):
    path, reference = v1_file
    out = tmp_path / "converted"
    out.mkdir()
    (out / "old.txt").write_text("an earlier output")
    args = ["convert", "--from-keras", str(path), "--model", "resnet50_keras", "--out", str(out)]
    args += ["--config", str(REPO / "configs" / "default.py")]
    assert main(args) == 2  # the output exists
    assert capsys.readouterr().err.splitlines() == [
        f"resnet-jax convert: error: --out {out} exists; choose a new folder, or add --force to replace it."
    ]
    assert main([*args, "--force"]) == 0
    assert "resnet50_keras with 1000 classes as step 0 of a run on imagenet2012" in capsys.readouterr().out
    assert not (out / "old.txt").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    _, state, config = load_run(out)
    assert config.model == "resnet50_keras"
    assert parameter_count({"params": state.params, "batch_stats": state.batch_stats}) == reference.count_params()
    assert reference.count_params() == KERAS_PARAMS["ResNet50"]
    # image files through predict's preprocessing give what Keras gives after its own ("caffe": BGR, mean pixel)
    paths, pixels = photos
    expected = np.asarray(reference(keras.applications.resnet.preprocess_input(pixels.copy()), training=False))
    assert relative_error(run_logits_of_files(out, paths), expected) <= RTOL


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


@pytest.mark.slow  # another ResNet-50 to compile; the v1 test above covers the mechanism
def test_a_converted_v2_run_reads_image_files_as_keras_preprocess_input_does(v2_file, photos, tmp_path):
    path, reference = v2_file
    out = tmp_path / "run"
    assert main(["convert", "--from-keras", str(path), "--model", "resnet50v2_keras", "--out", str(out)]) == 0
    _, _, config = load_run(out)
    assert (tuple(config.input_mean), tuple(config.input_std)) == ((0.5,) * 3, (0.5,) * 3)  # Keras' "tf" mode
    paths, pixels = photos
    expected = np.asarray(reference(keras.applications.resnet_v2.preprocess_input(pixels.copy()), training=False))
    assert relative_error(run_logits_of_files(out, paths), expected) <= RTOL


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


@pytest.mark.slow  # a ResNet-50 through every converter
def test_a_converted_keras_run_exports_to_every_format_computing_keras_preprocessing_and_model(tmp_path):
    """Artifacts that take uint8 images compute Keras' ``model(preprocess_input(images))`` in their own runtimes:
    the reversed first conv, the recorded normalisation and the folded biased convs all travel."""
    reference = random_keras_resnet("ResNet50", size=32)  # the synthetic data set's images are 32x32
    reference.save(tmp_path / "resnet50.h5")
    run = tmp_path / "run"
    settings = ["--config.dataset=synthetic", "--config.eval_split=test[:8]"]
    args = ["convert", "--from-keras", str(tmp_path / "resnet50.h5"), "--model", "resnet50_keras", "--out", str(run)]
    assert main([*args, *settings]) == 0
    images = data.load_source("synthetic", "test[:8]").images
    expected = np.asarray(reference(keras.applications.resnet.preprocess_input(images.astype(np.float32))))
    for fmt, name in [
        ("stablehlo", "m.stablehlo"),
        ("savedmodel", "m_saved"),
        ("tflite", "m.tflite"),
        ("tflite_int8", "m_int8.tflite"),
        ("onnx", "m.onnx"),
    ]:
        meta = export_checkpoint(run, fmt, tmp_path / name, raw_input=True, num_check_images=8)
        assert meta["input"]["normalisation"]["mean"] == pytest.approx([123.68 / 255, 116.779 / 255, 103.939 / 255])
        (logits,) = run_in_fresh_process(fmt, tmp_path / name, images)
        if fmt in FLOAT_FORMATS:
            assert relative_error(logits, expected) <= RTOL, fmt
        else:  # int8: the same classes on most images
            assert np.mean(logits.argmax(-1) == expected.argmax(-1)) >= 0.75, meta["agreement_with_jax"]
