"""Export: every format round-trips (written, reloaded in its own runtime in a fresh process, the same logits as
JAX), and `resnet-jax export` on a run's checkpoint writes the artifact and the JSON that describes it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from idx_files import make_idx_folder, write_idx
from test_compress_quantize import save_run
from test_deploy_fold import trained_variables

from resnet_jax import create_model
from resnet_jax.cli import main
from resnet_jax.compress.lowrank import lowrank_run
from resnet_jax.compress.quantize import quantization_settings, quantize_run
from resnet_jax.deploy.bench import InferenceRow, markdown_table
from resnet_jax.deploy.export import (
    CheckImages,
    artifact_size,
    check_destination,
    export_servable,
    external_data,
    remove_artifact,
)
from resnet_jax.deploy.formats import FORMATS, ExportError, write_artifact
from resnet_jax.deploy.servable import Servable, fold_for_serving
from resnet_jax.deploy.verify import agreement, check_agreement, run_in_fresh_process
from resnet_jax.train.config import load_config
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.runs import load_run

REPO = Path(__file__).resolve().parents[1]


def servable(name: str, image_shape: tuple[int, int, int], **overrides) -> Servable:
    model = create_model(name, num_classes=10, **overrides)
    images = np.zeros((1, *image_shape), np.float32)
    return Servable(
        model=model,
        variables=trained_variables(model, images),
        name=name,
        input_shape=image_shape,
        mean=(0.5,) * image_shape[2],
        std=(0.25,) * image_shape[2],
        class_names=tuple(f"class {i}" for i in range(10)),
    )


def check_images(shape: tuple[int, int, int], count: int = 6) -> CheckImages:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(count, *shape)).astype(np.float32)
    return CheckImages(images=images, labels=None, representative=images)


@pytest.mark.parametrize("fmt", FORMATS)
def test_resnet20_round_trips_in_every_format(fmt: str, tmp_path: Path) -> None:
    folded = fold_for_serving(servable("resnet20", (32, 32, 3)))
    check = check_images((32, 32, 3))
    out = tmp_path / f"resnet20.{fmt}"

    meta = export_servable(folded, fmt, out, check)

    written = json.loads((tmp_path / f"resnet20.{fmt}.json").read_text())
    assert written == meta
    assert meta["format"] == fmt and meta["model"] == "resnet20" and meta["batch_norm"] == "folded into the convs"
    assert meta["input"]["shape"] == [None, 32, 32, 3] and meta["class_names"][3] == "class 3"
    assert meta["size_bytes"] > 100_000  # resnet20's 270k parameters, in int8 or float32
    measured = meta["agreement_with_jax"]
    assert measured["images"] == 6
    if fmt != "tflite_int8":
        assert measured["max_relative_error"] < 1e-4 and measured["top1_agreement"] == 1.0
    if fmt != "stablehlo":
        return
    # any batch size in a fresh process: more than were checked (export checked them and one image alone)
    images = np.repeat(check.images, 2, axis=0)
    expected = np.asarray(jax.jit(folded.function())(images))
    (logits,) = run_in_fresh_process(fmt, out, images)
    assert logits.shape == (len(images), 10)
    np.testing.assert_allclose(logits, expected, atol=1e-4 * np.abs(expected).max())


# The formats whose runtime reloads the 224x224 model slowly run with the slow tests (stablehlo: over a minute on
# 2 cores, onnx: 45 s); tflite keeps the ImageNet stem in the default run.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("fmt", [pytest.param("stablehlo", marks=SLOW), pytest.param("onnx", marks=SLOW), "tflite"])
def test_imagenet_stem_bottleneck_path_round_trips(fmt: str, tmp_path: Path) -> None:
    """resnet18's stem (7x7/2 conv, max-pool) and a bottleneck resnet50 cut to one block a stage, at 32x32."""
    for name, overrides in (("resnet18", {}), ("resnet50", {"stage_sizes": (1, 1, 1, 1)})):
        meta = export_servable(
            fold_for_serving(servable(name, (32, 32, 3), **overrides)), fmt, tmp_path / name, check_images((32, 32, 3))
        )
        assert meta["agreement_with_jax"]["top1_agreement"] == 1.0


