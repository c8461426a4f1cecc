"""The analysis tools as one table: everything `resnet-jax analyze TOOL` and `analyze all` need of each.

A `Tool` holds, once, its name and help, the options it adds to its parser, a check of those options
(run before any model is loaded or any program compiled), its run function (the parsed options in, the
report dict out, its files written to --out) and its section of the `analyze all` report page.
`resnet_jax.analysis.cli` builds one subcommand per entry of `TOOLS`; `analyze all` runs the entries in
order, each with its own parser for the options that ``--tool-args NAME=OPTIONS`` gives it.

This module imports no analysis module at the top: the command line imports it to build its parsers,
and jax is loaded only when an analysis runs (the run and check functions import what they call).

Adding a tool
-------------
1. Write the analysis as library code in its own module, ``resnet_jax/analysis/<name>.py``: a function
   ``analyze_<name>(snapshots, images, ..., out, **settings) -> dict`` that writes its JSON, CSV and PNG
   files into ``out`` and returns the JSON's content, and a function that rejects impossible settings
   (see `paths.check_path_settings`), with tests of its own.
2. Register it here, one entry in `TOOLS`, and next to it its four functions:
   - ``add_arguments(parser)``: `add_snapshot_arguments` (the --model/--checkpoint/--examples/... options
     that every analysis of models and checkpoints shares) and the tool's own options;
   - ``check(args)``: `check_snapshot_request` and the module's settings check;
   - ``run(args)``: `load_inputs`, ``analyze_<name>`` on them, a line printed per model;
   - ``section(report, folder, seconds)``: a `report.Section`, one finding and the headline tables.
   `analyze <name>`, and `analyze all` with its --skip and --tool-args, take it from the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from resnet_jax.analysis.report import Section, summary_table

if TYPE_CHECKING:
    from resnet_jax.analysis.common import Batch, ModelSnapshot

Report = dict[str, Any]

MODELS_AND_CHECKPOINTS_HELP = (
    "What to analyse: --model NAME (repeatable) analyses each model at initialisation; --checkpoint DIR "
    "(repeatable) analyses the training run in DIR (a `resnet-jax train` --workdir) at its latest checkpoint. "
    "With both, give one --model per --checkpoint, in the same order; each must be the model that the run "
    "trained. To compare residual with plain nets, name both: --model resnet20 --model plain20, or "
    "--model resnet20 --checkpoint runs/resnet20 --model plain20 --checkpoint runs/plain20."
)


def snapshot_options_in_all(all_args: argparse.Namespace) -> list[str]:
    """The options `analyze all` hands each analysis of models and checkpoints: the models, checkpoints, seed and
    data set that it was given."""
    options = [f"--model={name}" for name in all_args.model]
    options += [f"--checkpoint={run}" for run in all_args.checkpoint]
    options.append(f"--seed={all_args.seed}")
    options += [f"--dataset={all_args.dataset}"] if all_args.dataset else []
    options += [f"--data-dir={all_args.data_dir}"] if all_args.data_dir else []
    return options


@dataclasses.dataclass(frozen=True)
class Tool:
    """One analysis, as the command line and the report page see it."""

    name: str  # the subcommand, and the report's subfolder
    help: str  # one line, in `resnet-jax analyze --help`
    description: str  # what it measures and which files it writes, in `resnet-jax analyze NAME --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    check: Callable[[argparse.Namespace], None]  # raises ValueError on bad options, before any work
    run: Callable[[argparse.Namespace], Report]
    section: Callable[[Report, Path, float], Section]
    epilog: str = MODELS_AND_CHECKPOINTS_HELP
    # The options `analyze all` parses with this tool's parser (before its --tool-args), from its own arguments.
    options_in_all: Callable[[argparse.Namespace], list[str]] = snapshot_options_in_all
    takes_config_overrides: bool = False  # --config.KEY=VALUE: a training config (degradation)
    # It follows training runs (trajectory): `analyze all` leaves it out when given no --checkpoint.
    needs_checkpoints: bool = False

    def parser(self) -> argparse.ArgumentParser:
        """A parser of this tool's options alone (what `analyze all` reads --tool-args with)."""
        parser = argparse.ArgumentParser(prog=f"resnet-jax analyze {self.name}", description=self.description)
        self.add_arguments(parser)
        return parser

    def check_and_run(self, args: argparse.Namespace) -> Report:
        """The analysis, once its options are checked."""
        self.check(args)
        return self.run(args)


# --- what every analysis of models and checkpoints shares ---------------------------------------------------


