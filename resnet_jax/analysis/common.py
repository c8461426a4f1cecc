"""What every analysis starts from: a model with its variables (at initialisation or from a checkpoint),
a batch of real images, and the files it leaves behind (JSON, CSV, PNG).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import ctypes
import dataclasses
import glob
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from resnet_jax import data
from resnet_jax.cpu.conv import model_conv
from resnet_jax.cpu.processes import available_cores
from resnet_jax.models import ResNet, create_model
from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.reporting import format_duration, write_status
from resnet_jax.train.runs import load_run
from resnet_jax.train.steps import create_train_state


@dataclasses.dataclass(frozen=True)
class ModelSnapshot:
    """A model and its variables at one step of training: at initialisation (step 0) or from one checkpoint of a
    training run. Every analysis takes a list of them."""

    name: str  # the model's name, e.g. "resnet20"
    model: ResNet
    variables: dict[str, Any]  # {"params", "batch_stats"}
    step: int = 0
    workdir: Path | None = None  # the training run it comes from, if any
    config: ml_collections.ConfigDict | None = None  # that run's config (dataset, seed, ...)
    tag: str = ""  # what tells it from a snapshot of the same model and step: its run folder, its seed

    @property
    def label(self) -> str:
        """How reports and plots name it, e.g. "resnet20 init", "resnet20 step 500" or, tagged with its run
        folder, "resnet20 step 500 (seed1)"."""
        label = f"{self.name} step {self.step}" if self.workdir else f"{self.name} init"
        return f"{label} ({self.tag})" if self.tag else label

    def report_fields(self) -> dict[str, Any]:
        """What every analysis's report says of it: label, model, step and run folder."""
        return {
            "label": self.label,
            "model": self.name,
            "step": self.step,
            "workdir": str(self.workdir) if self.workdir else None,
        }


def init_snapshot(name: str, image_shape: Sequence[int], num_classes: int = 10, seed: int = 0) -> ModelSnapshot:
    """``name`` at initialisation, initialised exactly as training initialises it (same seed, same call)."""
    conv = model_conv(jax.default_backend(), "jit", 1, len(available_cores()))
    model = create_model(name, num_classes=num_classes, conv=conv)
    return ModelSnapshot(name, model, _variables(create_train_state(model, optax.identity(), tuple(image_shape), seed)))


def run_snapshots(workdir: str | Path, all_steps: bool = False, init: bool = False) -> list[ModelSnapshot]:
    """The latest checkpoint of the run in ``workdir`` or, with ``all_steps``, every checkpoint it keeps; with
    ``init``, its initialisation (step 0) first: the same seed and call that the run started from."""
    workdir = Path(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"{workdir} is not a training workdir (it has no checkpoints/ folder); pass the --workdir of a "
            "`resnet-jax train` run."
        )
    checkpoints = Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False, read_only=True)
    steps = sorted(checkpoints.manager.all_steps()) if all_steps else []
    checkpoints.close()
    snapshots = []
    for step in steps or [None]:  # the newest good checkpoint (load_run skips damaged ones), or what to do
        model, state, config = load_run(workdir, step)
        snapshots.append(ModelSnapshot(config.model, model, _variables(state), int(state.step), workdir, config))
    if init:  # the image shape only sets the input channels, as in `load_run`
        image_shape = data.load_run_source(config, config.eval_split).image_shape
        initial = create_train_state(model, optax.identity(), image_shape, config.seed)
        snapshots.insert(0, ModelSnapshot(config.model, model, _variables(initial), 0, workdir, config))
    return snapshots


def tell_apart(snapshots: Sequence[ModelSnapshot]) -> list[ModelSnapshot]:
    """``snapshots`` with those of one label (runs of one model with two seeds, at the same step) tagged with their
    run folder's name, so that tables and legends tell them apart; the others as they are."""
    counts = collections.Counter(s.label for s in snapshots)
    return [
        dataclasses.replace(s, tag=s.workdir.name) if counts[s.label] > 1 and s.workdir and not s.tag else s
        for s in snapshots
    ]


class Batch(NamedTuple):
    """Images to analyse on, with what the loss and the head need."""

    images: jax.Array  # float32 NHWC, normalised as in training
    labels: jax.Array
    num_classes: int  # of the data set


def load_images(
    dataset: str = "fashion_mnist",
    split: str = "test",
    data_dir: str | None = None,
    count: int = 8,
    size: int | None = None,
) -> Batch:
    """The first ``count`` images of ``split``, normalised as in training, with their labels.

    ``size`` makes them size x size: larger sizes zero-pad the raw image around its centre (the black
    border that random-crop augmentation also adds, e.g. Fashion-MNIST 28 -> 32 for the CIFAR input
    size); smaller ones resize it (antialiased), for Jacobians small enough to form exactly.
    """
    source = data.load_source(dataset, split, data_dir)
    if not isinstance(source, data.ArraySource):
        raise ValueError(f"{dataset} is streamed; the analyses need an in-memory data set (fashion_mnist, cifar10...).")
    if not 1 <= count <= source.num_examples:
        raise ValueError(f"count={count}: choose between 1 and the {source.num_examples} images of {split}.")
    images = data.normalize(source.images[:count], source.mean, source.std)
    if size is not None:
        images = fit_images(images, size, background=-np.asarray(source.mean) / np.asarray(source.std))
    return Batch(jnp.asarray(images), jnp.asarray(source.labels[:count]), source.num_classes)


