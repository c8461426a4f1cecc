"""The ``resnet-jax`` command: one subcommand per job, each a thin layer over a library call."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnet_jax.analysis.cli import add_analyze_command
from resnet_jax.bench.cli import add_bench_command
from resnet_jax.compress.cli import add_compress_commands
from resnet_jax.cpu.host_memory import keep_freed_host_memory
from resnet_jax.deploy.cli import add_export_command

if TYPE_CHECKING:
    from resnet_jax.models import ResNet


def summary(args: argparse.Namespace) -> None:
    """Print the per-stage table of output shapes, parameters and multiply-adds (of a named model, or of a run's
    model as its checkpoint builds it: pruned to fewer channels, factorised, quantized)."""
    from resnet_jax import data
    from resnet_jax.models import create_model
    from resnet_jax.models.complexity import format_summary, model_cost
    from resnet_jax.train.runs import load_run

    if (args.model is None) == (args.checkpoint is None):
        raise ValueError("Give a model name or --checkpoint DIR (a run), not both.")
    if args.checkpoint is not None:
        model, _, config = load_run(args.checkpoint)
        name, shape = (
            f"{config.model} ({args.checkpoint})",
            data.load_run_source(config, config.eval_split).image_shape,
        )
    else:
        model, name = create_model(args.model, num_classes=args.num_classes), args.model
        shape = default_input_shape(model)
    input_shape = tuple(args.input_size) if args.input_size else shape
    print(format_summary(name, model_cost(model, input_shape), input_shape))


def train(args: argparse.Namespace) -> int:
    """Train (or resume) the experiment of ``--config`` in ``--workdir``; returns the exit status."""
    from resnet_jax.cpu import processes
    from resnet_jax.train.config import load_config
    from resnet_jax.train.loop import train_and_evaluate

    config = load_config(args.config, args.overrides)
    if args.cpu_processes is None:
        train_and_evaluate(config, args.workdir)
        return 0
    processes.check_cpu_processes(config, args.cpu_processes)
    command = ["train", "--config", args.config, "--workdir", args.workdir, *args.overrides]
    return processes.launch_cpu_processes(command, args.cpu_processes)


def evaluate(args: argparse.Namespace) -> None:
    """Test metrics of a checkpoint of the run in ``--workdir``."""
    from resnet_jax.train.loop import evaluate as evaluate_run

    evaluate_run(args.workdir, args.step)


def download(args: argparse.Namespace) -> None:
    """Fetch a data set ahead of use, e.g. before going offline."""
    from resnet_jax.data.sources import download_dataset

    print(f"{args.dataset}: {download_dataset(args.dataset, args.data_dir)}")


def list_names(args: argparse.Namespace) -> None:
    """Print the named models, one a line."""
    from resnet_jax.models import list_models

    print("\n".join(list_models()))


def convert(args: argparse.Namespace) -> None:
    """PyTorch or Keras weights into a run folder (``--from-torch``, ``--from-keras``), or a run's checkpoint out to
    PyTorch (``--to-torch``)."""
    from resnet_jax.train import transfer
    from resnet_jax.train.config import apply_override, load_config

    source = args.from_torch or args.from_keras
    if source:
        option = "--from-torch" if args.from_torch else "--from-keras"
        if not (args.model and args.out):
            raise ValueError(f"{option} FILE needs --model NAME (the model the file holds) and --out DIR.")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a file; give a new folder for the converted run.")
        config = load_config(args.config)
        config.dataset, config.eval_split = "imagenet2012", "validation"  # torchvision's and Keras' weights: ImageNet
        for override in args.overrides:
            apply_override(config, override)
        if args.from_torch:
            meta = transfer.convert_torch_checkpoint(source, args.model, args.out, config, args.force)
        else:
            meta = transfer.convert_keras_checkpoint(source, args.model, args.out, config, args.force)
        print(
            f"{source} -> {args.out}: {args.model} with {meta['num_classes']} classes as step 0 of a run on "
            f"{config.dataset} (eval, predict, features, analyze and init_from read it)"
        )
    else:
        if not args.checkpoint:
            raise ValueError("--to-torch FILE needs --checkpoint DIR (a run or a `convert` output).")
        path = transfer.export_torch_checkpoint(args.checkpoint, output_file(args.to_torch, args.force), args.step)
        print(f"{args.checkpoint} -> {path} (a torchvision-layout state_dict)")


def predict(args: argparse.Namespace) -> None:
    """Top-k classes of image files under a checkpoint."""
    from resnet_jax.inference import checkpoint_inference, class_names, input_channels, load_images

    check_files(args.images)
    inference, config = checkpoint_inference(args.checkpoint, args.step, args.batch_size)
    images = load_images(args.images, config, input_channels(inference), args.size, args.resize)
    classes, probabilities = inference.predict(images, args.top_k)
    names = class_names(config, inference.model.num_classes)
    for path, row, chances in zip(args.images, classes, probabilities, strict=True):
        print(path)
        for rank, (index, chance) in enumerate(zip(row, chances, strict=True), start=1):
            print(f"  {rank}. {chance:.4f}  {names[index]} ({index})")


def features(args: argparse.Namespace) -> None:
    """Feature maps and pre-logits of image files under a checkpoint, saved to an .npz file."""
    import numpy as np

    from resnet_jax.inference import checkpoint_inference, input_channels, load_images

    check_files(args.images)
    out = output_file(args.out if args.out.suffix == ".npz" else args.out.with_name(f"{args.out.name}.npz"), args.force)
    inference, config = checkpoint_inference(args.checkpoint, args.step, args.batch_size)
    images = load_images(args.images, config, input_channels(inference), args.size, args.resize)
    arrays = inference.features(images, args.feature or None)
    np.savez(out, paths=np.asarray([str(p) for p in args.images]), **arrays)
    shapes = ", ".join(f"{name} {value.shape}" for name, value in arrays.items())
    print(f"{len(images)} image(s) -> {out}: {shapes}")


def check_files(paths: Sequence[str]) -> None:
    """Fail on missing files before a checkpoint is loaded."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"No such image file(s): {', '.join(missing)}.")