def add_snapshot_arguments(p: argparse.ArgumentParser, examples: int, split: str = "test") -> None:
    """The models and checkpoints to analyse, the images to analyse them on, the output folder and the seed."""
    p.add_argument("--model", action="append", default=[], help="model name at initialisation (repeatable)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR", help="training workdir (repeatable)")
    p.add_argument("--all-checkpoints", action="store_true", help="every checkpoint each run keeps, not the latest")
    p.add_argument("--init", action="store_true", help="also each run's initialisation (step 0), first")
    p.add_argument("--out", type=Path, default=None, help="output folder (default analysis/<first model>)")
    p.add_argument("--dataset", default=None, help="data set of the images (default: the runs' one, or fashion_mnist)")
    p.add_argument("--data-dir", default=None, help="where the data set is (default: its usual place)")
    p.add_argument("--split", default=split, help="split the images come from (default %(default)s)")
    p.add_argument("--examples", type=int, default=examples, help=f"images in the batch (default {examples})")
    p.add_argument("--input-size", type=int, default=None, help="pad (or resize) images to N x N, e.g. 32")
    p.add_argument("--seed", type=int, default=0, help="initialisation of --model and the random probes")
    p.set_defaults(default_models=[])  # analysed when neither --model nor --checkpoint is given


def requested_models(args: argparse.Namespace) -> list[str]:
    """The --model names; with neither --model nor --checkpoint, the tool's default models (if it has any)."""
    return args.model or ([] if args.checkpoint else list(args.default_models))


def check_snapshot_request(args: argparse.Namespace) -> None:
    """Reject a request that names nothing to analyse, or models and checkpoints that do not pair up."""
    models, runs = requested_models(args), args.checkpoint
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


class AnalysisInputs(NamedTuple):
    """What an analysis of models and checkpoints runs on, and where it writes."""

    snapshots: list[ModelSnapshot]
    batch: Batch
    dataset: str
    data_dir: str | None
    out: Path


def load_inputs(args: argparse.Namespace) -> AnalysisInputs:
    """The snapshots (each --model at initialisation, or each --checkpoint run's checkpoints), the batch of
    images, and the output folder; a run that is not of its --model, or of another data set, is refused."""
    from resnet_jax.analysis.common import init_snapshot, load_images, run_snapshots, tell_apart

    models, runs = requested_models(args), args.checkpoint
    snapshots = tell_apart([s for run in runs for s in run_snapshots(run, args.all_checkpoints, args.init)])
    for name, run in zip(models, runs, strict=True) if runs and models else ():
        trained = next(s.name for s in snapshots if s.workdir == Path(run))
        if trained != name:
            raise ValueError(f"{run} is a run of {trained}, not {name}; fix --model or --checkpoint.")
    dataset = args.dataset or (snapshots[0].config.dataset if snapshots else "fashion_mnist")
    data_dir = args.data_dir or (snapshots[0].config.data_dir if snapshots else None)
    for snapshot in snapshots:
        if snapshot.config.dataset != dataset:
            raise ValueError(
                f"{snapshot.workdir} trained on {snapshot.config.dataset}, not {dataset}; pass --dataset "
                f"{snapshot.config.dataset} (and analyse runs of one data set together)."
            )
    batch = load_images(dataset, args.split, data_dir, count=args.examples, size=args.input_size)
    if not runs:
        snapshots = [init_snapshot(name, batch.images.shape[1:], batch.num_classes, args.seed) for name in models]
    return AnalysisInputs(snapshots, batch, dataset, data_dir, args.out or Path("analysis") / snapshots[0].name)


# --- jacobian -----------------------------------------------------------------------------------------------


def add_jacobian_arguments(p: argparse.ArgumentParser) -> None:
    add_snapshot_arguments(p, examples=2)
    p.add_argument("--iterations", type=int, default=30, help="Lanczos steps per Jacobian (default 30)")
    p.add_argument("--probes", type=int, default=64, help="Hutchinson probes per Jacobian (default 64)")
    p.add_argument("--top-k", type=int, default=3, help="top singular values to report (default 3)")
    p.add_argument(
        "--exact-size",
        type=int,
        default=8,
        help="side of the resized image on which Jacobians are formed exactly (default 8; 0 skips)",
    )


def check_jacobian(args: argparse.Namespace) -> None:
    from resnet_jax.analysis.jacobians import BlockJacobians

    check_snapshot_request(args)
    BlockJacobians(args.iterations, args.probes, args.top_k)  # checks its settings


def run_jacobian(args: argparse.Namespace) -> Report:
    from resnet_jax.analysis.common import load_images
    from resnet_jax.analysis.jacobians import BlockJacobians, analyze_jacobians

    inputs = load_inputs(args)
    exact = None
    if args.exact_size:
        exact = load_images(inputs.dataset, args.split, inputs.data_dir, count=1, size=args.exact_size).images
    jacobians = BlockJacobians(args.iterations, args.probes, args.top_k)
    report = analyze_jacobians(
        inputs.snapshots, inputs.batch.images, inputs.out, exact_images=exact, jacobians=jacobians, seed=args.seed
    )
    summary = report["summary"]
    print(
        f"{len(inputs.snapshots)} model(s) -> {inputs.out}: largest identity deviation "
        f"{summary['largest_deviation']:.2e}, chain rule {summary['largest_chain_rule_error']:.2e}"
    )
    return report


