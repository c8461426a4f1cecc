"""The documentation works as written: every ``resnet-jax`` command in the README, docs/, benchmarks/ and the config
docstrings parses with the real parser, its ``--config.KEY=VALUE`` overrides apply to the config it names, and the
quick ones run (with their shown output); Python examples import what they name; every relative link resolves.

Commands are read from fenced code blocks (continuation lines joined, ``# comments`` dropped, commands inside quoted
shell arguments found too) and from the indented command lines of config docstrings.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from resnet_jax.cli import build_parser, main
from resnet_jax.models import create_model
from resnet_jax.train.config import load_config

REPO = Path(__file__).resolve().parent.parent
PAGES = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "benchmarks").glob("*.md")),
    REPO / "colabs" / "README.md",
]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))
RUNNABLE = ("summary", "models")  # subcommands that finish in seconds: the test runs them
SHELL_SEPARATORS = {"&&", "||", ";", "|", "&", ">", ">>", "2>", "<"}
FENCE = re.compile(r"^[ \t]*```([^\n]*)\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Command:
    where: str  # page:line, for the test id and failure messages
    argv: tuple[str, ...]  # what follows `resnet-jax`
    shown_output: tuple[str, ...] | None = None  # the lines a `$ resnet-jax ...` block shows after the command


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """(info string, body, line number of the body's first line) of every fenced block, indented ones too."""
    return [(m[1].strip(), textwrap.dedent(m[2]), text.count("\n", 0, m.start(2)) + 1) for m in FENCE.finditer(text)]


def logical_lines(body: str, first_line: int) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined, each with the number of the line it starts on."""
    joined: list[tuple[int, str]] = []
    pending, start = "", first_line
    for number, line in enumerate(body.splitlines(), first_line):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append((start, pending + line))
        pending = ""
    if pending:
        joined.append((start, pending))
    return joined


def subcommands() -> set[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(actions[0].choices)


def commands_in(line: str, names: set[str]) -> list[tuple[str, ...]]:
    """The argument lists of every `resnet-jax SUBCOMMAND ...` in one shell line, quoted ones included."""
    if "resnet-jax" not in line:
        return []
    tokens = shlex.split(line, comments=True)
    found = []
    for i, token in enumerate(tokens):
        if " " in token:  # a quoted shell command, e.g. gcloud's --command="cd ... && resnet-jax train ..."
            found += commands_in(token.split("=", 1)[1] if token.startswith("-") else token, names)
        if token.rsplit("/", 1)[-1] == "resnet-jax" and i + 1 < len(tokens) and tokens[i + 1] in names:
            end = next((j for j in range(i + 1, len(tokens)) if tokens[j] in SHELL_SEPARATORS), len(tokens))
            found.append(tuple(tokens[i + 1 : end]))
    return found


def page_commands(page: Path, names: set[str]) -> list[Command]:
    commands = []
    for info, body, first in code_blocks(page.read_text()):
        if info in ("python", "text"):  # code, or what a command printed
            continue
        lines = logical_lines(body, first)
        for index, (number, line) in enumerate(lines):
            where = f"{relative(page)}:{number}"
            if line.startswith("$ "):  # a command and the output it prints, up to the next prompt
                output = []
                for _, text in lines[index + 1 :]:
                    if text.startswith("$ "):
                        break
                    output.append(text.rstrip())
                commands += [Command(where, argv, tuple(output)) for argv in commands_in(line[2:], names)]
            else:
                commands += [Command(where, argv) for argv in commands_in(line, names)]
    return commands


def docstring_commands(path: Path, names: set[str]) -> list[Command]:
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    lines = logical_lines(docstring, 1)
    return [
        Command(f"{relative(path)}:docstring", argv)
        for _, line in lines
        if line.strip().startswith("resnet-jax ")
        for argv in commands_in(line.strip(), names)
    ]


NAMES = subcommands()
COMMANDS = [c for page in PAGES for c in page_commands(page, NAMES)] + [
    c for path in CONFIG_FILES for c in docstring_commands(path, NAMES)
]


def test_the_pages_have_commands_to_check():
    where = {c.where.split(":")[0] for c in COMMANDS}
    assert {"README.md", "docs/training.md", "docs/analysis.md", "docs/speed.md"} <= where
    assert any(c.argv[:2] == ("summary", "resnet50") and c.shown_output for c in COMMANDS)


def parse(command: Command) -> tuple[argparse.Namespace, list[str]]:
    """The real parser's namespace and the --config.KEY=VALUE overrides, refused as `resnet-jax` refuses them."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args, extra = build_parser().parse_known_args(list(command.argv))
    except SystemExit:
        pytest.fail(f"{command.where}: `resnet-jax {shlex.join(command.argv)}` does not parse: {errors.getvalue()}")
    overrides = [a for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    assert not unknown, f"{command.where}: unrecognised arguments {unknown}"
    takes_overrides = args.command == "train" or getattr(args, "takes_config_overrides", False)
    assert takes_overrides or not overrides, f"{command.where}: `{args.command}` takes no --config.KEY=VALUE"
    return args, overrides


def config_of(args: argparse.Namespace) -> str | None:
    """The config file a command reads (its overrides apply to it)."""
    if args.command == "analyze" and args.tool == "all":
        return args.degradation_config
    return getattr(args, "config", None)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where}:{' '.join(c.argv[:2])}")
def test_command_parses_and_its_config_overrides_apply(command):
    args, overrides = parse(command)
    path = config_of(args)
    if args.command == "bench" and path is None:
        assert not overrides, f"{command.where}: bench takes --config.KEY=VALUE only with --config FILE"
    if path is not None:
        try:
            config = load_config(REPO / path, overrides)
            create_model(config.model)
        except (ValueError, FileNotFoundError) as error:
            pytest.fail(f"{command.where}: {error}")
    models = getattr(args, "model", None) or []  # analyze's --model is a list; summary's, bench's and convert's a name
    for name in [models] if isinstance(models, str) else models:
        create_model(name)
    for pair in getattr(args, "tool_args", None) or []:  # analyze all --tool-args 'TOOL=OPTIONS'
        tool, _, options = pair.partition("=")
        parse(Command(command.where, ("analyze", tool, *shlex.split(options))))


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if c.argv[0] in RUNNABLE], ids=lambda c: f"{c.where}:{' '.join(c.argv)}"
)
def test_quick_command_runs_and_prints_what_the_page_shows(command):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(list(command.argv))
    assert status == 0, f"{command.where}: `resnet-jax {shlex.join(command.argv)}` exited with {status}"
    if command.shown_output:
        shown = [line for line in command.shown_output if line]
        assert printed.getvalue().rstrip().splitlines() == shown, f"{command.where}: the shown output is out of date"


