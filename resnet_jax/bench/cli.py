"""``resnet-jax bench`` (also ``python -m resnet_jax.bench``): train-step and input-pipeline throughput of the
suite, optionally against PyTorch in the same run, or of one experiment (``--config``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnet_jax.bench.cases import CIFAR_TRAIN_IMAGES, EPOCH_BATCH, EPOCH_MODELS, GPU_SCAN_STEPS, PRECISIONS, Case

if TYPE_CHECKING:
    from resnet_jax.bench.epochs import EpochRow
    from resnet_jax.bench.harness import Settings, StepRow
    from resnet_jax.bench.inputs import InputRow
    from resnet_jax.bench.jax_side import XlaOptions

RESULTS_DIR = "benchmarks/results"
DEFAULT_BATCH_PARTS = 2  # configs/default.py's `batch_parts`
GPU_TORCH_ROWS = (
    "skipped the torch channels_last (AMP) and torch.compile rows: GPU rows by default; run them here with "
    "--torch-variants eager channels_last compile"
)
TIME_TO_ACCURACY = (
    "skipped time to 94% test accuracy on Fashion-MNIST: a training run, not a bench row; "
    "`resnet-jax train --config configs/fashion_mnist_time_to_94.py --workdir DIR` stops at 94% and prints the time"
)


def say(line: str) -> None:
    """A progress line, out at once: a bench's output often goes to a log that someone is watching."""
    print(line, flush=True)


def add_bench_command(commands: Any) -> None:
    """Add ``bench`` to the ``resnet-jax`` subparsers ``commands``."""
    p = commands.add_parser(
        "bench",
        help="train-step img/s (optionally against PyTorch) and input-pipeline img/s",
        description="Train-step throughput of the project's real train step on synthetic data, on one device: "
        "img/s (median step time after warm-up), compile time and peak memory; with --vs-torch the same model, "
        "batch, loss, optimizer and precision in PyTorch, interleaved, with the ratio JAX / PyTorch. Then the "
        "input pipelines. Without --model the suite runs: resnet20 32x32 fp32 at batch 32 and 128, and (on a GPU) "
        "resnet50 224x224 bf16 at batch 256. With --config: an experiment's own step and input pipeline instead. "
        "Results go to --out/<date>-<device>.json.",
    )
    p.add_argument(
        "--config",
        help="time an experiment instead of the suite: its own train step (on every device) and its own input "
        "pipeline, and say whether the input keeps up; --config.KEY=VALUE changes it",
    )
    p.add_argument("--model", help="benchmark this model instead of the suite (e.g. resnet8)")
    p.add_argument("--image-size", type=int, help="input height = width (default 32, or 224 for ImageNet models)")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes per device (default 32 128)")
    p.add_argument("--precision", choices=PRECISIONS, help="compute precision (default fp32)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of JAX and torch in turn (default 3)")
    p.add_argument("--no-input", action="store_true", help="skip the input-pipeline rows")
    p.add_argument("--out", default=RESULTS_DIR, help=f"folder of the JSON results (default {RESULTS_DIR})")
    p.add_argument(
        "--inference",
        action="store_true",
        help="instead: eval-mode latency (batch 1) and throughput of JAX, folded JAX, ONNX Runtime, TFLite float32 "
        "and int8 and PyTorch side by side, for resnet20 at 32x32 (batch 1, 32, 128) and resnet50 at 224x224 "
        "(batch 1, 32), or --model/--image-size/--batch; --repeats rounds (needs the [export] and [torch] extras)",
    )
    p.add_argument("--torch-compile", action="store_true", help="with --inference, also a torch.compile row")
    p.add_argument(
        "--input",
        choices=("imagenet",),
        help="instead: the ImageNet JPEG pipelines (training: decode, random-resized crop, flip, normalise, batch; "
        "evaluation: resize 256, centre crop 224) against torchvision ImageFolder + DataLoader on the same files, "
        "img/s on one core and on all (--cores), --repeats rounds at --batch (default 128), --steps batches timed; "
        "writes the synthetic JPEG set first if --data-dir lacks it",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="with --input imagenet: where the imagenet_synthetic set is or is written (default tfds' folder)",
    )
    p.add_argument("--cores", type=int, nargs="+", help="with --input imagenet: core counts (default 1 and all)")
    add_row_arguments(p)
    p.set_defaults(run=run_bench, takes_config_overrides=True)