def jacobian_section(report: Report, folder: Path, seconds: float) -> Section:
    table = []
    for model in report["models"]:
        top_f = [row["sv_F"][0] for row in model["blocks"]]
        top_j = [row["sv_J"][0] for row in model["blocks"]]
        table.append(
            {
                "subject": model["label"],
                "blocks": len(model["blocks"]),
                "median top sv of J_F": float(statistics.median(top_f)),
                "median top sv of J": float(statistics.median(top_j)),
                "min top sv of J": float(min(top_j)),
                "chain rule error": model["chain_rule"]["relative_error"],
                "end-to-end condition": model["end_to_end"]["condition"],
            }
        )
    summary = report["summary"]
    finding = (
        f"Every block obeys its identity (J = D(I + J_F) and its variants) to {summary['largest_deviation']:.1e}; "
        f"the product of block Jacobians matches the model's own to {summary['largest_chain_rule_error']:.1e}."
    )
    return Section("Block Jacobians (I + dF/dh)", folder, finding, {"Top singular values per block": table}, seconds)


JACOBIAN = Tool(
    name="jacobian",
    help="block Jacobians, the I + dF/dh identities, the chain rule and end-to-end spectra",
    description="Per residual block (BN in inference mode): top singular values (Lanczos) and Frobenius norms "
    "(Hutchinson) of J = dh_l/dh_l-1 and of the branch Jacobian J_F, each example's Jacobian averaged over "
    "--examples images; the identity J = D(S + J_F) or S + J_F checked on probes, and exactly on a small "
    "--exact-size copy of the first image together with the estimators' errors; the chain rule of block "
    "Jacobians against the model's own map; the singular values of d pre_logits / d input for the first image. "
    "Writes jacobian.json, jacobian_blocks.csv, jacobian_depth.png and jacobian_spectrum.png.",
    add_arguments=add_jacobian_arguments,
    check=check_jacobian,
    run=run_jacobian,
    section=jacobian_section,
)


# --- gradflow -----------------------------------------------------------------------------------------------


def add_gradflow_arguments(p: argparse.ArgumentParser) -> None:
    add_snapshot_arguments(p, examples=64)


def run_gradflow(args: argparse.Namespace) -> Report:
    from resnet_jax.analysis.gradflow import analyze_gradflow

    inputs = load_inputs(args)
    report = analyze_gradflow(inputs.snapshots, inputs.batch.images, inputs.batch.labels, inputs.out)
    print(f"{len(inputs.snapshots)} curve(s) -> {inputs.out}")
    return report


def gradflow_section(report: Report, folder: Path, seconds: float) -> Section:
    table = [
        {
            "subject": run["label"],
            "loss": run["loss"],
            "‖dL/dh‖ first block": run["blocks"][0]["output_grad"],
            "‖dL/dh‖ last block": run["blocks"][-1]["output_grad"],
            "first / last": run["first_to_last_block_ratio"],
        }
        for run in report["runs"]
    ]
    ratios = ", ".join(f"{row['subject']} {row['first / last']:.3g}" for row in table)
    finding = f"Gradient norm at the first block over the last (below 1: it shrinks on the way back): {ratios}."
    return Section("Gradient flow", folder, finding, {"Gradient at the block outputs": table}, seconds)


GRADFLOW = Tool(
    name="gradflow",
    help="norms of the loss gradient per block and per layer, plain against residual, along training",
    description="Norms of the gradient of the mean cross-entropy of --examples test images (BN in training "
    "mode, as the optimiser sees it) with respect to every block output and every conv/dense layer's output "
    "and parameters. Writes gradflow.json and gradflow.png (log scale, one curve per model and checkpoint; "
    "--init --all-checkpoints follows each run from its initialisation).",
    add_arguments=add_gradflow_arguments,
    check=check_snapshot_request,
    run=run_gradflow,
    section=gradflow_section,
)


# --- paths --------------------------------------------------------------------------------------------------


def add_paths_arguments(p: argparse.ArgumentParser) -> None:
    add_snapshot_arguments(p, examples=256, split="train")  # Veit et al. measure on training batches
    p.add_argument("--samples", type=int, default=50, help="measurements per path length (default 50; paper: 1000)")
    p.add_argument("--batch-size", type=int, default=32, help="images per measurement (default 32)")
    p.add_argument("--chunk", type=int, default=32, help="measurements per compiled call; lower it to save memory")
    p.add_argument("--fraction", type=float, default=0.9, help="share of the gradient the range reported carries")


def check_paths(args: argparse.Namespace) -> None:
    from resnet_jax.analysis.paths import check_path_settings

    check_snapshot_request(args)
    check_path_settings(args.samples, args.batch_size, args.examples, args.chunk, args.fraction)