def python_imports() -> list[tuple[str, str, tuple[str, ...]]]:
    """(page:line, module, names) of every `resnet_jax` import in the pages' Python blocks."""
    imports = []
    for page in PAGES:
        for info, body, first in code_blocks(page.read_text()):
            if info != "python":
                continue
            for node in ast.walk(ast.parse(body)):
                where = f"{relative(page)}:{first + getattr(node, 'lineno', 1) - 1}"
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("resnet_jax"):
                    imports.append((where, node.module, tuple(alias.name for alias in node.names)))
                elif isinstance(node, ast.Import):
                    imports += [(where, a.name, ()) for a in node.names if a.name.startswith("resnet_jax")]
    return imports


@pytest.mark.parametrize(("where", "module", "names"), python_imports())
def test_python_example_imports_exist(where, module, names):
    imported = importlib.import_module(module)
    missing = [name for name in names if not hasattr(imported, name)]
    assert not missing, f"{where}: {module} has no {missing}"


@pytest.mark.slow  # the block applies the model un-jitted, op by op, which compiles every operation on its own
def test_readme_model_example_runs():
    """The quick start's model block, executed as it stands."""
    text = (REPO / "README.md").read_text()
    block = next(body for info, body, _ in code_blocks(text) if info == "python" and "create_model(" in body)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (8, 10)
    assert {"stem", "c0", "c1", "c2", "pre_logits"} <= set(namespace["features"])


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(h) for h in HEADING.findall(text)}


def links() -> list[tuple[str, str]]:
    """(page, link) of every relative link outside code blocks."""
    found = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if not re.match(r"[a-z]+:", target):  # not https:, mailto:
                found.append((relative(page), target))
    return found


def test_pages_link_somewhere():
    assert len(links()) > 50


@pytest.mark.parametrize(("page", "link"), links())
def test_relative_link_resolves(page, link):
    path, _, anchor = link.partition("#")
    target = (REPO / page).parent / path if path else REPO / page
    assert target.exists(), f"{page} links to {path}, which does not exist"
    if anchor and target.suffix == ".md":
        assert anchor in anchors(target), f"{page} links to #{anchor}, not a heading of {path or page}"
