"""``resnet-jax analyze jacobian|gradflow|paths|lesion|landscape|degradation|all``: the analysis tools as
subcommands (jax is imported only when one runs)."""

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

# What `analyze all` runs, in order: each writes into OUT/<name>.
REPORT_TOOLS = ("jacobian", "gradflow", "paths", "lesion", "landscape", "degradation")


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

    p = tools.add_parser(
        "landscape",
        help="the loss on a plane through the weights along filter-normalised random directions (Li et al. 2018)",
        description="Two Gaussian directions, each filter rescaled to the norm of the same filter of the weights "
        "(rank-1 tensors zero, BN statistics unchanged), drawn from --seed; the mean cross-entropy and accuracy of "
        "--examples images (BN in inference mode) at theta + a d1 + b d2 on a --resolution^2 grid over [-1, 1]^2, "
        "one compiled program per model. Writes landscape.json, landscape.csv, landscape_1d.png, "
        "landscape_contour.png and landscape_surface.png. Without --model or --checkpoint: resnet20 against "
        "plain20 at initialisation.",
        epilog=SUBJECTS_HELP,
    )
    _add_common_arguments(p, examples=256)
    p.set_defaults(split="train")  # Li et al. plot the training loss
    p.add_argument("--resolution", type=int, default=21, help="grid points per axis, odd (default 21: steps of 0.1)")
    p.add_argument("--chunk", type=int, default=1, help="grid points vectorised at once (default 1: fastest on CPU)")
    p.set_defaults(run=run_landscape)

    p = tools.add_parser(
        "degradation",
        help="train plain and residual nets of several depths with one recipe; their error curves (He et al. Fig. 6)",
        description="Trains plain<d> and resnet<d> for every d of the config's depths with the config's recipe, "
        "each in OUT/runs/<model> (a rerun resumes unfinished runs and leaves finished ones alone), and plots "
        "training (thin) and test (bold) error against step, plain nets left, residual nets right. Writes "
        "degradation.json and degradation.png.",
        epilog="Any key of the config can be overridden: --config.KEY=VALUE (e.g. --config.depths=(8,14)).",
    )
    p.add_argument(
        "--config", default="configs/degradation_fashion_mnist.py", help="recipe and depths (default %(default)s)"
    )
    p.add_argument("--out", type=Path, default=Path("analysis/degradation"), help="output folder (default %(default)s)")
    p.set_defaults(run=run_degradation, takes_config_overrides=True)

    p = tools.add_parser(
        "paths",
        help="residual nets as ensembles of paths: path lengths and the gradient each length carries (Veit et al.)",
        description="The distribution of path lengths, Binomial(n, 1/2) for n residual blocks (downsampling ones "
        "included), and the gradient paths of each length carry: BN in inference mode, the backward pass through "
        "the residual branch of k random blocks and only the skip of the others, ||dL/d images|| on random batches "
        "of --batch-size of the --examples images (training images by default, as Veit et al.), --samples "
        "measurements per length (Veit et al. take 1000; the default 50 suits a CPU). Reports the lengths that "
        "carry the central --fraction of the contributions C(n, k) E||g_k||. Plain nets have no paths: they are "
        "skipped. Writes paths.json, paths.csv and paths.png.",
        epilog=SUBJECTS_HELP,
    )
    _add_common_arguments(p, examples=256)
    p.set_defaults(split="train")  # Veit et al. measure on training batches
    p.add_argument("--samples", type=int, default=50, help="measurements per path length (default 50; paper: 1000)")
    p.add_argument("--batch-size", type=int, default=32, help="images per measurement (default 32)")
    p.add_argument("--chunk", type=int, default=32, help="measurements per compiled call; lower it to save memory")
    p.add_argument("--fraction", type=float, default=0.9, help="share of the gradient the range reported carries")
    p.set_defaults(run=run_paths)

    p = tools.add_parser(
        "lesion",
        help="test error after deleting or reordering blocks at test time (Veit et al. 2016)",
        description="The error on --examples test images (BN in inference mode) with nothing deleted; after "
        "deleting each single block (y = shortcut(x); in a plain net y = x, shape-preserving blocks only); after "
        "deleting k random shape-preserving blocks (--draws sets per k); after 1, 2, ... random swaps of blocks "
        "within a stage (--draws orders each), against Kendall's tau of the order. One compiled program per model "
        "serves them all. Writes lesion.json and lesion_single, lesion_random and lesion_reorder .csv and .png.",
        epilog=SUBJECTS_HELP,
    )
    _add_common_arguments(p, examples=1000)
    p.add_argument("--draws", type=int, default=5, help="deletion sets per k and orders per swap count (default 5)")
    p.add_argument("--batch-size", type=int, default=250, help="images per compiled call (default 250)")
    p.set_defaults(run=run_lesion)

    p = tools.add_parser(
        "all",
        help="every analysis into one report folder (index.html and index.md with every plot and table)",
        description="Runs jacobian, gradflow, paths, lesion and landscape on the subjects with each tool's "
        "defaults, each into its own subfolder of --out, then degradation with --degradation-config (its runs "
        "train in OUT/degradation/runs and resume if interrupted), and writes OUT/index.html and OUT/index.md: "
        "each analysis's finding, headline tables, plots and time. Settings of one tool: run it alone.",
        epilog=SUBJECTS_HELP + " Any key of the degradation config can be overridden: --config.KEY=VALUE.",
    )
    p.add_argument("--model", action="append", default=[], help="model name at initialisation (repeatable)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR", help="training workdir (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default analysis/<first model>-report)")
    p.add_argument("--dataset", default=None, help="data set of the images (default: the runs' one, or fashion_mnist)")
    p.add_argument("--data-dir", default=None, help="where the data set is (default: its usual place)")
    p.add_argument("--seed", type=int, default=0, help="initialisation of --model, probes, samples and directions")
    p.add_argument(
        "--degradation-config",
        default="configs/degradation_fashion_mnist.py",
        help="recipe and depths of the degradation runs (default %(default)s)",
    )
    p.add_argument(
        "--skip", action="append", default=[], choices=REPORT_TOOLS, help="leave an analysis out (repeatable)"
    )
    p.add_argument(
        "--tool-args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="options for one analysis, e.g. --tool-args 'paths=--samples 1000' (repeatable; see its --help)",
    )
    p.set_defaults(run=run_all, takes_config_overrides=True)