def test_existing_output_and_unknown_formats_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "taken.onnx"
    out.write_text("")
    folded = fold_for_serving(servable("resnet20", (32, 32, 3), stage_sizes=(1, 1, 1)))
    with pytest.raises(ValueError, match="add --force"):
        export_servable(folded, "onnx", out, check_images((32, 32, 3)))
    with pytest.raises(ValueError, match="choose one of stablehlo"):
        export_servable(folded, "torchscript", tmp_path / "model.pt", check_images((32, 32, 3)))


def test_the_check_rejects_logits_that_drift_or_flip_a_class() -> None:
    expected = np.array([[1.0, 2.0, 0.0], [3.0, 0.5, 0.0]], np.float32)
    check_agreement("onnx", agreement(expected + 1e-5, expected))
    with pytest.raises(ExportError, match=r"max relative error 1\.00e-03"):
        check_agreement("onnx", agreement(expected + 3e-3, expected))
    flipped = expected[:, [1, 0, 2]]
    with pytest.raises(ExportError, match=r"top-1 agreement 0\.0000"):
        check_agreement("tflite", agreement(flipped, expected))
    labels = np.array([1, 0])
    check_agreement("tflite_int8", agreement(expected * 1.1, expected, labels))  # int8: the accuracy counts
    with pytest.raises(ExportError, match=r"costs 100\.00% top-1 accuracy"):
        check_agreement("tflite_int8", agreement(flipped, expected, labels))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run of resnet8 on a small IDX data set, four steps long."""
    folder = tmp_path_factory.mktemp("export-run")
    make_idx_folder(folder / "idx", compressed=False, num_train=32, num_test=12)
    config = load_config(REPO / "configs" / "default.py")
    config.update(model="resnet8", data_dir=str(folder / "idx"), batch_size=8, eval_batch_size=4, num_train_steps=4)
    train_and_evaluate(config, folder / "run")
    return folder / "run"


def test_export_command_writes_a_checked_artifact_that_takes_raw_images(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model.onnx"
    args = ["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(out), "--include-preprocessing"]
    assert main(args) == 0
    assert "top-1 agreement 1.0000" in capsys.readouterr().out
    meta = json.loads((tmp_path / "model.onnx.json").read_text())
    assert meta["input"]["dtype"] == "uint8" and meta["input"]["shape"] == [None, 28, 28, 1]
    assert meta["agreement_with_jax"]["images"] == 12 and "accuracy" in meta["agreement_with_jax"]
    assert meta["class_names"][0] == "T-shirt/top" and meta["onnx_opset"] == 21

    raw = np.random.default_rng(1).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    assert run_in_fresh_process("onnx", out, raw)[0].shape == (3, 10)
    assert main(args) == 2
    assert "add --force" in capsys.readouterr().err


def test_a_diverged_checkpoint_is_refused_before_anything_is_written(run: Path, tmp_path: Path, capsys) -> None:
    _, state, config = load_run(run)
    diverged = tmp_path / "diverged"
    save_run(diverged, config, state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params)))
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(diverged), "--format", "onnx", "--out", str(out)]) != 0
    assert "its run diverged): export an earlier --step" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "model.onnx.json").exists()


MISSING = [("onnx", "onnxruntime"), ("tflite", "ai_edge_litert"), ("savedmodel", "tensorflow")]


@pytest.mark.parametrize(("fmt", "module"), MISSING)
def test_a_format_whose_extra_is_missing_names_the_pip_install(fmt, module, run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    assert main(["export", "--checkpoint", str(run), "--format", fmt, "--out", str(tmp_path / "model")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"resnet-jax export: error: {module} is not installed")
    assert error.endswith("need it: pip install 'resnet-jax[export]'\n")
    assert not (tmp_path / "model").exists()


def test_the_inference_table_gives_each_engine_its_speed_relative_to_jax() -> None:
    rows = [
        InferenceRow("resnet20", 32, 1, "jax", 2.0, 500.0, None),
        InferenceRow("resnet20", 32, 1, "onnxruntime", 1.0, 1000.0, 1_000_000),
        InferenceRow("resnet20", 32, 32, "jax", 32.0, 1000.0, None),
        InferenceRow("resnet20", 32, 32, "onnxruntime", 16.0, 2000.0, 1_000_000),
    ]
    assert markdown_table(rows).splitlines()[2:] == [
        "| resnet20 32x32 | 1 | 2.00 ms (1.00x) | 1.00 ms (2.00x) |",
        "| resnet20 32x32 | 32 | 1000 img/s (1.00x) | 2000 img/s (2.00x) |",
    ]


@pytest.mark.slow
def test_bench_inference_times_every_engine(tmp_path: Path, capsys) -> None:
    assert (
        main(["bench", "--inference", "--model", "resnet8", "--batch", "2", "--repeats", "1", "--out", str(tmp_path)])
        == 0
    )
    (results,) = tmp_path.glob("*-inference.json")
    engines = {row["engine"] for row in json.loads(results.read_text())["rows"]}
    assert engines == {"jax", "jax_folded", "onnxruntime", "tflite", "tflite_int8", "torch_eager"}


def learnable_idx_folder(folder: Path, num_train: int = 640, num_test: int = 256) -> Path:
    """IDX files in Fashion-MNIST's layout (28x28 grey, 10 classes) that a small net learns in a few hundred steps:
    each class is a bright 8x5 patch at a place of its own over uniform noise. (Fashion-MNIST itself cannot be
    downloaded here.)"""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        labels = rng.permutation(np.arange(count) % 10)
        images = rng.integers(0, 64, (count, 28, 28))
        for image, label in zip(images, labels, strict=True):
            row, column = divmod(int(label), 5)
            image[3 + 12 * row : 11 + 12 * row, 1 + 5 * column : 6 + 5 * column] += 190
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images.clip(0, 255).astype(np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return folder


@pytest.mark.slow  # about 65 s: 400 training steps, then two int8 conversions
def test_int8_tflite_of_a_trained_model_keeps_its_accuracy(tmp_path: Path, capsys) -> None:
    """The int8 model's accuracy loss, pinned: within 1 point of the float model's on 256 test images, and the same
    top-1 class on 98% of them, for a resnet8 trained to high accuracy (the export refuses a loss over 2 points);
    the same for the run quantized by ``resnet-jax quantize``, against its own int8 JAX model."""
    config = load_config(REPO / "configs" / "default.py")
    config.update(
        model="resnet8",
        data_dir=str(learnable_idx_folder(tmp_path / "idx")),
        batch_size=32,
        eval_batch_size=128,
        num_train_steps=400,
        eval_every_steps=400,
        checkpoint_every_steps=400,
    )
    train_and_evaluate(config, tmp_path / "run")
    out = tmp_path / "model.tflite"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "tflite_int8", "--out", str(out)]) == 0
    measured = json.loads((tmp_path / "model.tflite.json").read_text())["agreement_with_jax"]
    assert measured["images"] == 256 and measured["jax_accuracy"] >= 0.95  # trained: the pin below means something
    assert measured["jax_accuracy"] - measured["accuracy"] <= 0.01
    assert measured["top1_agreement"] >= 0.98
    assert measured["max_relative_error"] <= 0.05

    # The run quantized, then exported: checked against the quantized JAX model, whose accuracy it keeps too.
    assert main(["quantize", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "int8")]) == 0
    out = tmp_path / "quantized.tflite"
    assert main(["export", "--checkpoint", str(tmp_path / "int8"), "--format", "tflite_int8", "--out", str(out)]) == 0
    measured = json.loads((tmp_path / "quantized.tflite.json").read_text())["agreement_with_jax"]
    # Measured: the quantized JAX model 0.977, its int8 TFLite 0.996 (the converter's own activation ranges lose
    # less than the run's percentile-clipped ones), the same top-1 class on 251 of 256 images.
    assert measured["images"] == 256 and measured["jax_accuracy"] >= 0.95
    assert measured["jax_accuracy"] - measured["accuracy"] <= 0.01
    assert measured["top1_agreement"] >= 0.97


def test_int8_tflite_runs_an_imagenet_stem_and_refuses_a_pre_activation_one(tmp_path: Path) -> None:
    """The stem's max-pool padding: zeros after the ReLU (the same maximum), which the int8 runtime runs; a
    pre-activation stem needs -inf, which it cannot, and the export says so before converting."""
    folded = fold_for_serving(servable("resnet18", (32, 32, 3), stage_sizes=(1, 1, 1, 1)))
    images = check_images((32, 32, 3), count=8).images
    write_artifact(folded, "tflite_int8", tmp_path / "resnet18.tflite", images)
    (logits,) = run_in_fresh_process("tflite_int8", tmp_path / "resnet18.tflite", images)
    expected = np.asarray(jax.jit(folded.function())(images))
    assert logits.shape == (8, 10) and agreement(logits, expected)["max_relative_error"] < 0.2

    preact = fold_for_serving(servable("preact_resnet18", (32, 32, 3), stage_sizes=(1, 1, 1, 1)))
    with pytest.raises(ExportError, match=r"int8 TFLite cannot represent the stem's max-pool padding of -inf"):
        write_artifact(preact, "tflite_int8", tmp_path / "preact.tflite", images)


def test_an_onnx_artifact_counts_and_replaces_its_external_weights(tmp_path: Path) -> None:
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"g" * 10)
    assert artifact_size(graph) == 10
    external_data(graph).write_bytes(b"w" * 90)  # where jax2onnx puts the weights of a large model
    assert artifact_size(graph) == 100
    with pytest.raises(ValueError, match="add --force"):
        check_destination("onnx", graph, force=False)
    remove_artifact(graph)
    assert not graph.exists() and not external_data(graph).exists()


def with_negative_norm_scales(params: dict) -> dict:
    """``params`` with every third channel of every batch norm's scale negated (training can leave them so)."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    for path, value in flat.items():
        if path[-2].startswith("bn") and path[-1] == "scale":
            flat[path] = np.where(np.arange(len(value)) % 3 == 0, -value, value).astype(value.dtype)
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def quantized_run(run, tmp_path_factory) -> Path:
    """`run` with some negative batch norm scales, int8-quantized (percentile calibration on its 32 images)."""
    folder = tmp_path_factory.mktemp("quantized")
    _, state, config = load_run(run)
    save_run(folder / "float", config, state.replace(params=with_negative_norm_scales(state.params)))
    quantize_run(folder / "float", folder / "int8", quantization_settings(calibration_images=32))
    return folder / "int8"