def run_paths(args: argparse.Namespace) -> Report:
    from resnet_jax.analysis.paths import analyze_paths

    inputs = load_inputs(args)
    settings = dict(samples=args.samples, batch_size=args.batch_size, chunk=args.chunk, fraction=args.fraction)
    batch = inputs.batch
    report = analyze_paths(inputs.snapshots, batch.images, batch.labels, inputs.out, **settings, seed=args.seed)
    print(f"{len(report['models'])} model(s) -> {inputs.out}")
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


def paths_section(report: Report, folder: Path, seconds: float) -> Section:
    table = summary_table(report["summary"])
    fraction = report["settings"]["fraction"]
    per_model = "; ".join(
        f"{row['subject']}: lengths {row['effective_range'][0]}-{row['effective_range'][1]} of {row['blocks']} "
        f"(expected {row['expected_length']:.1f}, against {row['mean_path_length']:.1f} for all paths)"
        for row in table
    )
    finding = f"The central {fraction:.0%} of the gradient comes from paths of {per_model or 'no residual subject'}."
    return Section("Paths: residual nets as ensembles", folder, finding, {"Effective path lengths": table}, seconds)


PATHS = Tool(
    name="paths",
    help="residual nets as ensembles of paths: path lengths and the gradient each length carries (Veit et al.)",
    description="The distribution of path lengths, Binomial(n, 1/2) for n residual blocks (downsampling ones "
    "included), and the gradient paths of each length carry: BN in inference mode, the backward pass through "
    "the residual branch of k random blocks and only the skip of the others, ||dL/d images|| on random batches "
    "of --batch-size of the --examples images (training images by default, as Veit et al.), --samples "
    "measurements per length (Veit et al. take 1000; the default 50 suits a CPU). Reports the lengths that "
    "carry the central --fraction of the contributions C(n, k) E||g_k||. Plain nets have no paths: they are "
    "skipped. Writes paths.json, paths.csv and paths.png.",
    add_arguments=add_paths_arguments,
    check=check_paths,
    run=run_paths,
    section=paths_section,
)


# --- lesion -------------------------------------------------------------------------------------------------


def add_lesion_arguments(p: argparse.ArgumentParser) -> None:
    add_snapshot_arguments(p, examples=1000)
    p.add_argument("--draws", type=int, default=5, help="deletion sets per k and orders per swap count (default 5)")
    p.add_argument("--batch-size", type=int, default=250, help="images per compiled call (default 250)")


def check_lesion(args: argparse.Namespace) -> None:
    from resnet_jax.analysis.lesion import check_lesion_settings

    check_snapshot_request(args)
    check_lesion_settings(args.draws, args.batch_size)


def run_lesion(args: argparse.Namespace) -> Report:
    from resnet_jax.analysis.lesion import analyze_lesions

    inputs = load_inputs(args)
    batch = inputs.batch
    settings = dict(draws=args.draws, batch_size=args.batch_size, seed=args.seed)
    report = analyze_lesions(inputs.snapshots, batch.images, batch.labels, inputs.out, **settings)
    print(f"{len(inputs.snapshots)} model(s) -> {inputs.out}")
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


def lesion_section(report: Report, folder: Path, seconds: float) -> Section:
    table = []
    for label, summary in report["summary"].items():
        row = {key: value for key, value in summary.items() if not isinstance(value, dict)}
        table.append({"subject": label, **row, **{f"delete {k}": v for k, v in summary["downsampling_errors"].items()}})
    per_model = "; ".join(
        f"{row['subject']}: baseline error {row['baseline_error']:.3f}, one block deleted "
        + (f"{row['single_mean_error']:.3f} on average" if row["single_mean_error"] is not None else "not possible")
        for row in table
    )
    finding = f"Test error {per_model}."
    return Section("Lesions", folder, finding, {"Test error after deleting one block": table}, seconds)


LESION = Tool(
    name="lesion",
    help="test error after deleting or reordering blocks at test time (Veit et al. 2016)",
    description="The error on --examples test images (BN in inference mode) with nothing deleted; after "
    "deleting each single block (y = shortcut(x); in a plain net y = x, shape-preserving blocks only); after "
    "deleting k random shape-preserving blocks (--draws sets per k); after 1, 2, ... random swaps of blocks "
    "within a stage (--draws orders each), against Kendall's tau of the order. One compiled program per model "
    "serves them all. Writes lesion.json and lesion_single, lesion_random and lesion_reorder .csv and .png.",
    add_arguments=add_lesion_arguments,
    check=check_lesion,
    run=run_lesion,
    section=lesion_section,
)


# --- landscape ----------------------------------------------------------------------------------------------


def add_landscape_arguments(p: argparse.ArgumentParser) -> None:
    add_snapshot_arguments(p, examples=256, split="train")  # Li et al. plot the training loss
    p.add_argument("--resolution", type=int, default=21, help="grid points per axis, odd (default 21: steps of 0.1)")
    p.add_argument("--chunk", type=int, default=1, help="grid points vectorised at once (default 1: fastest on CPU)")
    p.set_defaults(default_models=["resnet20", "plain20"])