def _add_common_arguments(p: argparse.ArgumentParser, examples: int) -> None:
    p.add_argument("--model", action="append", default=[], help="model name at initialisation (repeatable)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR", help="training workdir (repeatable)")
    p.add_argument("--all-checkpoints", action="store_true", help="every checkpoint each run keeps, not the latest")
    p.add_argument("--init", action="store_true", help="also each run's initialisation (step 0), first")
    p.add_argument("--out", type=Path, default=None, help="output folder (default analysis/<first model>)")
    p.add_argument("--dataset", default=None, help="data set of the images (default: the runs' one, or fashion_mnist)")
    p.add_argument("--data-dir", default=None, help="where the data set is (default: its usual place)")
    p.add_argument("--split", default="test", help="split the images come from (default %(default)s)")
    p.add_argument("--examples", type=int, default=examples, help=f"images in the batch (default {examples})")
    p.add_argument("--input-size", type=int, default=None, help="pad (or resize) images to N x N, e.g. 32")
    p.add_argument("--seed", type=int, default=0, help="initialisation of --model and the random probes")


def run_jacobian(args: argparse.Namespace) -> dict[str, Any]:
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
    return report


def run_gradflow(args: argparse.Namespace) -> dict[str, Any]:
    """Write the gradient-flow analysis of the subjects to the output folder."""
    from resnet_jax.analysis.gradflow import analyze_gradflow

    subjects, batch, _, _ = _load(args)
    out = _out(args, subjects)
    report = analyze_gradflow(subjects, batch.images, batch.labels, out)
    print(f"{len(subjects)} curve(s) -> {out}")
    return report