def output_file(path: str | Path, force: bool) -> Path:
    """``path`` checked before any work: not a folder, not an existing file unless ``force``, in a folder that can
    be created and written."""
    from resnet_jax.faults import StorageError, storage_error

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the name of the file to write.")
    if path.exists() and not force:
        raise ValueError(f"{path} exists; pass --force to overwrite it, or give another name.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise storage_error(error, path.parent, "creating the output's folder") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write {path}: permission denied; choose a folder you can write to.")
    return path


def default_input_shape(model: ResNet) -> tuple[int, int, int]:
    """224x224 RGB for ImageNet models, 32x32 RGB for CIFAR ones."""
    return (224, 224, 3) if model.stem == "imagenet" else (32, 32, 3)


PREPROCESSING = (
    "Images are preprocessed as torchvision evaluates: shorter side resized to --resize, central --size crop, "
    "normalised with the run's data-set statistics (ImageNet's for converted torchvision weights). Batches of "
    "--batch-size images compile once."
)


def add_image_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint, images and preprocessing arguments of ``predict`` and ``features``."""
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a training workdir or `convert` output")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--batch-size", type=int, default=32, help="images per compiled batch (default 32)")
    p.add_argument("--size", type=int, default=224, help="side of the central crop (default 224)")
    p.add_argument("--resize", type=int, default=256, help="shorter side before cropping (default 256)")


def add_force_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")


def add_train_and_eval_commands(commands: Any) -> None:
    """``train`` (a config in a workdir) and ``eval`` (a checkpoint of a workdir)."""
    p = commands.add_parser(
        "train",
        help="train an experiment config",
        epilog="Any config key can be overridden: --config.KEY=VALUE (e.g. --config.num_train_steps=500).",
    )
    p.add_argument("--config", required=True, help="experiment file, e.g. configs/fashion_mnist_resnet20.py")
    p.add_argument("--workdir", required=True, help="where checkpoints, metrics and plots go; resumes if present")
    p.add_argument(
        "--cpu-processes",
        type=int,
        metavar="N",
        help="run N processes of one job on this machine's CPU, each pinned to its own cores (gloo collectives; "
        "needs --config.parallelism=pmap); faster than one jit process on a multi-core CPU, as is one process "
        "with --config.parallelism=batch_parts",
    )
    p.set_defaults(run=train)

    p = commands.add_parser("eval", help="evaluate the latest (or a given) checkpoint of a run")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.set_defaults(run=evaluate)


def add_convert_command(commands: Any) -> None:
    """``convert``: PyTorch or Keras weights in, a run's weights out to PyTorch."""
    p = commands.add_parser(
        "convert",
        help="PyTorch (torchvision-layout) or Keras weights into a run folder, or a run's weights out to PyTorch",
        epilog="--from-torch writes step 0 of a run of --config (default configs/default.py) on imagenet2012 "
        "(validation split); --config.KEY=VALUE changes it, e.g. --config.data_dir=DIR. The folder is what eval "
        "--workdir, predict/features/analyze --checkpoint and the init_from config key read. torchvision's ImageNet "
        "weights, e.g. https://download.pytorch.org/models/resnet50-0676ba61.pth, load with --model resnet50. "
        "--from-keras reads keras.applications' ResNet50/101/152 (--model resnet50_keras, ...) and ResNet50V2/101V2/"
        "152V2 (--model resnet50v2_keras, ...); the run records Keras' preprocess_input as its input normalisation "
        "(config.input_mean/input_std) and takes RGB images, so eval, predict and export feed it as Keras did. An "
        "existing --out is replaced only with --force, once the new run is written whole.",
    )
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-torch", metavar="FILE", help="a state_dict: .pth/.pt (torch.save) or .safetensors")
    direction.add_argument("--from-keras", metavar="FILE", help="a Keras ResNet: .keras or .h5 (whole or weights)")
    direction.add_argument("--to-torch", metavar="FILE", help="write --checkpoint's weights to this .pth/.safetensors")
    p.add_argument(
        "--model",
        help="the model the file holds: resnet18..152, wide_resnet50_2, resnext50_32x4d, ... (torch); "
        "resnet50_keras, resnet50v2_keras, ... (Keras)",
    )
    p.add_argument("--out", help="new folder for the converted run (with --from-torch or --from-keras)")
    p.add_argument("--config", default="configs/default.py", help="the run's recorded config (default %(default)s)")
    p.add_argument("--checkpoint", metavar="DIR", help="a run or convert output (with --to-torch)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    add_force_argument(p)
    p.set_defaults(run=convert, takes_config_overrides=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("summary", help="per-stage shapes, parameters and multiply-adds of a model")
    p.add_argument("model", nargs="?", help="model name, e.g. resnet50, resnet20, wrn28_10 (see `resnet-jax models`)")
    p.add_argument("--checkpoint", metavar="DIR", help="instead of a name: the model of this run (e.g. channel-pruned)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("H", "W", "C"), help="default 224 224 3 or 32 32 3")
    p.add_argument("--num-classes", type=int, default=None, help="default 1000 (ImageNet models) or 10 (CIFAR)")
    p.set_defaults(run=summary)
    add_train_and_eval_commands(commands)

    p = commands.add_parser(
        "download",
        help="fetch a data set ahead of training (MNIST and Fashion-MNIST checked against pinned SHA-256 sums)",
        epilog="Where it goes without --data-dir: ~/.cache/resnet-jax/datasets/DATASET (or $RESNET_JAX_DATA_DIR/"
        "DATASET) for mnist and fashion_mnist, tfds' data folder (~/tensorflow_datasets) for cifar10 and cifar100. "
        "imagenet2012 cannot be downloaded automatically (its licence): the command says how to prepare it. "
        "imagenet_synthetic is written, not fetched: ImageNet-shaped JPEGs in tfds' and torchvision's layouts, to "
        "benchmark the JPEG pipeline (a few minutes on two cores).",
    )
    p.add_argument("dataset", help="fashion_mnist, mnist, cifar10, cifar100 or imagenet_synthetic")
    p.add_argument("--data-dir", metavar="DIR", help="where to put it (the data_dir config key of training)")
    p.set_defaults(run=download)

    p = commands.add_parser("models", help="list the named models")
    p.set_defaults(run=list_names)

    add_convert_command(commands)

    p = commands.add_parser(
        "predict",
        help="top-k classes of image files (JPEG, PNG) under a checkpoint",
        description=f"Top-k classes of image files under a checkpoint. {PREPROCESSING}",
    )
    add_image_arguments(p)
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.set_defaults(run=predict)

    p = commands.add_parser(
        "features",
        help="feature maps (c2..c5) and pre-logits of image files under a checkpoint, to an .npz file",
        description=f"Feature maps and pre-logits of image files under a checkpoint, saved with numpy.savez (one "
        f"NHWC array per feature, and the image paths). {PREPROCESSING}",
    )
    add_image_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="the .npz file to write (.npz is added if missing)")
    add_force_argument(p)
    p.add_argument("--feature", action="append", default=[], help="e.g. c5 (repeatable; default: c2..c5, pre_logits)")
    p.set_defaults(run=features)
    add_analyze_command(commands)
    add_bench_command(commands)
    add_export_command(commands)
    add_compress_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_host_memory()  # before JAX starts its threads (resnet_jax/cpu/host_memory.py says why)
    args, extra = build_parser().parse_known_args(argv)
    args.overrides = [a for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    takes_overrides = args.command == "train" or getattr(args, "takes_config_overrides", False)
    if unknown or (args.overrides and not takes_overrides):
        build_parser().error(f"unrecognised arguments: {' '.join(unknown or args.overrides)}")
    try:
        result = args.run(args)
    except KeyboardInterrupt:  # Ctrl-C where no handler waits for it (before training, in other commands)
        print(f"resnet-jax {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as error:
        status = exit_status(error)
        if status is None:
            raise
        prefix = "" if status >= 128 else "error: "
        print(f"resnet-jax {args.command}: {prefix}{error}", file=sys.stderr)
        return status
    return result if isinstance(result, int) else 0  # `train --cpu-processes` returns its processes' status


# Exit status by kind of fault: each is one line on stderr, without a traceback (docs/scale-and-faults.md).
DIVERGED = 1  # a non-finite loss or parameters
BAD_INPUT = 2  # a config, argument or file to change, or what the user must fetch or install
CORRUPT_DATA = 65  # a damaged checkpoint or data file (sysexits' EX_DATAERR)
STORAGE_FAULT = 74  # a full disk, a read-only or unwritable place (EX_IOERR)
WORKDIR_IN_USE = 75  # another run holds the workdir: try again later (EX_TEMPFAIL)
# 128 + N: stopped by signal N after saving a checkpoint, the shell's convention.


def exit_status(error: Exception) -> int | None:
    """The exit status of a fault that the command reports in one line; None for a bug (its traceback shows)."""
    from resnet_jax.data.download import DownloadError
    from resnet_jax.extras import MissingExtraError
    from resnet_jax.faults import CorruptDataError, StorageError, WorkdirInUseError, find_storage_error
    from resnet_jax.train.loop import TrainingInterruptedError

    if isinstance(error, TrainingInterruptedError):
        return 128 + error.signum
    if find_storage_error(error) is not None:  # whatever wraps it: a ValueError of tensorstore, say
        return STORAGE_FAULT
    kinds = [
        (FloatingPointError, DIVERGED),
        (CorruptDataError, CORRUPT_DATA),
        (StorageError, STORAGE_FAULT),
        (WorkdirInUseError, WORKDIR_IN_USE),
        ((ValueError, FileNotFoundError, DownloadError, MissingExtraError), BAD_INPUT),
    ]
    return next((status for kind, status in kinds if isinstance(error, kind)), None)


if __name__ == "__main__":
    sys.exit(main())
