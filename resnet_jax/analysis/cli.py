"""``resnet-jax analyze TOOL|all``: one subcommand per entry of the table of analysis tools (`tools.TOOLS`),
and ``all``, which runs every entry into one report folder (jax is imported only when an analysis runs)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from resnet_jax.analysis import report
from resnet_jax.analysis.tools import MODELS_AND_CHECKPOINTS_HELP, TOOLS, Tool

NAMES = tuple(tool.name for tool in TOOLS)


def add_analyze_command(commands: Any) -> None:
    """Add ``analyze`` and its subcommands to the ``resnet-jax`` subparsers ``commands``."""
    analyze = commands.add_parser("analyze", help="gradient-theory analyses of models and checkpoints")
    subcommands = analyze.add_subparsers(dest="tool", required=True, metavar="NAME")
    for tool in TOOLS:
        p = subcommands.add_parser(tool.name, help=tool.help, description=tool.description, epilog=tool.epilog)
        tool.add_arguments(p)
        p.set_defaults(run=tool.check_and_run, takes_config_overrides=tool.takes_config_overrides)
    add_all_arguments(
        subcommands.add_parser(
            "all",
            help="every analysis into one report folder (index.html and index.md with every plot and table)",
            description=f"Runs {', '.join(NAMES)} on the models and checkpoints with each tool's defaults, each "
            "into its own subfolder of --out (the degradation runs train in OUT/degradation/runs and resume if "
            "interrupted), and writes OUT/index.html and OUT/index.md: each analysis's finding, headline tables, "
            "plots and time. Settings of one tool: --tool-args, or run it alone.",
            epilog=MODELS_AND_CHECKPOINTS_HELP + " Any key of the degradation config can be overridden: "
            "--config.KEY=VALUE.",
        )
    )


def add_all_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--skip", action="append", default=[], choices=NAMES, help="leave an analysis out (repeatable)")
    p.add_argument(
        "--tool-args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="options for one analysis, e.g. --tool-args 'paths=--samples 1000' (repeatable; see its --help)",
    )
    p.set_defaults(run=run_all, takes_config_overrides=True)


def run_all(args: argparse.Namespace) -> None:
    """Every analysis of the models and checkpoints into one report folder, then its index.html and index.md.

    Every tool's options are parsed and checked before the first one runs: a mistake in the last one's
    costs no time."""
    from resnet_jax.train.reporting import format_duration

    if not args.model and not args.checkpoint:
        raise ValueError("Nothing to analyse: give --model NAME (at initialisation) and/or --checkpoint DIR.")
    out = args.out or Path("analysis") / f"{(args.model or [Path(args.checkpoint[0]).name])[0]}-report"
    planned = plan_all(args, out)
    for tool, tool_args in planned:
        tool.check(tool_args)
    sections = []
    for number, (tool, tool_args) in enumerate(planned, 1):
        print(f"[{number}/{len(planned)}] analyze {tool.name}", flush=True)
        with report.Stopwatch() as watch:
            result = tool.run(tool_args)
        sections.append(tool.section(result, out / tool.name, watch.seconds))
    names = [*args.model, *args.checkpoint]
    if args.model and len(args.model) == len(args.checkpoint):
        names = [f"{name} ({run})" for name, run in zip(args.model, args.checkpoint, strict=True)]
    index, _ = report.write_report(out, "resnet-jax analysis report", names, sections)
    total = sum(section.seconds for section in sections)
    print(f"report -> {index} ({format_duration(total)} for {len(sections)} analyses)")


def plan_all(args: argparse.Namespace, out: Path) -> list[tuple[Tool, argparse.Namespace]]:
    """Each tool that ``analyze all`` runs, with its options: those ``all`` hands it, then its --tool-args,
    parsed by its own parser (which exits on an unknown option), writing into OUT/<name>."""
    options = tool_options(args.tool_args)
    planned = []
    for tool in TOOLS:
        if tool.name in args.skip:
            continue
        if tool.needs_checkpoints and not args.checkpoint:
            print(f"analyze {tool.name}: left out, it follows training runs (give --checkpoint DIR)")
            continue
        argv = [*tool.options_in_all(args), *options.get(tool.name, []), "--out", str(out / tool.name)]
        tool_args = tool.parser().parse_args(argv)
        tool_args.overrides = args.overrides if tool.takes_config_overrides else []
        planned.append((tool, tool_args))
    return planned


def tool_options(pairs: list[str]) -> dict[str, list[str]]:
    """{"paths": ["--samples", "1000"]} from ["paths=--samples 1000"], checked before anything runs."""
    by_name = {tool.name: tool for tool in TOOLS}
    options: dict[str, list[str]] = {}
    for pair in pairs:
        name, _, tool_args = pair.partition("=")
        tool = by_name.get(name)
        if tool is None or tool.takes_config_overrides:
            choices = ", ".join(t.name for t in TOOLS if not t.takes_config_overrides)
            configured = ", ".join(t.name for t in TOOLS if t.takes_config_overrides)
            raise ValueError(
                f"--tool-args {pair!r}: give NAME=OPTIONS with NAME one of {choices} (the {configured} runs take "
                "--config.KEY=VALUE)."
            )
        options.setdefault(name, []).extend(shlex.split(tool_args))
    return options
