"""One report of every analysis: the page that `resnet-jax analyze all` writes as index.html and index.md.

Each analysis writes its own files into a subfolder of the report (jacobian/, gradflow/, paths/,
...) and returns its report dict; its tool's section function (`tools`) turns that into a `Section`,
what the page shows of it: a one-line finding, tables of headline numbers, and every PNG the
analysis drew. The page links the JSON and CSV files, which hold everything else.
"""

from __future__ import annotations

import dataclasses
import html
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
        """The files the analysis wrote with these suffixes, e.g. [".png"], by name."""
        return sorted(p for p in self.folder.iterdir() if p.suffix in suffixes) if self.folder.is_dir() else []


class Stopwatch:
    """Wall time of one analysis, for the report's table of contents."""

    def __enter__(self) -> Stopwatch:
        self.began = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.began


def summary_table(summary: dict[str, dict[str, Any]] | list[dict[str, Any]], key: str = "subject") -> Table:
    """A table from a summary keyed by model and checkpoint ({label: {column: value}}), or already a list of rows."""
    if isinstance(summary, list):
        return summary
    return [{key: label, **columns} for label, columns in summary.items()]


def write_report(out: Path, title: str, analysed: Sequence[str], sections: Sequence[Section]) -> tuple[Path, Path]:
    """index.html and index.md in ``out``: the names of the ``analysed`` models and checkpoints, a contents table
    with each analysis's time, then every section."""
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
        f"<p>Subjects: {html.escape(', '.join(analysed))}</p>",
        _html_table(contents),
    ]
    markdown = [f"# {title}", "", f"Subjects: {', '.join(analysed)}", "", _markdown_table(contents)]
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
        data_files = [(folder / p.name).as_posix() for p in section.files([".json", ".csv"])]
        links = ", ".join(f"<a href='{html.escape(d)}'>{html.escape(d)}</a>" for d in data_files)
        html_page.append(f"<p>Data: {links}")
        markdown += ["", "Data: " + ", ".join(f"[{d}]({d})" for d in data_files)]
    index_html, index_md = out / "index.html", out / "index.md"
    index_html.write_text("\n".join(html_page) + "\n")
    index_md.write_text("\n".join(markdown) + "\n")
    return index_html, index_md


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "-".join(_format_cell(v) for v in value)
    return "" if value is None else str(value)


def _columns(table: Table) -> list[str]:
    return list(dict.fromkeys(key for row in table for key in row))


def _html_table(table: Table) -> str:
    if not table:
        return "<p>(nothing)</p>"
    columns = _columns(table)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format_cell(row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in table
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _markdown_table(table: Table) -> str:
    if not table:
        return "(nothing)"
    columns = _columns(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format_cell(row.get(c)).replace("|", "/") for c in columns) + " |" for row in table]
    return "\n".join(lines)
