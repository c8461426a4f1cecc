"""``resnet-jax bench --inference``: the eval-mode forward pass of one model in every engine that serves it, timed
side by side in one process: JAX (jit), JAX with batch norm folded, ONNX Runtime, TFLite float32 and int8 (LiteRT)
and PyTorch (eager; ``torch.compile`` on request). Latency at batch 1, throughput at larger batches.

The JAX, ONNX and TFLite engines run the same weights (random, with batch-norm statistics that are not the identity),
PyTorch the same architecture with its own random weights: this times engines, `resnet-jax export` checks their
outputs. The engines take turns within each round, so that a machine shared with other work slows all alike, and
each figure is the median over rounds.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from resnet_jax.deploy.export import artifact_size
from resnet_jax.deploy.formats import write_onnx, write_tflite, write_tflite_int8
from resnet_jax.deploy.runtimes import tflite_interpreter
from resnet_jax.deploy.servable import Servable, fold_for_serving
from resnet_jax.extras import require
from resnet_jax.models import create_model

DEFAULT_CASES = (("resnet20", 32, (1, 32, 128)), ("resnet50", 224, (1, 32)))
Engine = Callable[[np.ndarray], Any]  # images -> logits, finished when it returns


@dataclasses.dataclass(frozen=True)
class InferenceRow:
    model: str
    image_size: int
    batch: int
    engine: str
    median_ms: float
    images_per_s: float
    size_bytes: int | None


def random_servable(name: str, image_size: int, seed: int = 0) -> Servable:
    """``name`` with random weights and batch-norm statistics that are not the identity (so folding does work)."""
    model = create_model(name)
    images = np.zeros((1, image_size, image_size, 3), np.float32)
    variables = jax.device_get(model.init(jax.random.key(seed), images, train=False))
    rng = np.random.default_rng(seed)
    # Means near zero and variances near one, as training leaves them: a mean far above the conv's outputs would
    # zero every activation after the ReLU, which int8 cannot quantize.
    stats = {
        "mean": lambda v: 0.1 * rng.normal(size=v.shape),
        "var": lambda v: np.exp(0.3 * rng.normal(size=v.shape)),
    }
    batch_stats = jax.tree_util.tree_map_with_path(
        lambda path, v: np.asarray(stats[path[-1].key](v), v.dtype), variables["batch_stats"]
    )
    classes = tuple(map(str, range(model.num_classes)))
    return Servable(
        model,
        {**variables, "batch_stats": batch_stats},
        name,
        (image_size, image_size, 3),
        (0.5,) * 3,
        (0.25,) * 3,
        classes,
    )


def engines(
    servable: Servable, folder: Path, batch: int, representative: np.ndarray, torch_compile: bool
) -> dict[str, tuple[Engine, int | None]]:
    """Each engine's forward pass at ``batch`` and the size of its artifact (None: no file)."""
    folded = fold_for_serving(servable)
    found: dict[str, tuple[Engine, int | None]] = {
        "jax": (_jax_engine(servable), None),
        "jax_folded": (_jax_engine(folded), None),
    }
    onnx_path, tflite_path, int8_path = folder / "model.onnx", folder / "model.tflite", folder / "model_int8.tflite"
    if not onnx_path.exists():
        # In a process of its own: LiteRT's interpreter aborts in a process where TensorFlow's converter has run.
        with (folder / "servable.pkl").open("wb") as file:
            pickle.dump((folded, representative), file)
        subprocess.run([sys.executable, "-m", "resnet_jax.deploy.bench", str(folder)], check=True)
    found["onnxruntime"] = (_onnx_engine(onnx_path), artifact_size(onnx_path))
    found["tflite"] = (_tflite_engine(tflite_path, batch), tflite_path.stat().st_size)
    found["tflite_int8"] = (_tflite_engine(int8_path, batch), int8_path.stat().st_size)
    found["torch_eager"] = (_torch_engine(servable.name, servable.model.num_classes, compiled=False), None)
    if torch_compile:
        found["torch_compile"] = (_torch_engine(servable.name, servable.model.num_classes, compiled=True), None)
    return found


def write_artifacts(folder: Path) -> None:
    """The ONNX, TFLite and int8 TFLite files that the engines run, of the servable pickled in ``folder``."""
    with (folder / "servable.pkl").open("rb") as file:
        folded, representative = pickle.load(file)
    write_onnx(folded, folder / "model.onnx", representative)
    write_tflite(folded, folder / "model.tflite", representative)
    write_tflite_int8(folded, folder / "model_int8.tflite", representative)


def _jax_engine(servable: Servable) -> Engine:
    forward = jax.jit(servable.function())
    return lambda images: forward(images).block_until_ready()