def add_row_arguments(p: argparse.ArgumentParser) -> None:
    """The rows timed beside the JAX step: PyTorch's, the CPU's other ways to run the step, whole epochs, XLA
    options."""
    from resnet_jax.bench.torch_side import VARIANTS

    p.add_argument("--vs-torch", action="store_true", help="also run PyTorch and print the ratio JAX / PyTorch")
    p.add_argument(
        "--torch-variants",
        nargs="+",
        choices=VARIANTS,
        help="torch rows (default: eager on CPU; eager, channels_last (AMP) and compile on a GPU)",
    )
    p.add_argument(
        "--cpu-processes",
        type=int,
        metavar="N",
        help="also time the step as `resnet-jax train --cpu-processes N` runs it: N pinned processes, pmap, gloo "
        "(CPU only; the batch is split over them)",
    )
    p.add_argument(
        "--batch-parts",
        type=int,
        metavar="N",
        help="also time the step as `resnet-jax train --config.parallelism=batch_parts --config.batch_parts=N` runs "
        f"it: the batch in N parts whose programs run side by side (CPU only; default {DEFAULT_BATCH_PARTS} on a CPU, "
        "0: no row)",
    )
    p.add_argument(
        "--epochs",
        action="store_true",
        help="also time whole training epochs of resnet20 and resnet56 (or --model) on CIFAR-shaped data resident "
        "on the device, JAX against each torch variant with --vs-torch (default on a GPU)",
    )
    p.add_argument(
        "--scan-steps",
        type=int,
        metavar="K",
        help="with the epochs, also a JAX row that runs K steps per compiled call (lax.scan, unrolled on a CPU; "
        "default 10 on a GPU, none on a CPU, where it gains nothing; 0 or 1: none)",
    )
    p.add_argument(
        "--epoch-images",
        type=int,
        default=CIFAR_TRAIN_IMAGES,
        metavar="N",
        help=f"images in an epoch of --epochs (default {CIFAR_TRAIN_IMAGES:,}, CIFAR's training set)",
    )
    p.add_argument(
        "--xla-options",
        action="append",
        metavar="NAME=VALUE[,...]",
        help="also a JAX row of the same step compiled with these XLA options, timed in turn with the others: what "
        "an option costs, in one run (XLA_FLAGS holds for a whole process). Names and values as XLA_FLAGS takes "
        "them, without the dashes, e.g. xla_gpu_deterministic_ops=true or xla_gpu_autotune_level=0; once more for "
        "each row. Step rows and --config; not the epochs",
    )


def run_bench(args: argparse.Namespace) -> None:
    from resnet_jax.bench.harness import Settings
    from resnet_jax.bench.jax_side import check_xla_options, parse_xla_options

    settings = Settings(args.steps, args.warmup, args.repeats)  # checks the numbers before anything runs
    out = Path(args.out)
    if out.suffix == ".json" or out.is_file():  # a results file is named by date and device, inside --out
        raise ValueError(f"--out {out} names a file; give the folder the results JSON goes in, e.g. --out {out.parent}")
    if args.inference:
        return bench_inference(args)
    if args.input:
        return bench_jpeg_input(args, settings)
    xla_options = [parse_xla_options(text) for text in args.xla_options or []]
    if args.config is not None:
        return bench_config(args, settings, xla_options)
    if args.overrides:
        raise ValueError(f"{args.overrides[0]} changes an experiment: add --config FILE, or drop it.")
    if args.vs_torch:  # JAX would otherwise take most of the GPU's memory before torch starts
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from resnet_jax.bench import harness, report
    from resnet_jax.bench.inputs import input_rows

    platform = jax.devices()[0].platform
    cases, skipped = chosen_cases(args, platform)
    epoch_models = [args.model] if args.model else list(EPOCH_MODELS)
    run_epochs = args.epochs or (platform != "cpu" and args.model is None)
    batch_parts = check_suite_rows(args, cases, platform, run_epochs)
    check_xla_options(xla_options)
    torch_models = {case.model for case in cases} | (set(epoch_models) if run_epochs else set())
    variants = torch_variants(args, platform, torch_models, skipped)
    if not run_epochs:
        skipped.append(
            f"skipped whole epochs of {' and '.join(epoch_models)} on CIFAR-shaped data resident on the device: GPU "
            "rows by default (minutes per epoch on a CPU); run them here with --epochs --epoch-images 5000"
        )
    skipped.append(TIME_TO_ACCURACY)
    for line in skipped:
        print(line)

    rows = harness.bench_cases(
        cases,
        settings,
        variants,
        lambda case_rows: print(*report.case_lines(case_rows), sep="\n"),
        args.cpu_processes,
        batch_parts,
        say,
        xla_options,
    )
    epochs = epoch_rows(args, platform, epoch_models, settings, variants) if run_epochs else []
    inputs = []
    if not args.no_input:
        inputs, input_skipped = input_rows(batch=128, num_batches=settings.steps)
        skipped += input_skipped
        print(*map(report.input_line, inputs), sep="\n")
    finish(rows, inputs, skipped, settings, args.out, epochs=epochs)