def check_landscape(args: argparse.Namespace) -> None:
    from resnet_jax.analysis.landscape import grid_axis

    check_snapshot_request(args)
    grid_axis(args.resolution)  # checks the grid
    if args.chunk < 1:
        raise ValueError(f"--chunk {args.chunk}: evaluate at least one grid point at a time.")


def run_landscape(args: argparse.Namespace) -> Report:
    from resnet_jax.analysis.landscape import analyze_landscape

    inputs = load_inputs(args)
    settings = dict(resolution=args.resolution, seed=args.seed, chunk=args.chunk)
    report = analyze_landscape(inputs.snapshots, inputs.batch.images, inputs.batch.labels, inputs.out, **settings)
    print(f"{len(inputs.snapshots)} landscape(s) -> {inputs.out}")
    for row in report["summary"]:
        print(
            f"{row['label']}: centre loss {row['center_loss']:.4f} (accuracy {row['center_accuracy']:.4f}), max "
            f"{row['max_loss']:.4g}, beats chance on {row['basin_fraction']:.0%} of the plane, non-convex at "
            f"{row['nonconvex_fraction']:.0%} of its points"
        )
    return report


def landscape_section(report: Report, folder: Path, seconds: float) -> Section:
    table = summary_table(report["summary"])
    per_model = "; ".join(
        f"{row['label']}: loss {row['center_loss']:.3f} at the centre, {row['max_loss']:.3g} at most, better "
        f"than chance (loss under log(classes)) on {row['basin_fraction']:.0%} of the plane"
        for row in table
    )
    return Section("Loss landscape", folder, f"{per_model}.", {"Landscape on the plane": table}, seconds)


LANDSCAPE = Tool(
    name="landscape",
    help="the loss on a plane through the weights along filter-normalised random directions (Li et al. 2018)",
    description="Two Gaussian directions, each filter rescaled to the norm of the same filter of the weights "
    "(rank-1 tensors zero, BN statistics unchanged), drawn from --seed; the mean cross-entropy and accuracy of "
    "--examples images (BN in inference mode) at theta + a d1 + b d2 on a --resolution^2 grid over [-1, 1]^2, "
    "one compiled program per model. Writes landscape.json, landscape.csv, landscape_1d.png, "
    "landscape_contour.png and landscape_surface.png. Without --model or --checkpoint: resnet20 against "
    "plain20 at initialisation.",
    add_arguments=add_landscape_arguments,
    check=check_landscape,
    run=run_landscape,
    section=landscape_section,
)


# --- cka ----------------------------------------------------------------------------------------------------


def add_cka_arguments(p: argparse.ArgumentParser) -> None:
    add_snapshot_arguments(p, examples=256)
    p.add_argument("--batch-size", type=int, default=64, help="images per CKA minibatch, at least 4 (default 64)")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="initialise each --model from this many seeds (--seed, --seed + 1, ...): 2 compares two seeds of one "
        "model (of trained models: give both runs as --checkpoint)",
    )


def check_cka(args: argparse.Namespace) -> None:
    from resnet_jax.analysis.cka import check_batching

    check_snapshot_request(args)
    check_batching(args.examples, args.batch_size)
    if args.seeds < 1 or (args.seeds > 1 and args.checkpoint):
        raise ValueError(
            f"--seeds {args.seeds}: give 1 or more seeds for models at initialisation only; two seeds of trained "
            "models are two runs: --checkpoint RUN_SEED0 --checkpoint RUN_SEED1."
        )


def run_cka(args: argparse.Namespace) -> Report:
    from resnet_jax.analysis.cka import analyze_cka
    from resnet_jax.analysis.common import init_snapshot

    inputs = load_inputs(args)
    snapshots = inputs.snapshots
    if args.seeds > 1:
        shape, classes = inputs.batch.images.shape[1:], inputs.batch.num_classes
        seeds = range(args.seed, args.seed + args.seeds)
        snapshots = [
            dataclasses.replace(init_snapshot(s.name, shape, classes, seed), tag=f"seed {seed}")
            for s in snapshots
            for seed in seeds
        ]
    report = analyze_cka(snapshots, inputs.batch.images, inputs.out, batch_size=args.batch_size)
    print(f"{len(snapshots)} model(s) -> {inputs.out}")
    for run in report["runs"]:
        print(
            f"{run['label']}: CKA of adjacent blocks {_number(run['adjacent_cka'])}, first to last block "
            f"{run['first_last_cka']:.3f}, median ||F|| / ||skip|| {_number(_median(run['branch_to_skip']))}"
        )
    for pair in report["pairs"]:
        print(f"{' vs '.join(pair['labels'])}: CKA of matched blocks {_number(pair['matched_block_cka'])}")
    return report