def _onnx_engine(path: Path) -> Engine:
    session = require("onnxruntime").InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})


def _tflite_engine(path: Path, batch: int) -> Engine:
    interpreter = tflite_interpreter(path, batch)
    index = interpreter.get_input_details()[0]["index"]

    def run(images: np.ndarray) -> None:
        interpreter.set_tensor(index, images)
        interpreter.invoke()

    return run


def _torch_engine(name: str, num_classes: int, compiled: bool) -> Engine:
    torch = require("torch")
    from resnet_jax.bench import torch_models

    model = torch_models.create(name, num_classes).eval()
    if compiled:
        model = torch.compile(model)

    def run(images: np.ndarray) -> None:
        with torch.inference_mode():
            model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())

    return run


def time_engines(
    found: dict[str, tuple[Engine, int | None]], images: np.ndarray, rounds: int, calls: int
) -> dict[str, float]:
    """Median seconds per call of each engine: ``rounds`` rounds, the engines in turn, ``calls`` calls each."""
    for engine, _ in found.values():
        engine(images)  # compile, allocate, warm the caches
    times: dict[str, list[float]] = {name: [] for name in found}
    for _ in range(rounds):
        for name, (engine, _) in found.items():
            start = time.perf_counter()
            for _ in range(calls):
                engine(images)
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def inference_rows(
    cases: Sequence[tuple[str, int, Sequence[int]]], rounds: int, torch_compile: bool, say: Callable[[str], None]
) -> list[InferenceRow]:
    """Every engine on every (model, image size, batches) case."""
    rows = []
    for name, size, batches in cases:
        servable = random_servable(name, size)
        rng = np.random.default_rng(1)
        representative = rng.normal(size=(16, size, size, 3)).astype(np.float32)
        with tempfile.TemporaryDirectory(prefix="resnet-jax-bench-") as folder:
            for batch in batches:
                found = engines(servable, Path(folder), batch, representative, torch_compile)
                images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
                calls = max(1, 32 // batch)
                for engine, seconds in time_engines(found, images, rounds, calls).items():
                    row = InferenceRow(name, size, batch, engine, 1e3 * seconds, batch / seconds, found[engine][1])
                    say(row_line(row))
                    rows.append(row)
    return rows


def row_line(row: InferenceRow) -> str:
    size = f", {row.size_bytes / 1e6:.1f} MB" if row.size_bytes else ""
    return (
        f"{row.model} {row.image_size}x{row.image_size} batch {row.batch:>3} {row.engine:<12} "
        f"{row.median_ms:9.2f} ms  {row.images_per_s:9.1f} img/s{size}"
    )


def markdown_table(rows: Sequence[InferenceRow]) -> str:
    """One line per (model, batch), one column per engine: ms at batch 1, img/s above, with the ratio to JAX."""
    engine_names = list(dict.fromkeys(row.engine for row in rows))
    lines = ["| model | batch | " + " | ".join(engine_names) + " |", "|---|---|" + "---|" * len(engine_names)]
    keys = list(dict.fromkeys((row.model, row.image_size, row.batch) for row in rows))
    for model, size, batch in keys:
        cells = {row.engine: row for row in rows if (row.model, row.image_size, row.batch) == (model, size, batch)}
        jax_row = cells["jax"]
        values = []
        for engine in engine_names:
            row = cells.get(engine)
            if row is None:
                values.append("")
            elif batch == 1:
                values.append(f"{row.median_ms:.2f} ms ({jax_row.median_ms / row.median_ms:.2f}x)")
            else:
                values.append(f"{row.images_per_s:.0f} img/s ({row.images_per_s / jax_row.images_per_s:.2f}x)")
        lines.append(f"| {model} {size}x{size} | {batch} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def run_inference_bench(
    cases: Sequence[tuple[str, int, Sequence[int]]], rounds: int, torch_compile: bool, out: str | Path, command: str
) -> Path:
    """Time ``cases``, print the rows and a markdown table, and write them to ``out``/<date>-<device>-inference.json."""
    from resnet_jax.bench import report

    rows = inference_rows(cases, rounds, torch_compile, lambda line: print(line, flush=True))
    table = markdown_table(rows)
    print(table)
    device = report.device_info()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record = {
        "date": date,
        "command": command,
        "device": device,
        "versions": report.library_versions(),
        "rounds": rounds,
        "rows": [dataclasses.asdict(row) for row in rows],
        "table": table,
    }
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{date[:10]}-{report.device_slug(device)}-inference.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results: {path}")
    return path


if __name__ == "__main__":
    write_artifacts(Path(sys.argv[1]))