def tflite_int8_kernels(path: Path) -> list[np.ndarray]:
    """The per-channel int8 weights of a .tflite file's convs, as its CONV_2D (out, h, w, in) and DEPTHWISE_CONV_2D
    (1, h, w, out) ops hold them, read through the LiteRT interpreter (activations have one scale per tensor)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    details = interpreter.get_tensor_details()
    kernels = [
        d
        for d in details
        if d["dtype"] == np.int8 and len(d["shape"]) == 4 and len(d["quantization_parameters"]["scales"]) > 1
    ]
    return [np.array(interpreter.get_tensor(d["index"])) for d in kernels]


def expected_tflite_kernels(params: dict, signed: bool = True) -> list[np.ndarray]:
    """A quantized run's int8 kernels in TFLite's layouts, each output channel negated (``signed``) where the batch
    norm after the conv has a negative scale (folding made that channel's weights negative multiples of the same
    integers)."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    expected = []
    for path, kernel in flat.items():
        if path[-1] != "kernel" or kernel.dtype != np.int8:
            continue
        sign = np.sign(flat[(*path[:-2], "bn" + path[-2].removeprefix("conv"), "scale")]).astype(np.int8)
        kernel = kernel * sign if signed else kernel
        # A one-channel input's conv becomes a depthwise conv: (1, h, w, out).
        expected.append(kernel.transpose(2, 0, 1, 3) if kernel.shape[2] == 1 else kernel.transpose(3, 0, 1, 2))
    return expected


