"""``resnet-jax export``: a run's checkpoint in a deployment format, checked in its runtime."""

from __future__ import annotations

import argparse
from typing import Any

from resnet_jax.deploy.formats import FORMATS


def export(args: argparse.Namespace) -> None:
    from resnet_jax.deploy.export import export_checkpoint

    meta = export_checkpoint(
        args.checkpoint,
        args.format,
        args.out,
        step=args.step,
        force=args.force,
        raw_input=args.include_preprocessing,
        num_check_images=args.check_images,
    )
    measured = meta["agreement_with_jax"]
    accuracy = (
        f", accuracy {measured['accuracy']:.4f} (JAX {measured['jax_accuracy']:.4f})" if "accuracy" in measured else ""
    )
    print(
        f"{args.checkpoint} -> {args.out} ({args.format}, {meta['size_bytes'] / 1e6:.1f} MB): on {measured['images']} "
        f"test images, max relative error {measured['max_relative_error']:.1e}, top-1 agreement "
        f"{measured['top1_agreement']:.4f}{accuracy}; {args.out}.json describes it"
    )


def add_export_command(commands: Any) -> None:
    p = commands.add_parser(
        "export",
        help="a run's checkpoint as StableHLO, TF SavedModel, TFLite (float32, int8) or ONNX, checked in its runtime",
        description="Export a checkpoint with its batch norm folded into the convs. The artifact is reloaded in its "
        "own runtime in a fresh process and its logits compared with the JAX model's on the run's test images "
        "(float32 formats: within 1e-4 relative and the same top-1 class on every image; int8: at most 2 points of "
        "accuracy lost). OUT.json beside it records the input shape and normalisation, class names, versions and "
        "the measured agreement. A quantized run (resnet-jax quantize) keeps its int8 weights and exports to "
        "stablehlo, savedmodel or tflite_int8 only, checked against its own int8 model. Formats other than "
        "stablehlo need pip install 'resnet-jax[export]'.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a training workdir or `convert` output")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, metavar="PATH", help="the file (a folder for savedmodel) to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--include-preprocessing",
        action="store_true",
        help="the artifact takes uint8 images as the data set stores them and resizes and normalises them itself",
    )
    p.add_argument("--check-images", type=int, default=256, metavar="N", help="test images to check on (default 256)")
    p.set_defaults(run=export)