def cka_section(report: Report, folder: Path, seconds: float) -> Section:
    models = [
        {
            "subject": run["label"],
            "blocks": len(run["blocks"]),
            "adjacent-block CKA": run["adjacent_cka"],
            "first-last CKA": run["first_last_cka"],
            "median ‖F‖ / ‖skip‖": _median(run["branch_to_skip"]),
        }
        for run in report["runs"]
    ]
    pairs = [{"pair": " vs ".join(p["labels"]), "matched-block CKA": p["matched_block_cka"]} for p in report["pairs"]]
    per_model = "; ".join(
        f"{row['subject']}: {_number(row['adjacent-block CKA'])} between neighbours, {row['first-last CKA']:.3f} "
        "first to last"
        for row in models
    )
    finding = f"Linear CKA of the block outputs (minibatch): {per_model}."
    tables = {"Similarity of a model's blocks": models}
    tables |= {"Blocks of two models against each other": pairs} if pairs else {}
    return Section("CKA: similarity of block outputs", folder, finding, tables, seconds)


def _median(values: list[float | None]) -> float | None:
    """The median of the values that exist (plain blocks have no branch-to-skip ratio), or None."""
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


CKA = Tool(
    name="cka",
    help="linear CKA between every pair of block outputs, and each residual branch against its skip",
    description="Minibatch linear CKA (Nguyen, Raghu & Kornblith 2021: the mean unbiased HSIC over minibatches "
    "of --batch-size, in memory that does not grow with --examples) between the outputs of every two blocks, "
    "BN in inference mode: within each model, and between every two models (residual against plain, two seeds "
    "of one model: --seeds 2, or two --checkpoint runs). Also ||F(x)|| / ||s(x)|| per block, the size of the "
    "residual branch against its skip (||F(x)|| / ||x|| for identity shortcuts), mean over the images. "
    "Writes cka.json, cka_branch.csv, cka.png (the heatmaps) and cka_branch.png.",
    add_arguments=add_cka_arguments,
    check=check_cka,
    run=run_cka,
    section=cka_section,
)


# --- features -----------------------------------------------------------------------------------------------


def add_features_arguments(p: argparse.ArgumentParser) -> None:
    add_snapshot_arguments(p, examples=4)
    p.add_argument("--top", type=int, default=3, help="most active channels shown per stage (default 3)")


def check_features(args: argparse.Namespace) -> None:
    check_snapshot_request(args)
    if args.top < 1:
        raise ValueError(f"--top {args.top}: show at least one channel per stage.")


def run_features(args: argparse.Namespace) -> Report:
    from resnet_jax.analysis.feature_maps import analyze_features

    inputs = load_inputs(args)
    report = analyze_features(inputs.snapshots, inputs.batch.images, inputs.out, top=args.top)
    print(f"{len(inputs.snapshots)} model(s), {args.examples} image(s) -> {inputs.out}")
    return report


def features_section(report: Report, folder: Path, seconds: float) -> Section:
    table = [
        {
            "subject": run["label"],
            "stage": name,
            "shape": stage["shape"],
            "top channel activity": float(statistics.mean(row[0] for row in stage["activity"])),
        }
        for run in report["runs"]
        for name, stage in run["stages"].items()
    ]
    last = {row["subject"]: row["top channel activity"] for row in table}  # each subject's last stage
    finding = (
        f"Feature maps of {report['settings']['examples']} image(s) per stage. Mean |activation| of the last stage's "
        "most active channel: " + ", ".join(f"{subject} {value:.3g}" for subject, value in last.items()) + "."
    )
    return Section(
        "Feature maps", folder, finding, {"Most active channel per stage (mean over images)": table}, seconds
    )


FEATURES = Tool(
    name="features",
    help="feature maps of every stage as images: channel means and the most active channels",
    description="For each of --examples images (the first ones of --split) and each stage output (the stem's "
    "and every stage's, BN in inference mode): the mean over channels and the --top channels with the largest "
    "mean |activation|. Writes features.json (per stage: shape, top channels, their activities) and "
    "features_<n>_<label>.png, one picture per model and checkpoint.",
    add_arguments=add_features_arguments,
    check=check_features,
    run=run_features,
    section=features_section,
)


# --- hessian ------------------------------------------------------------------------------------------------


def add_hessian_arguments(p: argparse.ArgumentParser) -> None:
    add_snapshot_arguments(p, examples=64, split="train")  # the training loss's curvature, as the optimiser sees
    p.add_argument("--steps", type=int, default=20, help="Lanczos steps per run (default 20)")
    p.add_argument("--runs", type=int, default=2, help="Lanczos runs from random starts, for the density (default 2)")
    p.add_argument("--probes", type=int, default=10, help="Hutchinson probes for the trace (default 10)")
    p.add_argument("--top-k", type=int, default=5, help="top eigenvalues to report (default 5)")
    p.add_argument("--chunk-size", type=int, default=None, help="images per H v program (default: the whole batch)")
    p.add_argument(
        "--broadening", type=float, default=0.01, help="density's Gaussian width, share of the spectral range"
    )


