"""The benchmark harness runs both frameworks, reduces timings as documented and writes its results.

No test here asserts a speed: timings on shared cores say nothing about the code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from idx_files import idx_folder_fixture

from resnet_jax import create_model, data
from resnet_jax.bench import torch_models
from resnet_jax.bench.cases import Case
from resnet_jax.bench.cli import chosen_cases, invoked_command
from resnet_jax.bench.epochs import JaxEpoch, TorchEpoch
from resnet_jax.bench.harness import Settings, StepRow, ratio, time_runners
from resnet_jax.bench.jax_side import JaxStep
from resnet_jax.bench.report import write_results
from resnet_jax.bench.torch_side import TorchStep
from resnet_jax.cli import build_parser, main
from resnet_jax.data import ArraySource, normalize

TINY = ["--model", "resnet8", "--image-size", "16", "--batch", "4", "--steps", "2", "--warmup", "1"]
idx_dir = idx_folder_fixture(num_train=40, num_test=10)


@pytest.mark.slow  # over 30 s on 2 cores
def test_bench_vs_torch_prints_ratios_and_writes_results(tmp_path, capsys):
    assert main(["bench", *TINY, "--repeats", "2", "--vs-torch", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    ratio_lines = [line for line in out.splitlines() if "ratio=" in line]
    assert len(ratio_lines) == 2  # jit, and (on a CPU, by default) the batch in 2 parts on host threads
    stages = [line.removeprefix("resnet8 16x16 batch 4 fp32: ") for line in out.splitlines() if ": compiling " in line]
    assert stages == ["compiling jax jit", "compiling jax batch_parts (2)", "compiling torch eager"]
    assert out.index("timing 2 round(s) of 2 steps of each") < out.index(ratio_lines[0])  # said before the results
    for line, variant in zip(ratio_lines, ("jit", r"batch_parts \(2\)"), strict=True):
        pattern = rf"resnet8 16x16 batch 4 fp32: jax {variant} .* img/s, torch eager .* img/s \(.*\), ratio=\d+\.\d\d"
        assert re.fullmatch(pattern, line)
    (path,) = tmp_path.glob("*.json")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-cpu-\d+cores\.json", path.name)
    record = json.loads(path.read_text())
    assert record["command"].split()[0] == Path(sys.argv[0]).name
    assert record["device"]["platform"] == "cpu"
    assert record["versions"]["jax"] == jax.__version__
    assert record["versions"]["torch"]
    assert record["settings"] == {"steps": 2, "warmup": 1, "repeats": 2}
    assert set(record["environment"]) >= {"XLA_FLAGS", "OMP_NUM_THREADS"}
    jax_row, parts_row, torch_row = record["train"]
    assert (jax_row["framework"], torch_row["framework"], torch_row["variant"]) == ("jax", "torch", "eager")
    assert (parts_row["framework"], parts_row["variant"]) == ("jax", "batch_parts (2)")
    for row in record["train"]:
        assert (row["model"], row["image_size"], row["batch"], row["precision"]) == ("resnet8", 16, 4, "fp32")
        assert len(row["step_seconds"]) == 2 and all(len(repeat) == 2 for repeat in row["step_seconds"])
        assert row["img_per_s"] == pytest.approx(4 / np.median(row["step_seconds"]))
        assert row["compile_seconds"] > 0 and row["peak_memory_bytes"] > 0 and row["memory_source"]
    for row, line in zip((jax_row, parts_row), ratio_lines, strict=True):
        expected = np.median(np.divide(row["img_per_s_per_repeat"], torch_row["img_per_s_per_repeat"]))
        assert torch_row["jax_over_torch"][row["variant"]] == pytest.approx(expected)
        assert f"ratio={expected:.2f}" in line
    (relative_line,) = [line for line in out.splitlines() if "relative=" in line]
    relative = np.median(np.divide(parts_row["img_per_s_per_repeat"], jax_row["img_per_s_per_repeat"]))
    assert "relative_to_jax" not in jax_row and parts_row["relative_to_jax"] == {"jit": pytest.approx(relative)}
    pattern = r"resnet8 16x16 batch 4 fp32: jax batch_parts \(2\) [\d,]+ img/s against jax jit [\d,]+ img/s, relative="
    assert re.fullmatch(pattern + f"{relative:.2f}", relative_line)
    inputs = {row["name"]: row for row in record["input"]}
    no_fashion_mnist = any(line.startswith("input Fashion-MNIST: no data") for line in record["skipped"])
    assert set(inputs) == {"CIFAR-shaped 32x32x3 (synthetic)", "CIFAR-shaped 32x32x3 (synthetic), device-resident"} | (
        set() if no_fashion_mnist else {"Fashion-MNIST 28x28x1"}
    )
    assert all(row["img_per_s"] > 0 for row in inputs.values())
    assert any(line.startswith("skipped time to 94%") for line in record["skipped"])
    assert any(line.startswith("skipped whole epochs of resnet8") for line in record["skipped"])
    assert record["epochs"] == []


@pytest.mark.slow  # over 20 s on 2 cores
def test_bench_without_torch_prints_jax_rows_only(tmp_path, capsys):
    assert main(["bench", *TINY, "--batch-parts", "4", "--no-input", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ratio=" not in out
    for variant in ("jit", r"batch_parts \(4\)"):
        line = rf"^resnet8 16x16 batch 4 fp32: jax {variant} [\d,]+ img/s \(compile [\d.]+s, peak [\d,]+ MiB\)$"
        assert re.search(line, out, re.M)
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [row["variant"] for row in record["train"]] == ["jit", "batch_parts (4)"] and record["input"] == []
    assert record["train"][1]["memory_source"] == "XLA buffers of the parts' programs and the update"
    assert main(["bench", *TINY, "--batch-parts", "0", "--no-input", "--out", str(tmp_path / "none")]) == 0
    record = json.loads(next((tmp_path / "none").glob("*.json")).read_text())
    assert [row["variant"] for row in record["train"]] == ["jit"]


@pytest.mark.slow  # two extra compilations of the step; the default suite stays under 15 minutes
def test_bench_xla_options_rows_compile_the_same_step_with_those_options(tmp_path, capsys):
    dump = tmp_path / "dump"
    options = f"xla_dump_to={dump},xla_cpu_multi_thread_eigen=false"
    arguments = [*TINY, "--batch-parts", "0", "--no-input", "--out", str(tmp_path)]
    assert main(["bench", *arguments, "--xla-options", options, "--xla-options", "xla_gpu_autotune_level=0"]) == 0
    out = capsys.readouterr().out
    variants = ["jit", f"jit, {options}", "jit, xla_gpu_autotune_level=0"]
    assert [line.partition(": compiling jax ")[2] for line in out.splitlines() if ": compiling " in line] == variants
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [row["variant"] for row in record["train"]] == variants
    for row, line in zip(record["train"][1:], [line for line in out.splitlines() if "relative=" in line], strict=True):
        relative = np.median(np.divide(row["img_per_s_per_repeat"], record["train"][0]["img_per_s_per_repeat"]))
        assert row["relative_to_jax"] == {"jit": pytest.approx(relative)} and line.endswith(f"relative={relative:.2f}")
    # Only the row given xla_dump_to dumped its train step, and XLA compiled it with the row's other option too.
    (train_step_options,) = dump.glob("*jit_train_step*debug_options")
    assert "xla_cpu_multi_thread_eigen: false" in train_step_options.read_text()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--batch-parts", "3"], "batch 4 does not split into 3 parts"),
        (["--batch-parts", "-1"], "--batch-parts -1: give the number of batch parts"),
        (["--config", "configs/default.py", "--batch-parts", "2"], "--batch-parts describe a suite row"),
    ],
)
def test_bench_batch_parts_refuse_what_they_cannot_run_before_timing(tmp_path, capsys, arguments, message):
    assert main(["bench", *TINY, *arguments, "--no-input", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_bench_out_is_a_folder_and_a_file_name_is_refused_before_timing(tmp_path, capsys):
    assert main(["bench", *TINY, "--no-input", "--out", str(tmp_path / "results.json")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"resnet-jax bench: error: --out {tmp_path / 'results.json'} names a file; give the folder the results JSON "
        f"goes in, e.g. --out {tmp_path}"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPU cores, one per process")
@pytest.mark.slow  # run with the slow tests to keep the default run under 15 minutes
def test_bench_cpu_processes_row_runs_the_pinned_pmap_job_beside_the_others(tmp_path, capsys):
    arguments = [*TINY, "--repeats", "2", "--vs-torch", "--cpu-processes", "2", "--batch-parts", "0", "--no-input"]
    arguments += ["--out", str(tmp_path)]
    assert main(["bench", *arguments]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^resnet8 16x16 batch 4 fp32: jax pmap, 2 processes [\d,]+ img/s \(compile", out, re.M)
    ratio_lines = [line for line in out.splitlines() if "ratio=" in line]
    assert [line.split(": ")[1].split(" ")[:2] for line in ratio_lines] == [["jax", "jit"], ["jax", "pmap,"]]
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    single, processes, torch_row = record["train"]
    assert (single["variant"], processes["variant"], torch_row["variant"]) == ("jit", "pmap, 2 processes", "eager")
    assert len(processes["step_seconds"]) == 2 and all(len(repeat) == 2 for repeat in processes["step_seconds"])
    assert processes["compile_seconds"] > 0 and processes["memory_source"].endswith("in each process")
    for row in (single, processes):
        expected = np.median(np.divide(row["img_per_s_per_repeat"], torch_row["img_per_s_per_repeat"]))
        assert torch_row["jax_over_torch"][row["variant"]] == pytest.approx(expected)


@pytest.mark.slow  # run with the slow tests to keep the default run under 15 minutes
def test_bench_epochs_time_whole_epochs_with_the_data_on_the_device_against_torch(tmp_path, capsys):
    arguments = ["--model", "resnet8", "--batch", "16", "--epochs", "--epoch-images", "40", "--scan-steps", "2"]
    arguments += ["--repeats", "2", "--steps", "1", "--warmup", "0", "--no-input", "--vs-torch", "--out", str(tmp_path)]
    assert main(["bench", *arguments]) == 0
    out = capsys.readouterr().out
    label = "resnet8 epoch of 40 CIFAR-shaped images on the device, batch 16 fp32"
    stages = [line.removeprefix(f"{label}: ") for line in out.splitlines() if line.startswith(f"{label}: compiling")]
    assert stages == ["compiling jax jit", "compiling jax jit, 2 steps per call", "compiling torch eager"]
    assert f"{label}: timing 2 round(s) of an epoch of each" in out
    for jax_name in ("jax jit", "jax jit, 2 steps per call"):
        line = rf"^{label}: {jax_name} [\d.]+ s \([\d,]+ img/s, compile and first step [\d.]+s\)$"
        assert re.search(line, out, re.M)
    ratio_lines = [line for line in out.splitlines() if line.startswith(label) and "ratio=" in line]
    assert len(ratio_lines) == 2
    assert re.fullmatch(rf"{label}: jax jit [\d.]+ s, torch eager [\d.]+ s \(.*\), ratio=\d+\.\d\d", ratio_lines[0])
    assert "| model | images | batch | precision | JAX | JAX s/epoch | torch | torch s/epoch | ratio |" in out
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    step, scanned, torch_epoch = record["epochs"]
    assert [row["variant"] for row in record["epochs"]] == ["jit", "jit, 2 steps per call", "eager"]
    for row in record["epochs"]:
        assert (row["model"], row["images"], row["batch"], row["precision"]) == ("resnet8", 40, 16, "fp32")
        assert len(row["epoch_seconds"]) == 2 and row["seconds"] == pytest.approx(np.median(row["epoch_seconds"]))
        assert row["compile_seconds"] > 0
    for jax_row in (step, scanned):
        expected = np.median(np.divide(torch_epoch["epoch_seconds"], jax_row["epoch_seconds"]))
        assert torch_epoch["torch_seconds_over_jax"][jax_row["variant"]] == pytest.approx(expected)
    assert ratio_lines[0].endswith(f"ratio={torch_epoch['torch_seconds_over_jax']['jit']:.2f}")


@pytest.mark.slow  # over 20 s on 2 cores
def test_an_epoch_is_every_full_batch_of_the_data_through_the_real_step():
    source = data.synthetic(num_examples=56, image_shape=(8, 8, 3))
    case = Case("resnet8", 8, 16)
    step, scanned, torch_epoch = (
        JaxEpoch(case, source),
        JaxEpoch(case, source, scan_steps=2),
        TorchEpoch(case, source, "eager"),
    )
    for runner in (step, scanned, torch_epoch):
        runner.compile()
        runner.run_epoch()
    assert int(step._state.step) == int(scanned._state.step) == 1 + 3  # the first step, then 3 full batches of 16
    for one, several in zip(jax.tree.leaves(step._state.params), jax.tree.leaves(scanned._state.params), strict=True):
        np.testing.assert_allclose(one, several, rtol=1e-4, atol=1e-6)  # the same batches, two steps per call
    assert torch_epoch._step._optimizer.state_dict()["state"][0]["momentum_buffer"] is not None


def test_torch_epoch_batches_are_crops_and_flips_of_the_examples_asked_for():
    import torch

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 6, 6, 3), dtype=np.uint8)
    source = ArraySource(images, np.arange(12, dtype=np.int32), 12, "test", (0.4, 0.5, 0.6), (0.3, 0.2, 0.1))
    epoch = TorchEpoch(Case("resnet8", 6, 4), source, "channels_last", pad=2)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    index = torch.tensor([3, 7, 7, 0, 11, 5] * 4)
    batch = epoch.make_batch(index)
    assert batch.shape == (24, 3, 6, 6) and batch.is_contiguous(memory_format=torch.channels_last)
    flipped = []
    for image, example in zip(batch.permute(0, 2, 3, 1).numpy(), index.tolist(), strict=True):
        crops = [
            normalize(padded[example, y : y + 6, x : x + 6], source.mean, source.std)
            for y in range(5)
            for x in range(5)
        ]
        errors = [np.abs(image - crop).max() for crop in crops + [crop[:, ::-1] for crop in crops]]
        assert min(errors) < 1e-5
        flipped.append(int(np.argmin(errors)) >= len(crops))
    assert 0 < sum(flipped) < len(flipped)  # each image flipped with probability 1/2


def test_bench_cpu_processes_refuse_a_batch_they_cannot_split(tmp_path, capsys):
    assert main(["bench", *TINY, "--batch", "5", "--cpu-processes", "2", "--out", str(tmp_path)]) == 2
    assert "batch 5 does not split over 2 processes" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_bench_config_times_the_experiments_own_step_and_input_pipeline(idx_dir, tmp_path, capsys):
    experiment = ["--config", "configs/fashion_mnist_resnet20.py", f"--config.data_dir={idx_dir}"]
    changes = ["--config.model=resnet8", "--config.batch_size=8", "--config.label_smoothing=0.1"]
    assert main(["bench", *experiment, *changes, "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^resnet8 28x28 batch 8 fp32: jax jit [\d,]+ img/s \(compile", out, re.M)
    assert re.search(r"^input fashion_mnist train \(the config's pipeline\), batch 8: [\d,]+ img/s$", out, re.M)
    verdict = re.search(r"^input ([\d,]+) img/s against the train step's [\d,]+ img/s \([\d,.]+x\): (.*)$", out, re.M)
    assert verdict and verdict[2].startswith("the input")
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    (row,) = record["train"]
    assert (row["model"], row["image_size"], row["channels"], row["batch"]) == ("resnet8", 28, 1, 8)
    assert (row["framework"], row["variant"], len(row["step_seconds"])) == ("jax", "jit", 3)
    (input_row,) = record["input"]
    assert input_row["batch"] == 8 and f"{input_row['img_per_s']:,.0f}" == verdict[1]
    assert (record["config"]["model"], record["config"]["label_smoothing"]) == ("resnet8", 0.1)


def test_bench_config_with_the_data_on_the_device_times_its_calls_of_several_steps(idx_dir, tmp_path, capsys):
    experiment = ["--config", "configs/fashion_mnist_resnet20.py", f"--config.data_dir={idx_dir}"]
    changes = ["--config.model=resnet8", "--config.batch_size=8", "--config.data_on_device=True"]
    changes += ["--config.steps_per_call=2"]
    timing = ["--steps", "3", "--warmup", "1", "--out", str(tmp_path)]
    options = f"xla_dump_to={tmp_path / 'dump'},xla_cpu_multi_thread_eigen=false"
    assert main(["bench", *experiment, *changes, *timing, "--xla-options", options]) == 0
    out = capsys.readouterr().out
    variant = "jit, data on the device, 2 step(s) per call"
    assert re.search(rf"^resnet8 28x28 batch 8 fp32: jax {re.escape(variant)} [\d,]+ img/s", out, re.M)
    assert "there is no input pipeline to time" in out and "input fashion_mnist" not in out
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["train"]
    assert [row["variant"] for row in rows] == [variant, f"{variant}, {options}"]
    for row in rows:
        assert [len(repeat) for repeat in row["step_seconds"]] == [4] * len(row["step_seconds"])  # two calls of two
        assert all(repeat[0] == repeat[1] and repeat[2] == repeat[3] for repeat in row["step_seconds"])
    (call_options,) = (tmp_path / "dump").glob("*jit__train_steps*debug_options")  # the second row's call
    assert "xla_cpu_multi_thread_eigen: false" in call_options.read_text()
    assert main(["bench", *experiment, *changes, "--config.parallelism=pmap", "--out", str(tmp_path)]) == 2
    assert "this run has: parallelism='pmap' (use jit)" in capsys.readouterr().err


def test_config_step_is_the_experiments_own(idx_dir):
    from resnet_jax import data
    from resnet_jax.train.config import load_config

    config = load_config(
        "configs/fashion_mnist_resnet20.py",
        [
            f"data_dir={idx_dir}",
            "model=resnet8",
            "batch_size=8",
            "freeze_backbone=true",
            "warmup_steps=0",
            "model_overrides.zero_init_residual=true",
        ],
    )
    source = data.load_source(config.dataset, config.train_split, config.data_dir)
    step = JaxStep.of_config(config, source)
    assert step.case == Case("resnet8", 28, 8, "fp32", channels=1, num_classes=10)
    params = step._state.params
    assert not np.any(params["stage1"]["block0"]["branch"]["bn2"]["scale"])  # the model override
    before = jax.tree.map(np.array, params)  # copies: the step donates the state
    step.compile()
    step.run(1)
    after = jax.tree.map(np.asarray, step._state.params)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    assert all(jax.tree.leaves(changed["head"])) and not any(jax.tree.leaves(changed["stage1"]))  # the optimizer


@pytest.mark.parametrize(
    ("script", "program"),
    [
        ("/usr/local/bin/resnet-jax", "resnet-jax"),
        ("/src/resnet_jax/bench/__main__.py", "python -m resnet_jax.bench"),
        ("/src/resnet_jax/cli.py", "python -m resnet_jax.cli"),
    ],
)
def test_results_record_the_command_as_it_was_typed(script, program, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, "--batch", "32", "--out", "my results"])
    assert invoked_command() == f"{program} --batch 32 --out 'my results'"


def test_suite_leaves_the_gpu_case_out_on_cpu():
    from resnet_jax.bench.harness import default_cases

    cases, skipped = default_cases("cpu")
    assert [(c.model, c.batch, c.precision) for c in cases] == [("resnet20", 32, "fp32"), ("resnet20", 128, "fp32")]
    (line,) = skipped
    assert line.startswith("skipped resnet50 224x224 batch 256 bf16") and "--precision bf16" in line
    gpu_cases, gpu_skipped = default_cases("gpu")
    assert len(gpu_cases) == 3 and not gpu_skipped


def test_any_case_option_replaces_the_suite():
    args = build_parser().parse_args(["bench", "--precision", "bf16"])
    cases, skipped = chosen_cases(args, "cpu")
    assert [(c.model, c.image_size, c.batch, c.precision) for c in cases] == [
        ("resnet20", 32, 32, "bf16"),
        ("resnet20", 32, 128, "bf16"),
    ]
    assert not skipped
    args = build_parser().parse_args(["bench", "--model", "resnet18", "--batch", "8"])
    ((case,), _) = chosen_cases(args, "cpu")
    assert (case.image_size, case.num_classes, case.precision) == (224, 1000, "fp32")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "resnet7"], "6n\\+2"),
        (["--steps", "0"], "--steps"),
        (["--model", "plain8", "--vs-torch"], "No PyTorch counterpart of 'plain8'"),
        (["--model", "resnet8", "--batch", "0"], "must be positive"),
        (["--config", "configs/default.py", "--vs-torch", "--batch", "8"], "--batch, --vs-torch describe a suite"),
        (["--config.batch_size=8"], "add --config FILE"),
        (["--config", "configs/no_such_experiment.py"], "No config file"),
        (["--model", "resnet8", "--epochs", "--epoch-images", "100", "--batch", "128"], "less than a batch"),
        (["--model", "resnet8", "--epochs", "--scan-steps", "-1"], "--scan-steps -1: give a number"),
        (["--config", "configs/default.py", "--epochs"], "--epochs describe a suite"),
        (["--xla-options", "xla_gpu_autotune_level"], "--xla-options xla_gpu_autotune_level: give NAME=VALUE pairs"),
        (["--xla-options", "xla_no_such_option=1"], "No such compile option: 'xla_no_such_option'. The names are"),
        (["--xla-options", "xla_gpu_autotune_level=high"], "'high' is not a valid int32 value"),
    ],
)
def test_bad_arguments_fail_with_one_line_before_compiling(arguments, message, tmp_path, capsys):
    assert main(["bench", *arguments, "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("resnet-jax bench: error:") and re.search(message, error)
    assert not list(tmp_path.iterdir())


def test_ratio_is_the_median_of_per_repeat_ratios():
    case = Case("resnet8", 8, 10)

    def row(framework, repeats):
        return StepRow(case, framework, "x", 1.0, repeats, None, "")

    jax_row = row("jax", [[1.0, 1.0, 3.0], [2.0, 2.0], [0.5]])  # 10, 5, 20 img/s
    torch_row = row("torch", [[0.5], [1.0], [2.0, 2.0]])  # 20, 10, 5 img/s
    assert jax_row.img_per_s_per_repeat == [10, 5, 20]
    assert jax_row.img_per_s == pytest.approx(10 / 1.5)  # the median step over all repeats
    assert ratio(jax_row, torch_row) == pytest.approx(0.5)  # median of 0.5, 0.5, 4


def test_runners_train_the_same_model_with_the_real_step():
    case = Case("resnet8", 8, 4)
    jax_step, torch_step = JaxStep.of_case(case), TorchStep(case, "channels_last")
    rows = time_runners(case, [jax_step, torch_step], Settings(steps=2, warmup=1, repeats=2))
    assert [row.name for row in rows] == ["jax jit", "torch channels_last"]
    assert int(jax_step._state.step) == 1 + 2 * 2  # the warm-up and timed steps; compile() only compiles
    jax_params = sum(x.size for x in jax.tree.leaves(jax_step._state.params))
    torch_params = sum(p.numel() for p in torch_step._optimizer.param_groups[0]["params"])
    assert jax_params == torch_params


@pytest.mark.slow
def test_torch_compile_and_bf16_rows_run_on_cpu(tmp_path, capsys):
    """The GPU rows exercised on the CPU: torch.compile (inductor needs a C compiler) and bf16 autocast."""
    arguments = [*TINY, "--precision", "bf16", "--vs-torch", "--batch-parts", "0"]
    arguments += ["--torch-variants", "eager", "channels_last", "compile"]
    assert main(["bench", *arguments, "--no-input", "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "ratio=" in line]
    assert [line.split(": jax")[0] for line in lines] == ["resnet8 16x16 batch 4 bf16"] * 3
    assert [re.search(r"torch (\w+)", line).group(1) for line in lines] == ["eager", "channels_last", "compile"]


@pytest.mark.parametrize(("name", "params"), [("resnet20", 269_722), ("resnet50", 25_557_032)])
def test_torch_models_match_the_flax_models(name, params):
    num_classes = create_model(name).num_classes
    assert sum(p.numel() for p in torch_models.create(name, num_classes).parameters()) == params


def test_python_m_resnet_jax_bench_is_the_cli():
    result = subprocess.run([sys.executable, "-m", "resnet_jax.bench", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--vs-torch" in result.stdout and "usage: resnet-jax bench" in result.stdout


def test_results_of_the_same_day_and_device_are_not_overwritten(tmp_path):
    record = {"date": "2026-01-02T03:04:05+00:00", "device": {"platform": "gpu", "kind": "NVIDIA H100 80GB HBM3"}}
    paths = [write_results(record, tmp_path) for _ in range(3)]
    assert [p.name for p in paths] == [
        "2026-01-02-nvidia-h100-80gb-hbm3.json",
        "2026-01-02-nvidia-h100-80gb-hbm3-2.json",
        "2026-01-02-nvidia-h100-80gb-hbm3-3.json",
    ]
