"""What a benchmark row trains: model, input size, batch and precision, with the same synthetic batch and
optimizer settings for the JAX and the PyTorch side."""

from __future__ import annotations

import dataclasses

import numpy as np

PRECISIONS = ("fp32", "bf16")
# SGD with momentum 0.9 and coupled L2 weight decay on every parameter, as `create_optimizer` builds it
# from configs/default.py and as torch.optim.SGD(weight_decay=...) does it.
LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    """One train-step benchmark: ``batch`` images of ``image_size`` x ``image_size`` x ``channels`` on one device."""

    model: str
    image_size: int
    batch: int
    precision: str = "fp32"
    channels: int = 3
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; choose one of {', '.join(PRECISIONS)}.")
        if self.batch < 1 or self.image_size < 1:
            raise ValueError(f"batch ({self.batch}) and image size ({self.image_size}) must be positive.")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    @property
    def label(self) -> str:
        return f"{self.model} {self.image_size}x{self.image_size} batch {self.batch} {self.precision}"

    def synthetic_batch(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Normalised-looking NHWC float32 images and int labels, the same on both sides."""
        rng = np.random.default_rng(seed)
        images = rng.standard_normal((self.batch, *self.input_shape), dtype=np.float32)
        return images, rng.integers(0, self.num_classes, self.batch, dtype=np.int32)


# The suite: CIFAR-sized ResNet-20 at two batch sizes, and the ImageNet ResNet-50 of GPU training.
SUITE = (
    Case("resnet20", 32, 32),
    Case("resnet20", 32, 128),
    Case("resnet50", 224, 256, "bf16", num_classes=1000),
)
GPU_ONLY = {SUITE[2]: "resnet50 at 224x224, batch 256 takes minutes per step on a CPU"}
# Whole epochs with the data on the device (`epochs.py`): the CIFAR ResNets of the issue, a CIFAR-sized epoch.
EPOCH_MODELS = ("resnet20", "resnet56")
EPOCH_BATCH = 128
CIFAR_TRAIN_IMAGES = 50_000
GPU_SCAN_STEPS = 10  # steps per compiled call of the scanned epoch row, on a GPU by default