def quantized_logits(workdir: Path, images: np.ndarray) -> np.ndarray:
    """The quantized run's own JAX logits (its int8 convs)."""
    model, state, _ = load_run(workdir)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return np.asarray(jax.jit(lambda x: model.apply(variables, x, train=False)[0])(images))


def test_a_quantized_run_goes_to_int8_tflite_with_its_own_integers(quantized_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8.tflite"
    assert main(["export", "--checkpoint", str(quantized_run), "--format", "tflite_int8", "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "int8.tflite.json").read_text())
    assert meta["batch_norm"] == "folded into the dequantized convs, then quantized by the converter"
    run = meta["quantized_run"]
    assert run["calibration"] == "percentile" and run["calibration_images"] == 32
    assert run["quantized_from"] == str((quantized_run.parent / "float").resolve())
    assert "recalibrated by the TFLite converter on 32 training images" in run["int8"]

    _, state, _ = load_run(quantized_run)
    expected = expected_tflite_kernels(state.params)
    written = tflite_int8_kernels(out)
    assert len(expected) == 7 and len(written) == 7  # resnet8: the stem and two convs in each of 3 blocks
    assert sorted(k.tobytes() for k in written) == sorted(k.tobytes() for k in expected)
    unsigned = expected_tflite_kernels(state.params, signed=False)  # the fixture negated some norm scales
    assert sorted(k.tobytes() for k in written) != sorted(k.tobytes() for k in unsigned)

    # Images like the run's own (uniform noise, normalised as Fashion-MNIST is), none of them calibrated on.
    pixels = np.random.default_rng(2).integers(0, 256, (64, 28, 28, 1)) / 255
    normalisation = meta["input"]["normalisation"]
    images = ((pixels - normalisation["mean"]) / normalisation["std"]).astype(np.float32)
    (logits,) = run_in_fresh_process("tflite_int8", out, images)
    measured = agreement(logits, quantized_logits(quantized_run, images))
    # Measured: the same top-1 class on 64 of 64, max relative error 0.019 (TFLite 2.21, ai-edge-litert 2.3).
    assert measured["top1_agreement"] >= 62 / 64 and measured["max_relative_error"] <= 0.05, measured


def test_a_quantized_run_goes_to_stablehlo_as_its_int8_program(quantized_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8.stablehlo"
    assert main(["export", "--checkpoint", str(quantized_run), "--format", "stablehlo", "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "int8.stablehlo.json").read_text())
    assert meta["batch_norm"].startswith("unfolded") and meta["agreement_with_jax"]["max_relative_error"] == 0.0
    program = jax.export.deserialize(bytearray(out.read_bytes())).mlir_module()
    assert "xi8>" in program and "stablehlo.convolution" in program

    images = np.random.default_rng(3).normal(size=(9, 28, 28, 1)).astype(np.float32)
    (logits,) = run_in_fresh_process("stablehlo", out, images)  # a fresh process, a batch size not checked
    np.testing.assert_array_equal(logits, quantized_logits(quantized_run, images))


def test_a_quantized_run_refuses_float_formats_in_one_line(quantized_run: Path, tmp_path: Path, capsys) -> None:
    float_run = (quantized_run.parent / "float").resolve()
    for fmt in ("onnx", "tflite"):
        out = tmp_path / f"model.{fmt}"
        assert main(["export", "--checkpoint", str(quantized_run), "--format", fmt, "--out", str(out)]) == 2
        assert capsys.readouterr().err == (
            f"resnet-jax export: error: {quantized_run} is an int8-quantized run, which exports to stablehlo, "
            f"savedmodel, tflite_int8 only ({fmt} cannot run its int8 convs exactly); for {fmt}, export the float "
            f"run it came from ({float_run}).\n"
        )
        assert not out.exists()

    # The quantization-aware fine-tuning folder inside a quantized run: float kernels rounded in the forward pass.
    _, state, config = load_run(quantized_run.parent / "float")
    config.quantize = ml_collections.ConfigDict({"arithmetic": "fake", "input_scales": ()})
    save_run(tmp_path / "qat", config, state)
    qat = ["export", "--checkpoint", str(tmp_path / "qat"), "--format", "tflite_int8", "--out", str(tmp_path / "q")]
    assert main(qat) == 2
    assert "fine-tuning inside a quantized run" in capsys.readouterr().err


def test_a_low_rank_run_exports_its_factorised_convs(run: Path, tmp_path: Path) -> None:
    lowrank_run(run, tmp_path / "lowrank", energy=0.5, fine_tune_steps=0)
    out = tmp_path / "lowrank.stablehlo"
    assert main(["export", "--checkpoint", str(tmp_path / "lowrank"), "--format", "stablehlo", "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "lowrank.stablehlo.json").read_text())
    assert meta["batch_norm"] == "folded into the convs" and meta["agreement_with_jax"]["top1_agreement"] == 1.0
    program = jax.export.deserialize(bytearray(out.read_bytes())).mlir_module()
    config = load_run(tmp_path / "lowrank")[2]
    assert config.lowrank.ranks and program.count("stablehlo.convolution") == 7 + len(config.lowrank.ranks)
