"""``resnet-jax bench --input imagenet``: the ImageNet JPEG pipelines against torchvision's, on the same files.

The project's pipeline (`resnet_jax.data.imagenet`, through ``StreamSource.train_batches`` and ``eval_batches`` as
training consumes it) reads the ``imagenet_synthetic`` TFRecords (`resnet_jax.data.synthetic_jpegs`); torchvision
reads the same JPEGs as an ``ImageFolder`` through a ``DataLoader`` with one worker per core, PIL decoding and the
usual transforms (``RandomResizedCrop(224)``, flip, ``ToTensor``, ``Normalize``; for evaluation ``Resize(256)``,
``CenterCrop(224)``). Each measurement runs in a fresh process pinned to its cores, so the per-core figure is what
one core gives, whatever threads a library starts. Rounds alternate the pipelines, so a busy host slows all alike.

    python -m resnet_jax.bench.jpeg_inputs JOB_JSON   # one measurement (started for you); prints REPLY RATE
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

REPLY = "resnet-jax-jpeg-rate "
LIBRARIES = ("tf.data", "torchvision")
STAGES = ("train", "eval")
GPU_STEP_IMAGES_PER_S = 7_000  # a ResNet-50 step on one H100 at MLPerf's rate: the host must decode this many


@dataclasses.dataclass(frozen=True)
class JpegJob:
    """One measurement: ``library``'s ``stage`` pipeline on ``cores``, ``batches`` batches timed after ``warmup``."""

    library: str
    stage: str
    cores: tuple[int, ...]
    data_dir: str
    batch: int
    batches: int
    warmup: int


@dataclasses.dataclass
class JpegRow:
    """A pipeline's images/s on some cores, one figure per round."""

    library: str
    stage: str
    cores: int
    img_per_s: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.img_per_s)

    @property
    def per_core(self) -> float:
        return self.median / self.cores


def core_counts(requested: Iterable[int] | None) -> list[int]:
    """The core counts to measure on (default: one and all of this process's), checked against what there is."""
    available = len(os.sched_getaffinity(0))
    counts = sorted(set(requested or (1, available)))
    if counts[0] < 1 or counts[-1] > available:
        raise ValueError(f"--cores {counts}: this process may use {available} cores; give counts from 1 to that.")
    return counts


def bench_jpeg_inputs(
    data_dir: str | None, batch: int, batches: int, warmup: int, repeats: int, cores: list[int], say: Any = print
) -> list[JpegRow]:
    """Every pipeline of `LIBRARIES` x `STAGES` on each count of ``cores``, ``repeats`` rounds; the data set is
    written into ``data_dir`` first if missing (`synthetic_jpegs.load_synthetic_jpegs`)."""
    from resnet_jax.data.synthetic_jpegs import load_synthetic_jpegs

    folder = str(load_synthetic_jpegs("train", data_dir).data_dir)
    load_synthetic_jpegs("validation", folder, download=False)
    pinned = sorted(os.sched_getaffinity(0))
    rows = {
        (library, stage, n): JpegRow(library, stage, n, []) for stage in STAGES for n in cores for library in LIBRARIES
    }
    for round_ in range(repeats):
        for (library, stage, n), row in rows.items():
            # At least two batches per worker before timing: the workers' first batches come all at once.
            job = JpegJob(library, stage, tuple(pinned[:n]), folder, batch, batches, max(warmup, 2 * n))
            row.img_per_s.append(run_job(job))
            say(f"round {round_ + 1}/{repeats}: {library} {stage} on {n} cores: {row.img_per_s[-1]:,.0f} img/s")
    return list(rows.values())


