"""One report of every analysis: the sections that `resnet-jax analyze all` writes into index.html and index.md.

Each analysis writes its own files into a subfolder of the report (jacobian/, gradflow/, paths/,
lesion/, landscape/, degradation/) and returns its report dict; a `Section` keeps what the page
shows of it: a one-line finding, tables of headline numbers, and every PNG the analysis drew.
The page links the JSON and CSV files, which hold everything else.
"""

from __future__ import annotations

import dataclasses
import html
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Table = list[dict[str, Any]]


@dataclasses.dataclass
class Section:
    """What the report page shows of one analysis."""

    title: str
    folder: Path  # the analysis's own output folder, inside the report folder
    finding: str  # one sentence: what the numbers say
    tables: dict[str, Table] = dataclasses.field(default_factory=dict)  # caption -> rows
    seconds: float = 0.0

    def files(self, suffixes: Sequence[str]) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.suffix in suffixes) if self.folder.is_dir() else []


class Stopwatch:
    """Wall time of one analysis, for the report's table of contents."""

    def __enter__(self) -> Stopwatch:
        self.began = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.began


def rows(summary: dict[str, dict[str, Any]] | list[dict[str, Any]], key: str = "subject") -> Table:
    """A table from a summary keyed by subject ({label: {column: value}}) or already a list of rows."""
    if isinstance(summary, list):
        return summary
    return [{key: label, **columns} for label, columns in summary.items()]


def write_report(out: Path, title: str, subjects: Sequence[str], sections: Sequence[Section]) -> tuple[Path, Path]:
    """index.html and index.md in ``out``: a contents table with each analysis's time, then every section."""
    contents = [
        {"analysis": section.title, "finding": section.finding, "seconds": round(section.seconds, 1)}
        for section in sections
    ]
    html_page = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}th{background:#f3f3f3}"
        "td:first-child{text-align:left}img{max-width:100%}</style>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Subjects: {html.escape(', '.join(subjects))}</p>",
        _html_table(contents),
    ]
    markdown = [f"# {title}", "", f"Subjects: {', '.join(subjects)}", "", _markdown_table(contents)]
    for section in sections:
        folder = section.folder.relative_to(out)
        html_page += [f"<h2>{html.escape(section.title)}</h2>", f"<p>{html.escape(section.finding)}</p>"]
        markdown += ["", f"## {section.title}", "", section.finding]
        for caption, table in section.tables.items():
            html_page += [f"<h3>{html.escape(caption)}</h3>", _html_table(table)]
            markdown += ["", f"**{caption}**", "", _markdown_table(table)]
        for image in section.files([".png"]):
            src = (folder / image.name).as_posix()
            html_page.append(f"<p><img src='{html.escape(src)}' alt='{html.escape(image.stem)}'></p>")
            markdown += ["", f"![{image.stem}]({src})"]
        data = [(folder / p.name).as_posix() for p in section.files([".json", ".csv"])]
        html_page.append("<p>Data: " + ", ".join(f"<a href='{html.escape(d)}'>{html.escape(d)}</a>" for d in data))
        markdown += ["", "Data: " + ", ".join(f"[{d}]({d})" for d in data)]
    index_html, index_md = out / "index.html", out / "index.md"
    index_html.write_text("\n".join(html_page) + "\n")
    index_md.write_text("\n".join(markdown) + "\n")
    return index_html, index_md


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "-".join(_cell(v) for v in value)
    return "" if value is None else str(value)


def _columns(table: Table) -> list[str]:
    return list(dict.fromkeys(key for row in table for key in row))


def _html_table(table: Table) -> str:
    if not table:
        return "<p>(nothing)</p>"
    columns = _columns(table)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in columns) + "</tr>" for row in table
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _markdown_table(table: Table) -> str:
    if not table:
        return "(nothing)"
    columns = _columns(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)).replace("|", "/") for c in columns) + " |" for row in table]
    return "\n".join(lines)


def jacobian_section(report: dict[str, Any], folder: Path, seconds: float) -> Section:
    table = []
    for model in report["models"]:
        top_f = [row["sv_F"][0] for row in model["blocks"]]
        top_j = [row["sv_J"][0] for row in model["blocks"]]
        table.append(
            {
                "subject": model["label"],
                "blocks": len(model["blocks"]),
                "median top sv of J_F": float(np.median(top_f)),
                "median top sv of J": float(np.median(top_j)),
                "min top sv of J": float(np.min(top_j)),
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


def gradflow_section(report: dict[str, Any], folder: Path, seconds: float) -> Section:
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


def paths_section(report: dict[str, Any], folder: Path, seconds: float) -> Section:
    table = rows(report["summary"])
    fraction = report["settings"]["fraction"]
    found = "; ".join(
        f"{row['subject']}: lengths {row['effective_range'][0]}-{row['effective_range'][1]} of {row['blocks']} "
        f"(expected {row['expected_length']:.1f}, against {row['mean_path_length']:.1f} for all paths)"
        for row in table
    )
    finding = f"The central {fraction:.0%} of the gradient comes from paths of {found or 'no residual subject'}."
    return Section("Paths: residual nets as ensembles", folder, finding, {"Effective path lengths": table}, seconds)


def lesion_section(report: dict[str, Any], folder: Path, seconds: float) -> Section:
    table = []
    for label, summary in report["summary"].items():
        row = {key: value for key, value in summary.items() if not isinstance(value, dict)}
        table.append({"subject": label, **row, **{f"delete {k}": v for k, v in summary["downsampling_errors"].items()}})
    found = "; ".join(
        f"{row['subject']}: baseline error {row['baseline_error']:.3f}, one block deleted "
        + (f"{row['single_mean_error']:.3f} on average" if row["single_mean_error"] is not None else "not possible")
        for row in table
    )
    return Section("Lesions", folder, f"Test error {found}.", {"Test error after deleting one block": table}, seconds)


def landscape_section(report: dict[str, Any], folder: Path, seconds: float) -> Section:
    table = rows(report["summary"])
    found = "; ".join(
        f"{row['label']}: loss {row['center_loss']:.3f} at the centre, {row['max_loss']:.3g} at most, better "
        f"than chance (loss under log(classes)) on {row['basin_fraction']:.0%} of the plane"
        for row in table
    )
    return Section("Loss landscape", folder, f"{found}.", {"Landscape on the plane": table}, seconds)


def degradation_section(report: dict[str, Any], folder: Path, seconds: float) -> Section:
    summary = report["summary"]
    return Section("Degradation", folder, summary["statement"], {"Final errors (%)": summary["final"]}, seconds)
