"""The compression commands of ``resnet-jax`` (jax is imported only when one runs)."""

from __future__ import annotations

import argparse
from typing import Any

CALIBRATION_HELP = (
    "minmax: the largest |x| seen; percentile: that percentile of |x| (--percentile); mse: the range whose int8 "
    "rounding has the least squared error (default %(default)s)"
)


def quantize(args: argparse.Namespace) -> None:
    """Write the int8 quantization of a run as a new run folder."""
    from resnet_jax.compress.quantize import quantization_settings, quantize_run

    settings = quantization_settings(args.calibration, args.calibration_images, args.percentile, args.arithmetic)
    meta = quantize_run(args.checkpoint, args.out, settings, args.step, args.qat_steps)
    print(
        f"quantized step {meta['step']} of {args.checkpoint} into {args.out} ({settings.calibration} calibration on "
        f"{settings.calibration_images} training images, {settings.arithmetic} arithmetic); evaluate it with "
        f"`resnet-jax eval --workdir {args.out}`"
    )


def compare(args: argparse.Namespace) -> None:
    """Measure runs side by side into a table and a plot."""
    from resnet_jax.compress.compare import compare_runs

    runs = []
    for spec in args.runs:
        label, sep, workdir = spec.partition("=")
        if not sep or not label or not workdir:
            raise ValueError(f"--run {spec!r}: give LABEL=DIR, e.g. --run int8=runs/int8.")
        runs.append((label, workdir))
    compare_runs(runs, args.out, args.batch_size)


def lowrank(args: argparse.Namespace) -> None:
    """Factorise a run's convs by SVD into a new run folder, then fine-tune it there."""
    from resnet_jax.compress.lowrank import lowrank_run

    meta = lowrank_run(args.checkpoint, args.out, args.energy, args.fine_tune_steps)
    ranks = meta["config"]["lowrank"]["ranks"]
    print(f"factorised {len(ranks)} convs of {args.checkpoint} at energy {args.energy} into {args.out}")


def prune_channels(args: argparse.Namespace) -> None:
    """Remove the branch channels with the smallest BN scales into a new run folder, then fine-tune it there."""
    from resnet_jax.compress.channels import prune_channels_run

    meta = prune_channels_run(args.checkpoint, args.out, args.fraction, args.fine_tune_steps)
    widths = meta["config"]["model_overrides"]["inner_widths"]
    print(f"pruned {args.fraction:.0%} of the branch channels of {args.checkpoint} into {args.out}: widths {widths}")


def add_compress_commands(commands: Any) -> None:
    """Add ``quantize``, ``prune-channels``, ``lowrank`` and ``compare`` to the ``resnet-jax`` subparsers
    ``commands``."""
    p = commands.add_parser(
        "quantize",
        help="int8 post-training quantization of a run, into a new run folder that eval and predict read",
        description="Quantizes every conv of a trained run to int8 (per-output-channel symmetric weights, one "
        "input scale per conv calibrated on training images) and writes the result as a run folder.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a training workdir (or convert output)")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the quantized run")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument(
        "--calibration", default="percentile", choices=("minmax", "percentile", "mse"), help=CALIBRATION_HELP
    )
    p.add_argument("--calibration-images", type=int, default=512, metavar="N", help="default %(default)s")
    p.add_argument("--percentile", type=float, default=99.99, help="of |x|, for percentile (default %(default)s)")
    p.add_argument(
        "--arithmetic",
        default="int8",
        choices=("int8", "float"),
        help="int8: int8 operands and int32 sums (XLA:CPU runs it); float: the same int8 values convolved in float32, "
        "for a backend without integer convolutions (default %(default)s)",
    )
    p.add_argument(
        "--qat-steps",
        type=int,
        default=0,
        metavar="N",
        help="quantization-aware fine-tuning first: N more training steps with int8 rounding in the forward pass "
        "(straight-through gradients), in OUT/qat (default 0: post-training quantization alone)",
    )
    p.set_defaults(run=quantize)

    p = commands.add_parser(
        "prune-channels",
        help="remove the branch channels with the smallest BN scales into a new run folder, then fine-tune it there",
        description="Ranks the channels between the two convs of every basic block's branch by |BN scale|, removes "
        "the smallest --fraction of them (each branch keeps one at least), writes the narrower model as the run's "
        "step N in --out and trains it --fine-tune-steps more steps there.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a training workdir")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the pruned run")
    p.add_argument("--fraction", type=float, default=0.5, help="of the branch channels to remove (default %(default)s)")
    p.add_argument("--fine-tune-steps", type=int, default=300, metavar="N", help="default %(default)s; 0: none")
    p.set_defaults(run=prune_channels)

    p = commands.add_parser(
        "lowrank",
        help="SVD factorisation of a run's convs into a new run folder, then a short fine-tune there",
        description="Replaces each conv with a window larger than 1x1 by a k-filter conv and a 1x1 conv, k the "
        "smallest rank keeping --energy of the squared singular values (where that stores fewer weights), writes "
        "the result as the run's step N in --out and trains it --fine-tune-steps more steps there.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a training workdir")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the factorised run")
    p.add_argument(
        "--energy", type=float, default=0.9, help="fraction of squared singular values kept (default %(default)s)"
    )
    p.add_argument("--fine-tune-steps", type=int, default=300, metavar="N", help="default %(default)s; 0: none")
    p.set_defaults(run=lowrank)

    p = commands.add_parser(
        "compare",
        help="test accuracy, size, multiply-adds and CPU latency of runs side by side (a table and a plot)",
        description="Measures the latest checkpoint of each run: test accuracy, conv sparsity, parameter and "
        "checkpoint bytes, multiply-adds and the median forward time of one batch; writes OUT/compression.md "
        "and OUT/compression.png.",
    )
    p.add_argument(
        "--run",
        dest="runs",
        action="append",
        required=True,
        metavar="LABEL=DIR",
        help="repeatable; the first is the reference",
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--batch-size", type=int, default=256, help="images per timed forward pass (default %(default)s)")
    p.set_defaults(run=compare)
