"""The PyTorch side: the same architecture (`torch_models`), batch, loss, optimizer and precision.

Variants: "eager" (NCHW; bf16 through autocast), "channels_last" (NHWC memory format, autocast in the
case's precision: torch's AMP recipe for GPUs) and "compile" (``torch.compile`` of the channels_last
model; backward and optimizer stay eager). torch is imported only here, when a torch row runs.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import Any

from resnet_jax.bench.cases import LEARNING_RATE, MOMENTUM, WEIGHT_DECAY, Case
from resnet_jax.extras import require

VARIANTS = ("eager", "channels_last", "compile")


def torch_device() -> str:
    """ "cuda" where torch sees a GPU, else "cpu"."""
    return "cuda" if require("torch").cuda.is_available() else "cpu"


class TorchStep:
    """Times one SGD step of the torch model: forward, cross-entropy, backward, optimizer update."""

    framework = "torch"

    def __init__(self, case: Case, variant: str, seed: int = 0) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"torch variant {variant!r}; choose from {', '.join(VARIANTS)}.")
        torch = require("torch")
        from resnet_jax.bench import torch_models

        self.variant = variant
        self.torch = torch
        self.device = torch.device(torch_device())
        torch.manual_seed(seed)
        model = torch_models.create(case.model, case.num_classes).to(self.device).train()
        if variant != "eager":
            model = model.to(memory_format=torch.channels_last)
        images, labels = case.synthetic_batch(seed)
        self._images = self.in_memory_format(torch.from_numpy(images.transpose(0, 3, 1, 2)).to(self.device))
        self._labels = torch.from_numpy(labels).long().to(self.device)
        self._optimizer = torch.optim.SGD(
            model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        self._forward = torch.compile(model) if variant == "compile" else model
        self._autocast = case.precision == "bf16"
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def in_memory_format(self, images: Any) -> Any:
        """NCHW ``images`` laid out as this variant's model expects them (channels_last but for "eager")."""
        layout = self.torch.contiguous_format if self.variant == "eager" else self.torch.channels_last
        return images.contiguous(memory_format=layout)

    def compile(self) -> float:
        """The first step, which is where torch.compile compiles; returns its seconds."""
        return sum(self.run(1))

    def run(self, num_steps: int) -> list[float]:
        times = []
        for _ in range(num_steps):
            began = time.perf_counter()
            self.step(self._images, self._labels)
            self.synchronize()
            times.append(time.perf_counter() - began)
        return times

    def step(self, images: Any, labels: Any) -> None:
        """One SGD step on a batch (forward, cross-entropy, backward, update), not waited for."""
        with self._precision():
            loss = self.torch.nn.functional.cross_entropy(self._forward(images).float(), labels)
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._optimizer.step()

    def synchronize(self) -> None:
        """Wait for the device (a GPU runs torch's work asynchronously; a CPU has finished already)."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def peak_memory(self) -> tuple[int | None, str]:
        """The GPU's peak allocation, or on CPU the process's peak resident memory (JAX's included)."""
        if self.device.type == "cuda":
            return int(self.torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return int(peak), "process peak RSS (both frameworks)"

    def _precision(self) -> Any:
        if not self._autocast:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)