def check_hessian(args: argparse.Namespace) -> None:
    from resnet_jax.analysis.hessian import check_settings

    check_snapshot_request(args)
    check_settings(args.steps, args.runs, args.probes, args.top_k)
    if args.chunk_size is not None and (args.chunk_size < 1 or args.examples % args.chunk_size):
        raise ValueError(f"--chunk-size {args.chunk_size} must divide --examples {args.examples}.")
    if args.broadening <= 0:
        raise ValueError(f"--broadening {args.broadening}: the density's Gaussian width must be positive.")


def run_hessian(args: argparse.Namespace) -> Report:
    from resnet_jax.analysis.hessian import analyze_hessian

    inputs = load_inputs(args)
    settings = dict(steps=args.steps, runs=args.runs, probes=args.probes, top_k=args.top_k, seed=args.seed)
    batch = inputs.batch
    report = analyze_hessian(
        inputs.snapshots,
        batch.images,
        batch.labels,
        inputs.out,
        **settings,
        chunk_size=args.chunk_size,
        broadening=args.broadening,
    )
    print(f"{len(inputs.snapshots)} model(s) -> {inputs.out}")
    for row in report["summary"]:
        print(
            f"{row['label']}: lambda_max {row['lambda_max']:.4g}, lambda_min {row['lambda_min']:.4g}, trace "
            f"{row['trace']:.4g} +- {row['trace_stderr']:.2g}"
        )
    return report


def hessian_section(report: Report, folder: Path, seconds: float) -> Section:
    table = summary_table(report["summary"])
    per_model = "; ".join(
        f"{row['label']}: lambda_max {row['lambda_max']:.3g}, trace {row['trace']:.3g}, |lambda_min| / lambda_max "
        f"{_number(row['negative_ratio'])}"
        for row in table
    )
    finding = f"Loss Hessian on one batch (BN in inference mode): {per_model}."
    return Section("Hessian spectrum", folder, finding, {"Top eigenvalue, trace, negative curvature": table}, seconds)


HESSIAN = Tool(
    name="hessian",
    help="the loss Hessian's top eigenvalues, trace and eigenvalue density (Lanczos, Hutchinson, SLQ)",
    description="The Hessian of the mean cross-entropy of one fixed batch of --examples images (training "
    "images by default; BN in inference mode) with respect to all parameters, through Hessian-vector products "
    "(forward over reverse, one compiled program per model): --runs Lanczos runs of --steps from random starts "
    "give the top eigenvalues and the eigenvalue density (stochastic Lanczos quadrature, Ghorbani et al. 2019), "
    "--probes Hutchinson probes (deflated by the first run's basis) the trace. Along training: --checkpoint RUN "
    "--init --all-checkpoints. Writes hessian.json, hessian.csv, hessian_density.png and hessian_top.png.",
    add_arguments=add_hessian_arguments,
    check=check_hessian,
    run=run_hessian,
    section=hessian_section,
)


# --- trajectory ---------------------------------------------------------------------------------------------


def add_trajectory_arguments(p: argparse.ArgumentParser) -> None:
    add_snapshot_arguments(p, examples=256, split="train")  # Li et al. plot the training loss
    p.add_argument("--resolution", type=int, default=11, help="grid points per axis of the plane (default 11)")
    p.add_argument("--margin", type=float, default=0.25, help="grid beyond the path, share of its extent per side")
    p.add_argument("--chunk", type=int, default=1, help="grid points vectorised at once (default 1: fastest on CPU)")
    p.add_argument(
        "--interpolation-points", type=int, default=11, help="alphas in [0, 1] between two runs' final weights"
    )
    p.set_defaults(init=True, all_checkpoints=True)  # a path: every checkpoint a run keeps, from its start


def check_trajectory(args: argparse.Namespace) -> None:
    if not args.checkpoint:
        raise ValueError("A trajectory follows training runs: give --checkpoint DIR (a `resnet-jax train` workdir).")
    check_snapshot_request(args)
    if args.resolution < 2 or args.margin < 0 or args.chunk < 1:
        raise ValueError(
            f"--resolution {args.resolution}, --margin {args.margin}, --chunk {args.chunk}: use a grid of 2 or more "
            "points per axis, a margin >= 0 and a chunk of at least 1."
        )
    if args.interpolation_points < 2:
        raise ValueError(f"--interpolation-points {args.interpolation_points}: use at least 2 (both ends).")


def run_trajectory(args: argparse.Namespace) -> Report:
    import numpy as np

    from resnet_jax.analysis.trajectory import analyze_trajectory

    inputs = load_inputs(args)
    batch = inputs.batch
    settings = dict(resolution=args.resolution, margin=args.margin, chunk=args.chunk)
    alphas = tuple(np.linspace(0.0, 1.0, args.interpolation_points))
    report = analyze_trajectory(inputs.snapshots, batch.images, batch.labels, inputs.out, **settings, alphas=alphas)
    print(f"{len(report['runs'])} run(s) -> {inputs.out}")
    for run in report["runs"]:
        first, second = run["explained_variance"]
        print(f"{run['label']}: {len(run['steps'])} checkpoints, PCA plane {first:.1%} + {second:.1%} of the variance")
    for line in report["interpolations"]:
        print(f"{' vs '.join(line['labels'])}: loss barrier {_number(line['barrier'])}")
    return report


