"""What a run shows and leaves behind: a progress line, metrics.jsonl, TensorBoard events and plots."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """JSON lines and TensorBoard events in the workdir (process 0 only: others pass enabled=False).

    A run resumed at ``start_step`` first forgets what the interrupted run logged after its
    checkpoint (those steps are trained again), so curves never hold two values for one step.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True, start_step: int = 0) -> None:
        self.path = Path(workdir) / METRICS_FILE
        self.enabled = enabled
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            records = read_metrics(workdir)
            kept = [record for record in records if record["step"] <= start_step]
            if len(kept) < len(records):
                partial = self.path.with_suffix(".jsonl.partial")
                partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
                partial.replace(self.path)
            # TensorBoard hides events of steps >= purge_step written before this point.
            purge = start_step + 1 if start_step else None
            self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge)

    def write(self, step: int, split: str, metrics: dict[str, float], elapsed_s: float | None = None) -> None:
        """One record; ``elapsed_s`` (wall time of the run) goes to the JSON line, where TensorBoard has its own."""
        if not self.enabled:
            return
        timing = {} if elapsed_s is None else {"elapsed_s": round(elapsed_s, 3)}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, **metrics, **timing}) + "\n")
        for name, value in metrics.items():
            self._tensorboard.add_scalar(f"{split}/{name}", value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(workdir: str | Path) -> Path:
    """``curves.png``: loss and accuracy against step, training and test side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for split, style in (("train", "-"), ("test", "o-")):
            points = [(r["step"], r[metric]) for r in records if r["split"] == split and metric in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=split, markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(Path(workdir).name)
    fig.tight_layout()
    out = Path(workdir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_status(stream: TextIO, text: str, *, tty: bool, keep: bool) -> None:
    """One status line. On a terminal it replaces the status line before it and stays only when ``keep``
    (so a live line never scrolls the terminal); in a log every line is kept, since nothing can be rewritten."""
    if tty:
        stream.write("\r\033[K" + text + ("\n" if keep else ""))
    else:
        stream.write(text + "\n")
    stream.flush()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """One status line: step, loss, accuracy, img/s and ETA; compile time is reported once, apart.

    On a terminal the line rewrites itself; in a log file each update is a new line. The rate is the median
    over the last few intervals between updates, so one slow interval (an evaluation, a checkpoint, a laptop
    asleep, a paused job) does not turn the ETA into days until the next update.
    """

    RATE_WINDOW = 5  # intervals; the median ignores up to two outliers among them

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        batch_size: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total, self.batch_size, self.enabled = total_steps, batch_size, enabled
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._clock = clock
        self._mark_step, self._mark_time = start_step, None
        self._rates: deque[float] = deque(maxlen=self.RATE_WINDOW)

    def compiled(self, seconds: float) -> None:
        self._print(f"compiled the train step in {seconds:.1f}s", keep=True)

    def start_timing(self, step: int) -> None:
        """Start the img/s clock (after compilation, so compile time never counts as training)."""
        self._mark_step, self._mark_time = step, self._clock()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        now = self._clock()
        if self._mark_time is not None and step > self._mark_step and now > self._mark_time:
            self._rates.append((step - self._mark_step) * self.batch_size / (now - self._mark_time))
        self._mark_step, self._mark_time = step, now
        parts = [f"step {step}/{self.total}"] + [f"{k} {v:.4f}" for k, v in metrics.items()]
        if self._rates:
            rate = statistics.median(self._rates)
            eta = (self.total - step) * self.batch_size / rate
            parts += [f"{rate:,.0f} img/s", f"ETA {format_duration(eta)}"]
        self._print(" | ".join(parts), keep=False)

    def message(self, text: str) -> None:
        self._print(text, keep=True)

    def _print(self, text: str, keep: bool) -> None:
        if self.enabled:
            write_status(self.stream, text, tty=self.tty, keep=keep)