def fit_images(images: np.ndarray, size: int, background: np.ndarray) -> np.ndarray:
    """Square NHWC ``images`` padded (with the ``background`` value per channel) or resized to size x size."""
    n, height, width, channels = images.shape
    if size < 1:
        raise ValueError(f"Input size must be a positive number of pixels; got {size}.")
    if size < max(height, width):
        return np.asarray(jax.image.resize(images, (n, size, size, channels), "linear", antialias=True))
    top, left = (size - height) // 2, (size - width) // 2
    out = np.broadcast_to(np.asarray(background, np.float32), (n, size, size, channels)).copy()
    out[:, top : top + height, left : left + width] = images
    return out


def write_json(path: Path, content: Any) -> Path:
    """``content`` as indented JSON; numpy and jax arrays become lists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1, default=_plain) + "\n")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """One row per dict; the columns are the keys of the first row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: plots are files, and no display is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, title: str) -> Path:
    """Write ``fig`` as a PNG with ``title`` and one legend for all its panels, outside them: with a curve per
    model and checkpoint, a legend inside a panel hides curves."""
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def line_styles(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plot styles for reports (each with "model" and "label", and "workdir" for a checkpoint): one colour per
    training run, lighter for its earlier checkpoints, so that one run's curves read as a progression. Two runs of
    one model (e.g. with and without stochastic depth) get two colours; models at initialisation, one per model."""
    from matplotlib import colormaps

    def run(report: dict[str, Any]) -> str:
        return report.get("workdir") or report["model"]

    runs = list(dict.fromkeys(map(run, reports)))
    styles = []
    for index, report in enumerate(reports):
        # By position: reports of one run that compare equal (two seeds at init) would be found twice, and
        # comparing reports that hold arrays raises.
        same = [i for i, r in enumerate(reports) if run(r) == run(report)]
        shade = 0.35 + 0.65 * (same.index(index) + 1) / len(same)
        colour = colormaps["tab10"](runs.index(run(report)) % 10)
        styles.append({"color": colour, "alpha": shade, "label": report["label"]})
    return styles


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run numpy's LAPACK calls (the exact spectra) on one thread, then restore the thread count.

    On a small CPU machine shared with other jobs, OpenBLAS threads that wait for a free core make an SVD
    of a block Jacobian many times slower than one thread is. Acts on the OpenBLAS that numpy wheels
    bundle; other BLAS builds are left as they are.
    """
    library = next(iter(glob.glob(str(Path(np.__file__).parent.parent / "numpy.libs" / "*openblas*"))), None)
    names = ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_")
    blas = ctypes.CDLL(library) if library else None
    if blas is None or not all(hasattr(blas, name) for name in names):
        yield
        return
    get_threads, set_threads = (getattr(blas, name) for name in names)
    threads = get_threads()
    set_threads(1)
    try:
        yield
    finally:
        set_threads(threads)


def _variables(state: Any) -> dict[str, Any]:
    return {"params": state.params, "batch_stats": state.batch_stats}


def _plain(value: Any) -> Any:
    """JSON for numpy and jax scalars and arrays."""
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()


class ProgressLine:
    """The progress of one long measurement, e.g. ``landscape resnet56 step 2345: 1,088/2,601 points | ETA 12m40s``.

    On a terminal the line rewrites itself at every update; in a log it is written at most every ``every_s``
    seconds, and at the end, so that a run of hours leaves a readable trail. The ETA takes the rate since the
    first update, which leaves out the compilation before it.
    """

    def __init__(self, label: str, total: int, unit: str, stream: TextIO | None = None, every_s: float = 60.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._first: tuple[int, float] | None = None
        self._written = -math.inf

    def update(self, done: int) -> None:
        """``done`` of the ``total`` units are measured."""
        now = time.perf_counter()
        if self._first is None:
            self._first = (done, now)
        if not self.tty and done < self.total and now - self._written < self.every_s:
            return
        self._written = now
        text = f"{self.label}: {done:,}/{self.total:,} {self.unit}"
        first_done, first_time = self._first
        if first_done < done < self.total:
            rate = (done - first_done) / (now - first_time)
            text += f" | ETA {format_duration((self.total - done) / rate)}"
        write_status(self.stream, text, tty=self.tty, keep=done >= self.total)