def bench_inference(args: argparse.Namespace) -> None:
    """``--inference``: every engine's forward pass (`resnet_jax.deploy.bench`)."""
    from resnet_jax.deploy.bench import DEFAULT_CASES, run_inference_bench
    from resnet_jax.models import create_model

    cases = list(DEFAULT_CASES)
    if args.model or args.image_size or args.batch:
        name = args.model or "resnet20"
        size = args.image_size or (224 if create_model(name).stem == "imagenet" else 32)
        cases = [(name, size, tuple(args.batch or (1, 32)))]
    run_inference_bench(cases, args.repeats, args.torch_compile, args.out, invoked_command())


def bench_jpeg_input(args: argparse.Namespace, settings: Settings) -> None:
    """``--input imagenet``: the JPEG pipelines against torchvision's (`resnet_jax.bench.jpeg_inputs`)."""
    from resnet_jax.bench import jpeg_inputs, report

    if args.config is not None or args.model or args.vs_torch:
        raise ValueError("--input imagenet times input pipelines only; drop --config, --model and --vs-torch.")
    cores = jpeg_inputs.core_counts(args.cores)
    batch = (args.batch or [128])[0]
    rows = jpeg_inputs.bench_jpeg_inputs(
        args.data_dir, batch, settings.steps, settings.warmup, settings.repeats, cores, say
    )
    print(jpeg_inputs.table(rows))
    record = report.results([], [], [], settings, invoked_command()) | {
        "jpeg_input": [dataclasses.asdict(row) | {"median": row.median, "per_core": row.per_core} for row in rows],
        "batch": batch,
        "input_versions": report.package_versions(("tensorflow-cpu", "tensorflow-datasets", "torchvision", "pillow")),
    }
    print(f"results in {report.write_results(record, args.out)}")


def check_suite_rows(args: argparse.Namespace, cases: list[Case], platform: str, run_epochs: bool) -> int:
    """Refuse rows of the suite that cannot run, before anything is timed; the batch parts of the batch-parts row
    (0: no such row)."""
    epoch_batch = (args.batch or [EPOCH_BATCH])[0]
    if run_epochs and args.epoch_images < epoch_batch:
        raise ValueError(f"--epoch-images {args.epoch_images} is less than a batch; give at least {epoch_batch}.")
    if args.scan_steps is not None and args.scan_steps < 0:
        raise ValueError(f"--scan-steps {args.scan_steps}: give a number of steps per call, or 0 for none.")
    if args.cpu_processes is not None:
        check_cpu_processes(args.cpu_processes, cases, platform)
    batch_parts = args.batch_parts
    if batch_parts is None:
        batch_parts = DEFAULT_BATCH_PARTS if platform == "cpu" else 0
    if batch_parts:
        check_batch_parts(batch_parts, cases, platform)
    return batch_parts


def torch_variants(args: argparse.Namespace, platform: str, models: set[str], skipped: list[str]) -> tuple[str, ...]:
    """The torch rows of ``--vs-torch`` (none without it), checked to have a torch model each and to run on the
    kind of device JAX runs on; says in ``skipped`` which default rows were left out."""
    if not args.vs_torch:
        return ()
    from resnet_jax.bench import harness, torch_models
    from resnet_jax.bench.torch_side import torch_device

    for model in models:
        torch_models.constructor(model)
    device = torch_device()
    if (device == "cpu") != (platform == "cpu"):
        raise ValueError(
            f"JAX runs on {platform} but PyTorch on {device}: the ratio would compare different hardware. "
            "Install the matching build of one of them, or drop --vs-torch."
        )
    if device == "cpu" and not args.torch_variants:
        skipped.append(GPU_TORCH_ROWS)
    return tuple(args.torch_variants or harness.default_torch_variants(device))


def epoch_rows(
    args: argparse.Namespace, platform: str, models: list[str], settings: Settings, variants: tuple[str, ...]
) -> list[EpochRow]:
    """Whole epochs of ``models`` with JAX and each torch variant, printed as they are measured."""
    from resnet_jax.bench import report
    from resnet_jax.bench.epochs import bench_epochs

    return bench_epochs(
        models,
        (args.batch or [EPOCH_BATCH])[0],
        args.precision or "fp32",
        args.epoch_images,
        settings,
        variants,
        lambda model_rows: print(*report.epoch_lines(model_rows), sep="\n"),
        args.scan_steps if args.scan_steps is not None else (0 if platform == "cpu" else GPU_SCAN_STEPS),
        say,
    )