def run_landscape(args: argparse.Namespace) -> dict[str, Any]:
    """Write the loss landscapes of the subjects (default: resnet20 against plain20) to the output folder."""
    from resnet_jax.analysis.landscape import analyze_landscape, grid_axis

    grid_axis(args.resolution)  # checks the grid before any work
    if args.chunk < 1:
        raise ValueError(f"--chunk {args.chunk}: evaluate at least one grid point at a time.")
    if not args.model and not args.checkpoint:
        args.model = ["resnet20", "plain20"]
    subjects, batch, _, _ = _load(args)
    out = _out(args, subjects)
    report = analyze_landscape(
        subjects, batch.images, batch.labels, out, resolution=args.resolution, seed=args.seed, chunk=args.chunk
    )
    print(f"{len(subjects)} landscape(s) -> {out}")
    for row in report["summary"]:
        print(
            f"{row['label']}: centre loss {row['center_loss']:.4f} (accuracy {row['center_accuracy']:.4f}), max "
            f"{row['max_loss']:.4g}, beats chance on {row['basin_fraction']:.0%} of the plane, non-convex at "
            f"{row['nonconvex_fraction']:.0%} of its points"
        )
    return report


def run_degradation(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume) the plain and residual nets of the config and write their error curves."""
    from resnet_jax.analysis.degradation import analyze_degradation
    from resnet_jax.train.config import load_config

    report = analyze_degradation(load_config(args.config, args.overrides), args.out)
    print(f"{len(report['runs'])} runs -> {args.out}: {report['summary']['statement']}")
    return report


def run_paths(args: argparse.Namespace) -> dict[str, Any]:
    """Write the paths analysis of the residual subjects to the output folder."""
    from resnet_jax.analysis.paths import analyze_paths, check_path_settings

    check_path_settings(args.samples, args.batch_size, args.examples, args.chunk, args.fraction)
    subjects, batch, _, _ = _load(args)
    out = _out(args, subjects)
    settings = dict(samples=args.samples, batch_size=args.batch_size, chunk=args.chunk, fraction=args.fraction)
    report = analyze_paths(subjects, batch.images, batch.labels, out, **settings, seed=args.seed)
    print(f"{len(report['models'])} model(s) -> {out}")
    for label, row in report["summary"].items():
        lo, hi = row["effective_range"]
        print(
            f"{label}: {args.fraction:.0%} of the gradient comes from paths through {lo}-{hi} of its {row['blocks']} "
            f"residual branches (expected length {row['expected_length']:.2f}; each branch on a path scales the "
            f"gradient by {row['gain_per_branch']:.3g})"
        )
    for label, reason in report["skipped"].items():
        print(f"{label}: skipped ({reason})")
    return report


def run_lesion(args: argparse.Namespace) -> dict[str, Any]:
    """Write the lesion studies of the subjects to the output folder."""
    from resnet_jax.analysis.lesion import analyze_lesions, check_lesion_settings

    check_lesion_settings(args.draws, args.batch_size)
    subjects, batch, _, _ = _load(args)
    out = _out(args, subjects)
    report = analyze_lesions(
        subjects, batch.images, batch.labels, out, draws=args.draws, batch_size=args.batch_size, seed=args.seed
    )
    print(f"{len(subjects)} model(s) -> {out}")
    for label, row in report["summary"].items():
        single = "no shape-preserving block"
        if row["single_mean_error"] is not None:
            single = f"mean {row['single_mean_error']:.3f}, worst {row['single_max_error']:.3f}"
        down = ", ".join(
            f"{name} {'not deletable' if error is None else f'{error:.3f}'}"
            for name, error in row["downsampling_errors"].items()
        )
        print(f"{label}: baseline error {row['baseline_error']:.3f}; one block deleted: {single}; downsampling: {down}")
    return report


def run_all(args: argparse.Namespace) -> None:
    """Every analysis of the subjects into one report folder, then its index.html and index.md."""
    from resnet_jax.analysis import report as pages
    from resnet_jax.cli import build_parser
    from resnet_jax.train.config import load_config
    from resnet_jax.train.reporting import format_duration

    if not args.model and not args.checkpoint:
        raise ValueError("Nothing to analyse: give --model NAME (at initialisation) and/or --checkpoint DIR.")
    tools = [tool for tool in REPORT_TOOLS if tool not in args.skip]
    extra = _tool_args(args.tool_args)
    if "degradation" in tools:  # a bad config fails now, not after the other analyses
        from resnet_jax.analysis.degradation import check_depths

        check_depths(load_config(args.degradation_config, args.overrides))
    out = args.out or Path("analysis") / f"{(args.model or [Path(args.checkpoint[0]).name])[0]}-report"
    subjects = [f"--model={name}" for name in args.model] + [f"--checkpoint={run}" for run in args.checkpoint]
    shared = [*subjects, f"--seed={args.seed}"]
    shared += [f"--dataset={args.dataset}"] * bool(args.dataset) + [f"--data-dir={args.data_dir}"] * bool(args.data_dir)
    parser, planned, sections = build_parser(), [], []
    for tool in tools:  # every tool's options are parsed (and refused) before the first one runs
        argv = ["analyze", tool, *shared]
        if tool == "degradation":
            argv = ["analyze", tool, "--config", args.degradation_config]
        tool_args = parser.parse_args([*argv, *extra.get(tool, []), "--out", str(out / tool)])
        tool_args.overrides = args.overrides if tool == "degradation" else []
        planned.append((tool, tool_args))
    for number, (tool, tool_args) in enumerate(planned, 1):
        print(f"[{number}/{len(planned)}] analyze {tool}", flush=True)
        with pages.Stopwatch() as watch:
            report = tool_args.run(tool_args)
        sections.append(getattr(pages, f"{tool}_section")(report, out / tool, watch.seconds))
    names = [*args.model, *args.checkpoint]
    if args.model and len(args.model) == len(args.checkpoint):
        names = [f"{name} ({run})" for name, run in zip(args.model, args.checkpoint, strict=True)]
    index, _ = pages.write_report(out, "resnet-jax analysis report", names, sections)
    total = sum(section.seconds for section in sections)
    print(f"report -> {index} ({format_duration(total)} for {len(sections)} analyses)")


def _tool_args(pairs: list[str]) -> dict[str, list[str]]:
    """{"paths": ["--samples", "1000"]} from ["paths=--samples 1000"], checked before anything runs."""
    import shlex

    extra: dict[str, list[str]] = {}
    for pair in pairs:
        tool, _, options = pair.partition("=")
        if tool not in REPORT_TOOLS[:-1]:
            raise ValueError(
                f"--tool-args {pair!r}: give NAME=OPTIONS with NAME one of {', '.join(REPORT_TOOLS[:-1])} "
                "(the degradation runs take --config.KEY=VALUE)."
            )
        extra.setdefault(tool, []).extend(shlex.split(options))
    return extra


def _load(args: argparse.Namespace) -> tuple[list, Any, str, str | None]:
    """The subjects, the batch of images, and the data set's name and folder."""
    from resnet_jax.analysis.common import init_snapshot, load_images, run_snapshots

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
    subjects = [s for run in runs for s in run_snapshots(run, args.all_checkpoints, args.init)]
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
        subjects = [init_snapshot(name, batch.images.shape[1:], batch.num_classes, args.seed) for name in models]
    return subjects, batch, dataset, data_dir


def _out(args: argparse.Namespace, subjects: list) -> Path:
    return args.out or Path("analysis") / subjects[0].name
