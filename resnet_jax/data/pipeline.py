"""What every input pipeline shares: the settings of a run's batches, the protocol of a data source, and the
index-based draws that make every training batch a pure function of (seed, step).

The examples of global batch ``step`` are rows ``[i * B, (i + 1) * B)`` of the permutation of its
epoch, ``default_rng([seed, epoch])``, with i = step mod steps_per_epoch (each epoch drops its last
N mod B examples). Its augmentation is drawn for the whole global batch from
``default_rng([seed, step, 1])``. Process p of P then keeps rows ``[p * B / P, (p + 1) * B / P)``.
So a run restarted with ``start_step=k`` gets exactly the batches k, k+1, ... of a run from 0, and
the global batch is the same for any number of processes.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol, TypeVar

import numpy as np

from resnet_jax.data.augment import sample_crop_flip

Batch = dict[str, np.ndarray]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """Everything but the data and the step that decides a run's batches, checked when made.

    The training batches: ``batch_size`` examples over all processes, drawn with ``seed``; with ``augment``, a
    random crop from a zero padding of ``crop_padding`` pixels (0: none), a horizontal flip of half the images
    (``random_flip``; leave it off for digits), random erasing of a box in that fraction of the images
    (``random_erasing``) and mixup of pairs of images with weights ~ Beta(``mixup_alpha``, ``mixup_alpha``) (0:
    none). The evaluation batches hold ``eval_batch_size`` examples (None: ``batch_size``). ``image_size`` resizes
    images of an in-memory data set to N x N (None: as stored). This process, ``process_index`` of
    ``process_count``, keeps its equal share of the rows of every global batch.
    """

    batch_size: int
    eval_batch_size: int | None = None
    seed: int = 0
    augment: bool = True
    crop_padding: int = 4
    random_flip: bool = True
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    image_size: int | None = None
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self) -> None:
        if self.eval_batch_size is None:
            object.__setattr__(self, "eval_batch_size", self.batch_size)
        for name in ("batch_size", "eval_batch_size"):
            local_batch_size(getattr(self, name), self.process_count)
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index={self.process_index} is not one of the {self.process_count} processes.")
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding={self.crop_padding}: give the pixels of padding to crop from (0: none).")
        if not 0 <= self.random_erasing <= 1:
            raise ValueError(f"random_erasing={self.random_erasing}: give the fraction of images to erase, 0 to 1.")
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha={self.mixup_alpha}: give the Beta distribution's alpha (0: no mixup).")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size={self.image_size}: give a positive number of pixels, e.g. 64.")

    @property
    def applied_padding(self) -> int:
        """The zero padding crops are taken from: ``crop_padding`` when augmenting, else none."""
        return self.crop_padding if self.augment else 0

    @property
    def applied_flip(self) -> bool:
        """Whether half the images are mirrored: ``random_flip`` when augmenting."""
        return self.random_flip and self.augment

    @property
    def local_batch_size(self) -> int:
        """The rows of a global training batch that this process makes."""
        return local_batch_size(self.batch_size, self.process_count)


class Source(Protocol):
    """A split of a data set as the training loop, evaluation, bench and analysis use it, whether it is held in
    memory (`ArraySource`) or streamed (`StreamSource`): each kind makes its own batches."""

    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_examples(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    @property
    def in_memory(self) -> bool:
        """Whether the images are arrays in memory, which can be copied to the devices whole."""
        ...

    def check_settings(self, settings: BatchSettings) -> None:
        """Raise ValueError, saying what to change, where this source cannot make the training batches of
        ``settings``."""
        ...

    def train_batches(self, settings: BatchSettings, start_step: int = 0) -> Iterator[Batch]:
        """Endless training batches from ``start_step`` on: this process's rows of each global batch, as
        {"image": float32 NHWC normalised, "label": int32 (B,)}, or with mixup a float32 (B, num_classes) "label"."""
        ...

    def eval_batches(self, settings: BatchSettings) -> Iterator[Batch]:
        """Every example once, in batches of one shape {"image", "label", "mask"}: "mask" is 1.0 for real examples
        and 0.0 for the padding of the last batches, so metrics are mask-weighted sums and every process runs
        the same number of steps."""
        ...


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


class BatchDraws(NamedTuple):
    """Which examples a global training batch holds, and where each is cropped and whether it is mirrored: all
    that is random about a batch but erasing and mixup. The host (`ArraySource.train_batches`) and the accelerator
    (`DeviceImages`) make the same batches from the same draws."""

    index: np.ndarray  # (B,) example ids
    offsets: np.ndarray  # (B, 2) crop offsets into the zero-padded image
    flips: np.ndarray  # (B,) bool


def train_draws(num_examples: int, settings: BatchSettings, start_step: int = 0) -> Iterator[BatchDraws]:
    """The `BatchDraws` of the global training batches from ``start_step`` on, as the in-memory pipeline draws
    them."""
    draw = BatchDrawer(num_examples, settings)
    return (draw(step)[0] for step in itertools.count(start_step))


class BatchDrawer:
    """Global batch ``step``'s draws, and the generator that its erasing and mixup draw from next."""

    def __init__(self, num_examples: int, settings: BatchSettings) -> None:
        self.steps = steps_per_epoch(num_examples, settings.batch_size)
        self.permutation = EpochPermutation(num_examples, settings.seed)
        self.batch, self.seed = settings.batch_size, settings.seed
        self.pad, self.flip = settings.applied_padding, settings.applied_flip

    def __call__(self, step: int) -> tuple[BatchDraws, np.random.Generator]:
        epoch, i = divmod(step, self.steps)
        index = self.permutation(epoch)[i * self.batch : (i + 1) * self.batch]
        rng = np.random.default_rng([self.seed, step, 1])
        return BatchDraws(index, *sample_crop_flip(rng, self.batch, self.pad, self.flip)), rng


class EpochPermutation:
    """The example order of an epoch, kept for the epoch in progress."""

    def __init__(self, num_examples: int, seed: int) -> None:
        self.num_examples, self.seed = num_examples, seed
        self.epoch, self.order = -1, np.empty(0, np.int64)

    def __call__(self, epoch: int) -> np.ndarray:
        if epoch != self.epoch:
            self.epoch, self.order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self.order


def measure_input_throughput(batches: Iterator[Batch], num_batches: int) -> float:
    """Images per second that ``batches`` delivers with nothing else running (the first batch is not timed)."""
    next(batches)
    images = 0
    start = time.perf_counter()
    for batch in itertools.islice(batches, num_batches):
        images += len(batch["image"])
    return images / (time.perf_counter() - start)


_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(make: Callable[[int], T], steps: Iterable[int], ahead: int) -> Iterator[T]:
    """``make(step)`` for each step, computed up to ``ahead`` steps in advance in a daemon thread, so that making
    a batch overlaps the train step.

    The thread starts with the first ``next`` and stops when the generator is closed or collected,
    so an abandoned pipeline neither leaks work nor holds up interpreter exit.
    """
    if ahead < 1:
        yield from map(make, steps)
        return
    ready: queue.Queue = queue.Queue(maxsize=ahead)
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