def bench_config(args: argparse.Namespace, settings: Settings, xla_options: list[XlaOptions]) -> None:
    """The train step and the input pipeline of ``--config``: is the input the bottleneck? (And the same step
    compiled with each of ``xla_options``.)"""
    from resnet_jax import data
    from resnet_jax.bench import harness, report
    from resnet_jax.bench.inputs import config_input_row
    from resnet_jax.bench.jax_side import JaxStep, check_xla_options
    from resnet_jax.train.config import load_config

    suite_options = {
        "--model": args.model,
        "--image-size": args.image_size,
        "--batch": args.batch,
        "--precision": args.precision,
        "--vs-torch": args.vs_torch or None,
        "--torch-variants": args.torch_variants,
        "--cpu-processes": args.cpu_processes,
        "--batch-parts": args.batch_parts,
        "--epochs": args.epochs or None,
        "--scan-steps": args.scan_steps,
    }
    if given := [option for option, value in suite_options.items() if value is not None]:
        raise ValueError(
            f"--config times an experiment as it trains; {', '.join(given)} describe a suite row. Change the "
            "experiment with --config.KEY=VALUE (e.g. --config.batch_size=64), or drop --config."
        )
    config = load_config(args.config, args.overrides)
    source = data.load_run_source(config, config.train_split)
    check_xla_options(xla_options)
    steps = [JaxStep.of_config(config, source, options) for options in [None, *xla_options]]
    rows = harness.time_runners(steps[0].case, steps, settings, say)
    print(*report.case_lines(rows), sep="\n")
    inputs = [] if args.no_input or config.data_on_device else [config_input_row(config, source, settings.steps)]
    if config.data_on_device:
        print("data_on_device: the step makes its own batches on the device; there is no input pipeline to time")
    for row in inputs:
        print(report.input_line(row))
        print(report.input_verdict(row, rows[0]))
    finish(rows, inputs, [], settings, args.out, {"config": config.to_dict()})


def finish(
    rows: list[StepRow],
    inputs: list[InputRow],
    skipped: list[str],
    settings: Settings,
    out: str,
    extra: dict[str, Any] | None = None,
    epochs: Sequence[EpochRow] = (),
) -> None:
    """Print the tables and write the results file (with ``extra`` keys)."""
    from resnet_jax.bench import report

    print(report.markdown_table(rows))
    if epochs:
        print(report.epoch_table(epochs))
    record = report.results(rows, inputs, skipped, settings, invoked_command(), epochs) | (extra or {})
    path = report.write_results(record, out)
    print(f"results in {path}")


def chosen_cases(args: argparse.Namespace, platform: str) -> tuple[list[Case], list[str]]:
    """The suite, or the cases of --model/--image-size/--batch/--precision; and what was left out."""
    from resnet_jax.bench.harness import default_cases
    from resnet_jax.models import create_model

    if args.model is None and args.image_size is None and args.batch is None and args.precision is None:
        return default_cases(platform)
    name = args.model or "resnet20"
    model = create_model(name)  # an unknown name fails here, with the valid ones
    size = args.image_size or (224 if model.stem == "imagenet" else 32)
    batches = args.batch or (32, 128)
    precision = args.precision or "fp32"
    return [Case(name, size, batch, precision, num_classes=model.num_classes) for batch in batches], []


def check_cpu_processes(num_processes: int, cases: list[Case], platform: str) -> None:
    """Refuse a --cpu-processes row that cannot run, before anything is timed."""
    from resnet_jax.bench.processes import JaxProcesses

    if platform != "cpu":
        raise ValueError(f"--cpu-processes is a CPU row; JAX runs on {platform} here. Drop the flag.")
    for case in cases:
        JaxProcesses.core_groups_for(case, num_processes)


def check_batch_parts(batch_parts: int, cases: list[Case], platform: str) -> None:
    """Refuse a --batch-parts row that cannot run, before anything is timed."""
    if platform != "cpu":
        raise ValueError(f"--batch-parts is a CPU row; JAX runs on {platform} here. Drop the flag.")
    if batch_parts < 0:
        raise ValueError(f"--batch-parts {batch_parts}: give the number of batch parts, or 0 for no such row.")
    for case in cases:
        if case.batch % batch_parts:
            raise ValueError(f"batch {case.batch} does not split into {batch_parts} parts; make it a multiple.")


def invoked_command() -> str:
    """The command line as typed: ``resnet-jax bench ...``, ``python -m resnet_jax.bench ...`` or
    ``python -m resnet_jax.cli bench ...`` (how a machine without the package installed runs it)."""
    script = Path(sys.argv[0])
    program = {
        ("bench", "__main__.py"): "python -m resnet_jax.bench",
        ("resnet_jax", "cli.py"): "python -m resnet_jax.cli",
    }.get((script.parent.name, script.name), script.name)
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])
