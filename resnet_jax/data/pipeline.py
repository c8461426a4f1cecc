"""Index-based batching: every training batch is a pure function of (seed, step).

The examples of global batch ``step`` are rows ``[i * B, (i + 1) * B)`` of the permutation of its
epoch, ``default_rng([seed, epoch])``, with i = step mod steps_per_epoch (each epoch drops its last
N mod B examples). Its augmentation is drawn for the whole global batch from
``default_rng([seed, step, 1])``. Process p of P then keeps rows ``[p * B / P, (p + 1) * B / P)``.
So a run restarted with ``start_step=k`` gets exactly the batches k, k+1, ... of a run from 0, and
the global batch is the same for any number of processes.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, TypeVar

import numpy as np

from resnet_jax.data.augment import (
    apply_crop_flip,
    apply_erasing,
    normalize,
    one_hot,
    resize,
    sample_crop_flip,
    sample_erasing,
    sample_mixup,
)
from resnet_jax.data.sources import ArraySource, StreamSource

Batch = dict[str, np.ndarray]
T = TypeVar("T")


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """The rows of a global batch that each process feeds its devices."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"The global batch size ({global_batch_size}) must be a positive multiple of the process count "
            f"({process_count}); change the batch size."
        )
    return global_batch_size // process_count


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Training steps in one pass over the data (the last partial batch of each epoch is dropped)."""
    steps = num_examples // global_batch_size
    if steps == 0:
        raise ValueError(f"A global batch of {global_batch_size} is larger than the {num_examples} training examples.")
    return steps


def train_batches(
    source: ArraySource | StreamSource,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    augment: bool = True,
    pad: int = 4,
    flip: bool = True,
    random_erasing: float = 0.0,
    mixup_alpha: float = 0.0,
    image_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Endless training batches from ``start_step`` on: this process's rows of each global batch.

    Yields {"image": float32 NHWC normalised, "label": int32 (B,)}, or with ``mixup_alpha`` > 0 a
    float32 (B, num_classes) mixed "label". ``augment`` turns on the random crop (zero padding of
    ``pad`` pixels), the horizontal flip (if ``flip``; leave it off for digits) and, with
    ``random_erasing`` > 0, the random erasing of a box of that fraction of images; ``image_size``
    then resizes the images to image_size x image_size (see `resize`). Batches are made
    ``prefetch`` ahead in a background thread, so that augmentation overlaps the train step.
    A streamed source (ImageNet) resumes exactly only with the same process count.
    """
    _check_image_size(source, image_size)
    if isinstance(source, StreamSource):
        from resnet_jax.data import imagenet

        if mixup_alpha or random_erasing:
            raise ValueError(
                f"mixup and random erasing are not implemented for {source.name}; "
                "set mixup_alpha=0 and random_erasing=0."
            )
        dataset = imagenet.train_dataset(
            source,
            global_batch_size=global_batch_size,
            seed=seed,
            start_step=start_step,
            augment=augment,
            flip=flip,
            process_index=process_index,
            process_count=process_count,
        )
        return imagenet.as_numpy(dataset)
    local = local_batch_size(global_batch_size, process_count)
    rows = slice(process_index * local, (process_index + 1) * local)
    crop_pad = pad if augment else 0
    draw = _Drawer(source.num_examples, global_batch_size, seed, crop_pad, flip and augment)
    erase = augment and random_erasing > 0

    def make(step: int) -> Batch:
        (index, offsets, flips), rng = draw(step)
        if erase:
            boxes, noise = sample_erasing(rng, global_batch_size, source.image_shape, random_erasing)

        def view(r: slice | np.ndarray) -> np.ndarray:
            images = apply_crop_flip(source.images[index[r]], offsets[r], flips[r], crop_pad)
            if erase:
                images = apply_erasing(images, boxes[r], noise[r])
            return _resized(normalize(images, source.mean, source.std), image_size)

        if not mixup_alpha:
            return {"image": view(rows), "label": source.labels[index[rows]]}
        lam, partner = sample_mixup(rng, global_batch_size, mixup_alpha)
        targets = one_hot(source.labels[index], source.num_classes)
        mine, theirs = np.arange(global_batch_size)[rows], partner[rows]
        return {
            "image": lam * view(mine) + (1 - lam) * view(theirs),
            "label": lam * targets[mine] + (1 - lam) * targets[theirs],
        }

    return _prefetch(make, itertools.count(start_step), prefetch)


class BatchDraws(NamedTuple):
    """Which examples a global training batch holds, and where each is cropped and whether it is mirrored: all
    that is random about a batch but erasing and mixup. The host (`train_batches`) and the accelerator
    (`DeviceImages`) make the same batches from the same draws."""

    index: np.ndarray  # (B,) example ids
    offsets: np.ndarray  # (B, 2) crop offsets into the zero-padded image
    flips: np.ndarray  # (B,) bool