def run_job(job: JpegJob) -> float:
    """Images/s of ``job``, measured in a fresh process (`main`)."""
    command = [sys.executable, "-m", "resnet_jax.bench.jpeg_inputs", json.dumps(dataclasses.asdict(job))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    replies = [line for line in done.stdout.splitlines() if line.startswith(REPLY)]
    if done.returncode or not replies:
        raise RuntimeError(f"{job.library} {job.stage} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return float(replies[-1][len(REPLY) :])


def images_per_second(batches: Iterator[tuple[int, Any]], warmup: int, count: int) -> float:
    """Images/s over ``count`` batches of (real images, batch) after ``warmup`` untimed ones."""
    for _ in range(warmup):
        next(batches)
    images, start = 0, time.perf_counter()
    for real, _ in itertools.islice(batches, count):
        images += real
    return images / (time.perf_counter() - start)


def tf_batches(job: JpegJob) -> Iterator[tuple[int, Any]]:
    """The project's training or evaluation batches, endless (evaluation passes over the split again and again;
    its padding is not counted)."""
    from resnet_jax.data import BatchSettings
    from resnet_jax.data.synthetic_jpegs import load_synthetic_jpegs

    settings = BatchSettings(job.batch)
    if job.stage == "train":
        source = load_synthetic_jpegs("train", job.data_dir, download=False)
        return ((len(b["image"]), b) for b in source.train_batches(settings))
    source = load_synthetic_jpegs("validation", job.data_dir, download=False)
    passes = itertools.chain.from_iterable(source.eval_batches(settings) for _ in itertools.count())
    return ((int(b["mask"].sum()), b) for b in passes)


def torch_batches(job: JpegJob) -> Iterator[tuple[int, Any]]:
    """torchvision's ImageFolder through a DataLoader with a worker per core, endless (epoch after epoch)."""
    import torch

    from resnet_jax.data.augment import CHANNEL_STATS
    from resnet_jax.data.synthetic_jpegs import FOLDERS

    torchvision = import_torchvision()
    transforms = torchvision.transforms
    train = job.stage == "train"
    mean, std = CHANNEL_STATS["imagenet2012"]
    views = (
        [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
        if train
        else [
            transforms.Resize(256),
            transforms.CenterCrop(224),
        ]
    )
    transform = transforms.Compose([*views, transforms.ToTensor(), transforms.Normalize(mean, std)])
    folder = os.path.join(job.data_dir, FOLDERS, "train" if train else "validation")
    dataset = torchvision.datasets.ImageFolder(folder, transform)
    loader = torch.utils.data.DataLoader(
        dataset, job.batch, shuffle=train, num_workers=len(job.cores), drop_last=train, persistent_workers=True
    )
    epochs = itertools.chain.from_iterable(loader for _ in itertools.count())
    return ((len(images), images) for images, _ in epochs)


def import_torchvision() -> Any:
    """torchvision, also where PyPI's CUDA build of it sits beside a CPU torch: its C++ ops (nms, ...) cannot load
    there and 0.28 fails on import registering shape functions for two of them; declaring those two schemas first
    lets the pure-Python datasets, models and transforms import. Where the ops load, nothing is declared."""
    import importlib.util
    from pathlib import Path

    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise ImportError("torchvision is not installed: pip install 'resnet-jax[test]' (or torchvision).")
    try:
        torch.ops.load_library(Path(spec.origin).parent / "_C.so")
    except OSError:
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision


def cores_for(rate_per_core: float, target: float = GPU_STEP_IMAGES_PER_S) -> int:
    """Cores that keep ``target`` img/s fed at ``rate_per_core``."""
    return math.ceil(target / rate_per_core)


def table(rows: list[JpegRow]) -> str:
    """Markdown: each pipeline's median (min-max) img/s, per core, the ratio project / torchvision on the same
    cores, and the cores a 7,000 img/s GPU step would need at that per-core rate."""
    lines = [
        "| stage | cores | pipeline | img/s median (min-max) | img/s per core | tf.data / torchvision | cores for "
        f"{GPU_STEP_IMAGES_PER_S:,} img/s |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key = {(row.library, row.stage, row.cores): row for row in rows}
    for row in rows:
        other = by_key.get(("torchvision", row.stage, row.cores))
        ratio = f"{row.median / other.median:.2f}x" if row.library == "tf.data" and other else ""
        spread = f"{min(row.img_per_s):,.0f}-{max(row.img_per_s):,.0f}"
        lines.append(
            f"| {row.stage} | {row.cores} | {row.library} | {row.median:,.0f} ({spread}) | {row.per_core:,.0f} | "
            f"{ratio} | {cores_for(row.per_core)} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """One measurement in this process (pinned to its cores first, before any library starts threads)."""
    job = JpegJob(**json.loads(argv[0]))
    os.sched_setaffinity(0, job.cores)
    batches = tf_batches(job) if job.library == "tf.data" else torch_batches(job)
    print(f"{REPLY}{images_per_second(batches, job.warmup, job.batches)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
