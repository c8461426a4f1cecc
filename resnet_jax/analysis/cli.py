"""``resnet-jax analyze jacobian|gradflow``: the analysis tools as subcommands (jax is imported only when one runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SUBJECTS_HELP = (
    "What to analyse: --model NAME (repeatable) analyses each model at initialisation; --checkpoint DIR "
    "(repeatable) analyses the training run in DIR (a `resnet-jax train` --workdir) at its latest checkpoint. "
    "With both, give one --model per --checkpoint, in the same order; each must be the model that the run "
    "trained. To compare residual with plain nets, name both: --model resnet20 --model plain20, or "
    "--model resnet20 --checkpoint runs/resnet20 --model plain20 --checkpoint runs/plain20."
)


def add_analyze_command(commands: Any) -> None:
    """Add ``analyze`` and its subcommands to the ``resnet-jax`` subparsers ``commands``."""
    analyze = commands.add_parser("analyze", help="block Jacobians and gradient flow of models and checkpoints")
    tools = analyze.add_subparsers(dest="tool", required=True, metavar="NAME")

    p = tools.add_parser(
        "jacobian",
        help="block Jacobians, the I + dF/dh identities, the chain rule and end-to-end spectra",
        description="Per residual block (BN in inference mode): top singular values (Lanczos) and Frobenius norms "
        "(Hutchinson) of J = dh_l/dh_l-1 and of the branch Jacobian J_F, each example's Jacobian averaged over "
        "--examples images; the identity J = D(S + J_F) or S + J_F checked on probes, and exactly on a small "
        "--exact-size copy of the first image together with the estimators' errors; the chain rule of block "
        "Jacobians against the model's own map; the singular values of d pre_logits / d input for the first image. "
        "Writes jacobian.json, jacobian_blocks.csv, jacobian_depth.png and jacobian_spectrum.png.",
        epilog=SUBJECTS_HELP,
    )
    _add_common_arguments(p, examples=2)
    p.add_argument("--iterations", type=int, default=30, help="Lanczos steps per Jacobian (default 30)")
    p.add_argument("--probes", type=int, default=64, help="Hutchinson probes per Jacobian (default 64)")
    p.add_argument("--top-k", type=int, default=3, help="top singular values to report (default 3)")
    p.add_argument(
        "--exact-size",
        type=int,
        default=8,
        help="side of the resized image on which Jacobians are formed exactly (default 8; 0 skips)",
    )
    p.set_defaults(run=run_jacobian)

    p = tools.add_parser(
        "gradflow",
        help="norms of the loss gradient per block and per layer, plain against residual, along training",
        description="Norms of the gradient of the mean cross-entropy of --examples test images (BN in training "
        "mode, as the optimiser sees it) with respect to every block output and every conv/dense layer's output "
        "and parameters. Writes gradflow.json and gradflow.png (log scale, one curve per model and checkpoint; "
        "--init --all-checkpoints follows each run from its initialisation).",
        epilog=SUBJECTS_HELP,
    )
    _add_common_arguments(p, examples=64)
    p.set_defaults(run=run_gradflow)


def _add_common_arguments(p: argparse.ArgumentParser, examples: int) -> None:
    p.add_argument("--model", action="append", default=[], help="model name at initialisation (repeatable)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR", help="training workdir (repeatable)")
    p.add_argument("--all-checkpoints", action="store_true", help="every checkpoint each run keeps, not the latest")
    p.add_argument("--init", action="store_true", help="also each run's initialisation (step 0), first")
    p.add_argument("--out", type=Path, default=None, help="output folder (default analysis/<first model>)")
    p.add_argument("--dataset", default=None, help="data set of the images (default: the runs' one, or fashion_mnist)")
    p.add_argument("--data-dir", default=None, help="where the data set is (default: its usual place)")
    p.add_argument("--split", default="test", help="split the images come from (default test)")
    p.add_argument("--examples", type=int, default=examples, help=f"images in the batch (default {examples})")
    p.add_argument("--input-size", type=int, default=None, help="pad (or resize) images to N x N, e.g. 32")
    p.add_argument("--seed", type=int, default=0, help="initialisation of --model and the random probes")


def run_jacobian(args: argparse.Namespace) -> None:
    """Write the block-Jacobian analysis of the subjects to the output folder."""
    from resnet_jax.analysis.common import load_images
    from resnet_jax.analysis.jacobians import BlockJacobians, analyze_jacobians

    jacobians = BlockJacobians(args.iterations, args.probes, args.top_k)  # checks the settings before any work
    subjects, batch, dataset, data_dir = _load(args)
    exact = None
    if args.exact_size:
        exact = load_images(dataset, args.split, data_dir, count=1, size=args.exact_size).images
    out = _out(args, subjects)
    report = analyze_jacobians(subjects, batch.images, out, exact_images=exact, jacobians=jacobians, seed=args.seed)
    summary = report["summary"]
    print(
        f"{len(subjects)} model(s) -> {out}: largest identity deviation {summary['largest_deviation']:.2e}, "
        f"chain rule {summary['largest_chain_rule_error']:.2e}"
    )


def run_gradflow(args: argparse.Namespace) -> None:
    """Write the gradient-flow analysis of the subjects to the output folder."""
    from resnet_jax.analysis.gradflow import analyze_gradflow

    subjects, batch, _, _ = _load(args)
    out = _out(args, subjects)
    analyze_gradflow(subjects, batch.images, batch.labels, out)
    print(f"{len(subjects)} curve(s) -> {out}")


def _load(args: argparse.Namespace) -> tuple[list, Any, str, str | None]:
    """The subjects, the batch of images, and the data set's name and folder."""
    from resnet_jax.analysis.common import init_subject, load_images, run_subjects

    models, runs = args.model, args.checkpoint
    if not models and not runs:
        raise ValueError("Nothing to analyse: give --model NAME (at initialisation) and/or --checkpoint DIR.")
    if runs and models and len(models) != len(runs):
        raise ValueError(
            f"{len(models)} --model for {len(runs)} --checkpoint: with checkpoints, give one --model per "
            "--checkpoint (in the same order) or none."
        )
    if (args.init or args.all_checkpoints) and not runs:
        raise ValueError("--init and --all-checkpoints pick the checkpoints of --checkpoint runs; give a run.")
    if args.examples < 1:
        raise ValueError(f"--examples {args.examples}: analyse at least one image.")
    subjects = [s for run in runs for s in run_subjects(run, args.all_checkpoints, args.init)]
    paired = zip(models, runs, strict=True) if runs and models else ()
    for name, run in paired:
        trained = next(s.name for s in subjects if s.workdir == Path(run))
        if trained != name:
            raise ValueError(f"{run} is a run of {trained}, not {name}; fix --model or --checkpoint.")
    dataset = args.dataset or (subjects[0].config.dataset if subjects else "fashion_mnist")
    data_dir = args.data_dir or (subjects[0].config.data_dir if subjects else None)
    for subject in subjects:
        if subject.config.dataset != dataset:
            raise ValueError(
                f"{subject.workdir} trained on {subject.config.dataset}, not {dataset}; pass --dataset "
                f"{subject.config.dataset} (and analyse runs of one data set together)."
            )
    batch = load_images(dataset, args.split, data_dir, count=args.examples, size=args.input_size)
    if not runs:
        subjects = [init_subject(name, batch.images.shape[1:], batch.num_classes, args.seed) for name in models]
    return subjects, batch, dataset, data_dir


def _out(args: argparse.Namespace, subjects: list) -> Path:
    return args.out or Path("analysis") / subjects[0].name
