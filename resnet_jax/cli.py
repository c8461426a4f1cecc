"""The ``resnet-jax`` command: one subcommand per job, each a thin layer over a library call."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from resnet_jax.analysis.cli import add_analyze_command

if TYPE_CHECKING:
    from resnet_jax.models import ResNet


def summary(args: argparse.Namespace) -> None:
    """Print the per-stage table of output shapes, parameters and multiply-adds."""
    from resnet_jax.models import create_model
    from resnet_jax.models.complexity import format_summary, model_cost

    model = create_model(args.model, num_classes=args.num_classes)
    input_shape = tuple(args.input_size) if args.input_size else default_input_shape(model)
    print(format_summary(args.model, model_cost(model, input_shape), input_shape))


def train(args: argparse.Namespace) -> None:
    """Train (or resume) the experiment of ``--config`` in ``--workdir``."""
    from resnet_jax.train.config import load_config
    from resnet_jax.train.loop import train_and_evaluate

    train_and_evaluate(load_config(args.config, args.overrides), args.workdir)


def evaluate(args: argparse.Namespace) -> None:
    """Test metrics of a checkpoint of the run in ``--workdir``."""
    from resnet_jax.train.loop import evaluate as evaluate_run

    evaluate_run(args.workdir, args.step)


def throughput(args: argparse.Namespace) -> None:
    """Input-only against train-step images/s for a config: is the input pipeline the bottleneck?"""
    from resnet_jax.train.config import load_config
    from resnet_jax.train.loop import measure_throughput

    config = load_config(args.config, args.overrides)
    rates = measure_throughput(config, args.steps)
    print(
        f"{config.model} on {config.dataset}, batch {config.batch_size}: input {rates['input_img_per_s']:,.0f} img/s, "
        f"train step {rates['train_img_per_s']:,.0f} img/s (compiled in {rates['compile_seconds']:.1f}s)"
    )


def list_names(args: argparse.Namespace) -> None:
    """Print the named models, one a line."""
    from resnet_jax.models import list_models

    print("\n".join(list_models()))


def default_input_shape(model: ResNet) -> tuple[int, int, int]:
    """224x224 RGB for ImageNet models, 32x32 RGB for CIFAR ones."""
    return (224, 224, 3) if model.stem == "imagenet" else (32, 32, 3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("summary", help="per-stage shapes, parameters and multiply-adds of a model")
    p.add_argument("model", help="model name, e.g. resnet50, resnet20, wrn28_10 (see `resnet-jax models`)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("H", "W", "C"), help="default 224 224 3 or 32 32 3")
    p.add_argument("--num-classes", type=int, default=None, help="default 1000 (ImageNet models) or 10 (CIFAR)")
    p.set_defaults(run=summary)

    p = commands.add_parser(
        "train",
        help="train an experiment config",
        epilog="Any config key can be overridden: --config.KEY=VALUE (e.g. --config.num_train_steps=500).",
    )
    p.add_argument("--config", required=True, help="experiment file, e.g. configs/fashion_mnist_resnet20.py")
    p.add_argument("--workdir", required=True, help="where checkpoints, metrics and plots go; resumes if present")
    p.set_defaults(run=train)

    p = commands.add_parser("throughput", help="input-only and train-step images/s of a config")
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=50, help="timed steps (medians are reported)")
    p.set_defaults(run=throughput)

    p = commands.add_parser("eval", help="evaluate the latest (or a given) checkpoint of a run")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.set_defaults(run=evaluate)

    p = commands.add_parser("models", help="list the named models")
    p.set_defaults(run=list_names)
    add_analyze_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    args.overrides = [a for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown or (args.overrides and args.command not in ("train", "throughput")):
        build_parser().error(f"unrecognised arguments: {' '.join(unknown or args.overrides)}")
    from resnet_jax.train.loop import TrainingInterruptedError

    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:  # bad user input: one clear line, no traceback
        print(f"resnet-jax {args.command}: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        print(f"resnet-jax {args.command}: error: {error}", file=sys.stderr)
        return 1
    except TrainingInterruptedError as stopped:
        print(f"resnet-jax {args.command}: {stopped}", file=sys.stderr)
        return 128 + stopped.signum  # the shell's convention for "ended by this signal"
    return 0


if __name__ == "__main__":
    sys.exit(main())
