"""What a benchmark leaves: one line per row (ratios last, for grep), a Markdown table for the README, and
``<date>-<device>.json`` with the device, library versions and the command that produced it."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from resnet_jax.bench.harness import Settings, StepRow, ratio
from resnet_jax.bench.inputs import InputRow

if TYPE_CHECKING:
    from resnet_jax.bench.epochs import EpochRow

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch")
# Settings that change the timings without changing the command.
ENVIRONMENT = ("XLA_FLAGS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "XLA_PYTHON_CLIENT_PREALLOCATE")
MIB = 2**20


def case_lines(rows: Sequence[StepRow]) -> list[str]:
    """One line per JAX runner of a case, one for each further JAX runner against the first ending in
    ``relative=`` (its img/s over the first's), then one per pair of JAX and torch runners ending in
    ``ratio=JAX/torch``."""
    return _runner_lines(rows, lambda row: f"{row.img_per_s:,.0f} img/s", _cost, ratio)


def markdown_table(rows: Sequence[StepRow]) -> str:
    """The README's table: one line per case, JAX runner and torch variant (or per JAX runner, JAX alone)."""
    return _table(
        rows,
        "| model | input | batch | precision | JAX | JAX img/s | torch | torch img/s | ratio |",
        lambda row: f"{row.case.model} | {row.case.image_size}x{row.case.image_size}",
        lambda row: f"{row.img_per_s:,.0f}",
        ratio,
    )


def epoch_lines(rows: Sequence[EpochRow]) -> list[str]:
    """One line per JAX runner of a model's epochs, one for each further JAX runner against the first ending in
    ``relative=`` (the first's epoch time over its), then one per pair of JAX and torch runners ending in
    ``ratio=`` (torch's epoch time over JAX's)."""
    from resnet_jax.bench.epochs import epoch_ratio

    return _runner_lines(rows, lambda row: f"{row.seconds:.2f} s", _epoch_cost, epoch_ratio)


def epoch_table(rows: Sequence[EpochRow]) -> str:
    """Seconds per epoch with the data on the device, per JAX runner and torch variant."""
    from resnet_jax.bench.epochs import epoch_ratio

    return _table(
        rows,
        "| model | images | batch | precision | JAX | JAX s/epoch | torch | torch s/epoch | ratio |",
        lambda row: f"{row.case.model} | {row.images:,}",
        lambda row: f"{row.seconds:.2f}",
        epoch_ratio,
    )


def input_line(row: InputRow) -> str:
    return f"input {row.name}, batch {row.batch}: {row.img_per_s:,.0f} img/s"


def input_verdict(row: InputRow, step: StepRow) -> str:
    """Whether an input pipeline keeps up with a train step fed by it."""
    times = row.img_per_s / step.img_per_s
    if times < 1:
        verdict = "the input is the bottleneck: the step waits for it"
    elif times < 3:
        verdict = "the input barely keeps up; on a CPU host it also takes cores from the step"
    else:
        verdict = "the input keeps up"
    rates = f"input {row.img_per_s:,.0f} img/s against the train step's {step.img_per_s:,.0f} img/s"
    return f"{rates} ({times:,.{0 if times >= 10 else 1}f}x): {verdict}"


def results(
    rows: Sequence[StepRow],
    inputs: Sequence[InputRow],
    skipped: Sequence[str],
    settings: Settings,
    command: str,
    epochs: Sequence[EpochRow] = (),
) -> dict[str, Any]:
    """Everything measured, with what is needed to rerun and compare it; each torch row holds its ratio to every
    JAX runner of its case (``jax_over_torch``, by JAX variant), each torch epoch its ratio to every JAX
    epoch runner (``torch_seconds_over_jax``, by JAX variant), and each JAX runner after a case's first its
    speed relative to the first (``relative_to_jax``, by the first's variant)."""
    from resnet_jax.bench.epochs import epoch_ratio

    epoch_records = []
    for jax_rows, torch_rows in _by_case(epochs):
        epoch_records += [_epoch_record(row) | _relative_record(row, jax_rows, epoch_ratio) for row in jax_rows]
        epoch_records += [
            _epoch_record(row) | {"torch_seconds_over_jax": {j.variant: epoch_ratio(j, row) for j in jax_rows}}
            for row in torch_rows
        ]
    train = []
    for jax_rows, torch_rows in _by_case(rows):
        train += [_row_record(row) | _relative_record(row, jax_rows, ratio) for row in jax_rows]
        for row in torch_rows:
            ratios = {jax_row.variant: ratio(jax_row, row) for jax_row in jax_rows}
            train.append(_row_record(row) | {"jax_over_torch": ratios})
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "device": device_info(),
        "versions": library_versions(),
        "settings": vars(settings),
        "environment": {name: os.environ.get(name) for name in ENVIRONMENT},
        "train": train,
        "input": [vars(row) for row in inputs],
        "epochs": epoch_records,
        "skipped": list(skipped),
    }