def trajectory_section(report: Report, folder: Path, seconds: float) -> Section:
    runs = [
        {
            "subject": run["label"],
            "checkpoints": len(run["steps"]),
            "variance on PC1": float(run["explained_variance"][0]),
            "variance on PC2": float(run["explained_variance"][1]),
            "least in plane": float(min(run["in_plane"][:-1])),
        }
        for run in report["runs"]
    ]
    lines = [
        {
            "pair": " vs ".join(line["labels"]),
            "loss barrier": line["barrier"],
            "highest loss on the line": float(max(line["loss"])),
        }
        for line in report["interpolations"]
    ]
    per_run = "; ".join(
        f"{row['subject']}: {row['variance on PC1'] + row['variance on PC2']:.0%} of the spread of its "
        f"{row['checkpoints']} checkpoints, at least {row['least in plane']:.0%} of each one's distance to the end"
        for row in runs
    )
    finding = f"What the PCA plane of each path shows: {per_run}."
    tables = {"Paths in their PCA planes": runs}
    tables |= {"Interpolation between final weights": lines} if lines else {}
    return Section("Optimisation trajectory", folder, finding, tables, seconds)


TRAJECTORY = Tool(
    name="trajectory",
    help="a run's path over the loss in its PCA plane (Li et al. 2018), and interpolation between two solutions",
    description="For each --checkpoint run: its initialisation and every checkpoint it keeps (at least 4 in "
    "all; --config.keep_checkpoints while training), PCA of theta_i - theta_final, the path in the plane of the "
    "first two directions over the loss contours on that plane (a --resolution^2 grid, --margin beyond the "
    "path; --examples training images, BN in inference mode with the final running statistics). Between the "
    "final weights of every two runs of one model (e.g. two seeds): the loss and accuracy at "
    "--interpolation-points alphas, and the barrier. Writes trajectory.json, trajectory.csv, trajectory.png and "
    "interpolation.png.",
    epilog="Give runs: --checkpoint RUN (repeatable), with --model NAME for each if you like.",
    add_arguments=add_trajectory_arguments,
    check=check_trajectory,
    run=run_trajectory,
    section=trajectory_section,
    needs_checkpoints=True,
)


# --- degradation --------------------------------------------------------------------------------------------


def add_degradation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default="configs/degradation_fashion_mnist.py", help="recipe and depths (default %(default)s)"
    )
    p.add_argument("--out", type=Path, default=Path("analysis/degradation"), help="output folder (default %(default)s)")


def check_degradation(args: argparse.Namespace) -> None:
    from resnet_jax.analysis.degradation import check_depths
    from resnet_jax.train.config import load_config
    from resnet_jax.train.runs import check_config

    config = load_config(args.config, args.overrides)
    check_depths(config)
    check_config(config)


def run_degradation(args: argparse.Namespace) -> Report:
    from resnet_jax.analysis.degradation import analyze_degradation
    from resnet_jax.train.config import load_config

    report = analyze_degradation(load_config(args.config, args.overrides), args.out)
    print(f"{len(report['runs'])} runs -> {args.out}: {report['summary']['statement']}")
    return report


def degradation_section(report: Report, folder: Path, seconds: float) -> Section:
    summary = report["summary"]
    return Section("Degradation", folder, summary["statement"], {"Final errors (%)": summary["final"]}, seconds)


def degradation_options_in_all(all_args: argparse.Namespace) -> list[str]:
    return ["--config", all_args.degradation_config]


DEGRADATION = Tool(
    name="degradation",
    help="train plain and residual nets of several depths with one recipe; their error curves (He et al. Fig. 6)",
    description="Trains plain<d> and resnet<d> for every d of the config's depths with the config's recipe, "
    "each in OUT/runs/<model> (a rerun resumes unfinished runs and leaves finished ones alone), and plots "
    "training (thin) and test (bold) error against step, plain nets left, residual nets right. Writes "
    "degradation.json and degradation.png.",
    epilog="Any key of the config can be overridden: --config.KEY=VALUE (e.g. --config.depths=(8,14)).",
    add_arguments=add_degradation_arguments,
    check=check_degradation,
    run=run_degradation,
    section=degradation_section,
    options_in_all=degradation_options_in_all,
    takes_config_overrides=True,
)


# What `analyze all` runs, in this order, each into OUT/<name>: the quick analyses first, training last.
TOOLS: tuple[Tool, ...] = (
    JACOBIAN,
    GRADFLOW,
    CKA,
    FEATURES,
    PATHS,
    LESION,
    HESSIAN,
    LANDSCAPE,
    TRAJECTORY,
    DEGRADATION,
)