def train_draws(
    num_examples: int,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    augment: bool = True,
    pad: int = 4,
    flip: bool = True,
) -> Iterator[BatchDraws]:
    """The `BatchDraws` of the global training batches from ``start_step`` on, as `train_batches` draws them."""
    draw = _Drawer(num_examples, global_batch_size, seed, pad if augment else 0, flip and augment)
    return (draw(step)[0] for step in itertools.count(start_step))


class _Drawer:
    """Global batch ``step``'s draws, and the generator that its erasing and mixup draw from next."""

    def __init__(self, num_examples: int, global_batch_size: int, seed: int, pad: int, flip: bool) -> None:
        self.steps = steps_per_epoch(num_examples, global_batch_size)
        self.permutation = _EpochPermutation(num_examples, seed)
        self.batch, self.seed, self.pad, self.flip = global_batch_size, seed, pad, flip

    def __call__(self, step: int) -> tuple[BatchDraws, np.random.Generator]:
        epoch, i = divmod(step, self.steps)
        index = self.permutation(epoch)[i * self.batch : (i + 1) * self.batch]
        rng = np.random.default_rng([self.seed, step, 1])
        return BatchDraws(index, *sample_crop_flip(rng, self.batch, self.pad, self.flip)), rng


def eval_batches(
    source: ArraySource | StreamSource,
    *,
    batch_size: int,
    image_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Every example exactly once, in order, in global batches of ``batch_size`` split over the processes.

    Yields {"image", "label", "mask"}; the last global batch is padded with zeros and "mask" is 1.0
    for real examples, 0.0 for padding, so every batch has one shape (one compiled eval step) and
    every process runs the same number of steps. Metrics must be mask-weighted sums. (A streamed
    source gives each process a contiguous share of the split instead, padded at its end.) ``image_size``
    resizes as in `train_batches`.
    """
    _check_image_size(source, image_size)
    if isinstance(source, StreamSource):
        from resnet_jax.data import imagenet

        dataset = imagenet.eval_dataset(
            source, batch_size=batch_size, process_index=process_index, process_count=process_count
        )
        return imagenet.as_numpy(dataset)
    local = local_batch_size(batch_size, process_count)
    num_batches = -(-source.num_examples // batch_size)

    def make(b: int) -> Batch:
        start = b * batch_size + process_index * local
        index = np.arange(start, start + local)
        real = index[index < source.num_examples]
        height, width, channels = source.image_shape
        image = np.zeros((local, image_size or height, image_size or width, channels), np.float32)
        image[: len(real)] = _resized(normalize(source.images[real], source.mean, source.std), image_size)
        label = np.zeros(local, np.int32)
        label[: len(real)] = source.labels[real]
        return {"image": image, "label": label, "mask": (index < source.num_examples).astype(np.float32)}

    return _prefetch(make, range(num_batches), prefetch=2)


def measure_input_throughput(batches: Iterator[Batch], num_batches: int) -> float:
    """Images per second that ``batches`` delivers with nothing else running (the first batch is not timed)."""
    next(batches)
    images = 0
    start = time.perf_counter()
    for batch in itertools.islice(batches, num_batches):
        images += len(batch["image"])
    return images / (time.perf_counter() - start)


def _check_image_size(source: ArraySource | StreamSource, image_size: int | None) -> None:
    if image_size is not None and isinstance(source, StreamSource):
        raise ValueError(
            f"image_size applies to in-memory data sets; {source.name} crops its images to their size itself. "
            "Leave image_size unset."
        )
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size={image_size}: give a positive number of pixels, e.g. 64.")


def _resized(images: np.ndarray, image_size: int | None) -> np.ndarray:
    return images if image_size is None else resize(images, image_size)


class _EpochPermutation:
    """The example order of an epoch, kept for the epoch in progress."""

    def __init__(self, num_examples: int, seed: int) -> None:
        self.num_examples, self.seed = num_examples, seed
        self.epoch, self.order = -1, np.empty(0, np.int64)

    def __call__(self, epoch: int) -> np.ndarray:
        if epoch != self.epoch:
            self.epoch, self.order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self.order


_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _prefetch(make: Callable[[int], T], steps: Iterable[int], prefetch: int) -> Iterator[T]:
    """``make(step)`` for each step, computed up to ``prefetch`` ahead in a daemon thread.

    The thread starts with the first ``next`` and stops when the generator is closed or collected,
    so an abandoned pipeline neither leaks work nor holds up interpreter exit.
    """
    if prefetch < 1:
        yield from map(make, steps)
        return
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for step in steps:
                if not put(make(step)):
                    return
            put(_END)
        except BaseException as error:
            put(_Failure(error))

    thread = threading.Thread(target=work, name="resnet_jax-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