def write_results(record: dict[str, Any], folder: str | Path) -> Path:
    """``folder/<date>-<device>.json``; a second run on the same day and device gets ``-2``, ``-3``, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{record['date'][:10]}-{device_slug(record['device'])}"
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    info = {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}
    return info | {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "host": platform.platform()}


def device_slug(device: dict[str, Any]) -> str:
    """ "cpu-2cores" or the accelerator's kind, e.g. "nvidia-h100-80gb-hbm3"."""
    if device["platform"] == "cpu":
        return f"cpu-{device['cpu_cores']}cores"
    return re.sub(r"[^a-z0-9]+", "-", device["kind"].lower()).strip("-")


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor()


def library_versions() -> dict[str, str | None]:
    return {"python": sys.version.split()[0], **package_versions(LIBRARIES)}


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """The installed version of each distribution in ``names`` (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _row_record(row: StepRow) -> dict[str, Any]:
    return {
        "model": row.case.model,
        "image_size": row.case.image_size,
        "channels": row.case.channels,
        "batch": row.case.batch,
        "precision": row.case.precision,
        "framework": row.framework,
        "variant": row.variant,
        "img_per_s": row.img_per_s,
        "img_per_s_per_repeat": row.img_per_s_per_repeat,
        "compile_seconds": row.compile_seconds,
        "peak_memory_bytes": row.peak_memory_bytes,
        "memory_source": row.memory_source,
        "step_seconds": row.step_seconds,
    }


def _by_case(rows: Sequence[Any]) -> list[tuple[list[Any], list[Any]]]:
    """(the JAX rows, the torch rows) of each case, in order (step rows or epoch rows)."""
    groups: dict[Any, tuple[list[Any], list[Any]]] = {}
    for row in rows:
        jax_rows, torch_rows = groups.setdefault(row.case, ([], []))
        (jax_rows if row.framework == "jax" else torch_rows).append(row)
    return list(groups.values())


def _table(
    rows: Sequence[Any],
    header: str,
    what: Callable[[Any], str],
    rate: Callable[[Any], str],
    ratio_of: Callable[[Any, Any], float],
) -> str:
    """A Markdown table: one line per case, JAX runner and torch variant (or per JAX runner, JAX alone)."""
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for jax_rows, torch_rows in _by_case(rows):
        for jax_row in jax_rows:
            case = jax_row.case
            start = f"| {what(jax_row)} | {case.batch} | {case.precision} | {jax_row.variant} | {rate(jax_row)} "
            lines += [f"{start}| {row.variant} | {rate(row)} | {ratio_of(jax_row, row):.2f} |" for row in torch_rows]
            if not torch_rows:
                lines.append(start + "| - | - | - |")
    return "\n".join(lines)


def _runner_lines(
    rows: Sequence[Any], rate: Callable[[Any], str], cost: Callable[[Any], str], ratio_of: Callable[[Any, Any], float]
) -> list[str]:
    """Each JAX runner's rate and cost, each further JAX runner against the first (``relative=``), then each torch
    runner against each JAX runner, ending in ``ratio=``."""
    lines = []
    for jax_rows, torch_rows in _by_case(rows):
        first = jax_rows[0]
        lines += [f"{row.label}: {row.name} {rate(row)} ({cost(row)})" for row in jax_rows]
        lines += [
            f"{row.label}: {row.name} {rate(row)} against {first.name} {rate(first)}, "
            f"relative={ratio_of(row, first):.2f}"
            for row in jax_rows[1:]
        ]
        lines += [
            f"{row.label}: {jax_row.name} {rate(jax_row)}, {row.name} {rate(row)} ({cost(row)}), "
            f"ratio={ratio_of(jax_row, row):.2f}"
            for row in torch_rows
            for jax_row in jax_rows
        ]
    return lines


def _relative_record(row: Any, jax_rows: Sequence[Any], ratio_of: Callable[[Any, Any], float]) -> dict[str, Any]:
    """A JAX runner's speed relative to its case's first JAX runner (none for the first)."""
    first = jax_rows[0]
    return {} if row is first else {"relative_to_jax": {first.variant: ratio_of(row, first)}}


def _epoch_record(row: EpochRow) -> dict[str, Any]:
    case = row.case
    return {
        "model": case.model,
        "images": row.images,
        "image_size": case.image_size,
        "batch": case.batch,
        "precision": case.precision,
        "framework": row.framework,
        "variant": row.variant,
        "seconds": row.seconds,
        "compile_seconds": row.compile_seconds,
        "epoch_seconds": row.epoch_seconds,
    }


def _epoch_cost(row: EpochRow) -> str:
    return f"{row.images / row.seconds:,.0f} img/s, compile and first step {row.compile_seconds:.1f}s"


def _cost(row: StepRow) -> str:
    memory = f", peak {row.peak_memory_bytes / MIB:,.0f} MiB" if row.peak_memory_bytes is not None else ""
    return f"compile {row.compile_seconds:.1f}s{memory}"
