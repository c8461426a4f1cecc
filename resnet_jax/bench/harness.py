"""Run the train-step rows with JAX and PyTorch interleaved, and reduce them to medians and ratios.

Both frameworks share the machine with whatever else runs on it, so one timing says little: each
repeat times ``steps`` steps of every runner in turn (JAX, its other rows: XLA options, batch parts,
several processes; then each torch variant), a rate is the batch over a median step time, and a ratio is the
median over repeats of one rate over another in the same repeat (JAX's over torch's, or a further JAX
row's over the first's), so that load drifting between repeats cancels out.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from resnet_jax.bench.cases import GPU_ONLY, SUITE, Case

if TYPE_CHECKING:
    from resnet_jax.bench.jax_side import XlaOptions


class Runner(Protocol):
    """What every timed runner has: a framework and a variant that name its row, and a compile (seconds)."""

    framework: str
    variant: str

    def compile(self) -> float: ...


class StepRunner(Runner, Protocol):
    """One framework's train step on one case (`JaxStep`, `TorchStep`)."""

    def run(self, num_steps: int) -> list[float]: ...

    def peak_memory(self) -> tuple[int | None, str]: ...


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 20  # timed steps per repeat and runner
    warmup: int = 3  # untimed steps after compilation
    repeats: int = 3

    def __post_init__(self) -> None:
        if self.steps < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError(
                f"--steps ({self.steps}) and --repeats ({self.repeats}) must be at least 1, --warmup "
                f"({self.warmup}) at least 0."
            )


@dataclasses.dataclass(frozen=True)
class StepRow:
    """One runner's timings on one case: compile time apart, then ``repeats`` lists of step seconds."""

    case: Case
    framework: str
    variant: str
    compile_seconds: float
    step_seconds: list[list[float]]
    peak_memory_bytes: int | None
    memory_source: str

    @property
    def img_per_s(self) -> float:
        return self.case.batch / statistics.median(t for repeat in self.step_seconds for t in repeat)

    @property
    def img_per_s_per_repeat(self) -> list[float]:
        return [self.case.batch / statistics.median(repeat) for repeat in self.step_seconds]

    @property
    def name(self) -> str:
        return f"{self.framework} {self.variant}"

    @property
    def label(self) -> str:
        return self.case.label


def ratio(row: StepRow, other: StepRow) -> float:
    """How many times faster ``row`` ran than ``other`` (JAX than torch, or a further JAX row than the first):
    the median over repeats of their img/s ratio in the same repeat."""
    pairs = zip(row.img_per_s_per_repeat, other.img_per_s_per_repeat, strict=True)
    return statistics.median(mine / theirs for mine, theirs in pairs)


def compile_runners(label: str, runners: Sequence[Runner], say: Callable[[str], None]) -> list[float]:
    """Each runner's compile seconds, saying which one compiles before it starts: on a GPU one compile can take
    minutes, and a silent bench cannot be told from a stuck one."""
    seconds = []
    for runner in runners:
        say(f"{label}: compiling {runner.framework} {runner.variant}")
        seconds.append(runner.compile())
    return seconds


def time_runners(
    case: Case, runners: Sequence[StepRunner], settings: Settings, say: Callable[[str], None] = lambda line: None
) -> list[StepRow]:
    """Compile and warm every runner, then time them in turn, ``settings.repeats`` times; ``say`` hears each
    stage as it begins."""
    compile_seconds = compile_runners(case.label, runners, say)
    for runner in runners:
        runner.run(settings.warmup)
    say(f"{case.label}: timing {settings.repeats} round(s) of {settings.steps} steps of each")
    timings: list[list[list[float]]] = [[] for _ in runners]
    for _ in range(settings.repeats):
        for runner, times in zip(runners, timings, strict=True):
            times.append(runner.run(settings.steps))
    return [
        StepRow(case, runner.framework, runner.variant, seconds, times, *runner.peak_memory())
        for runner, seconds, times in zip(runners, compile_seconds, timings, strict=True)
    ]


def default_cases(platform: str) -> tuple[list[Case], list[str]]:
    """The suite for this platform, and a line for each case it leaves out."""
    if platform != "cpu":
        return list(SUITE), []
    cases = [case for case in SUITE if case not in GPU_ONLY]
    skipped = [
        f"skipped {case.label}: a GPU case ({why}); force it with --model {case.model} --image-size "
        f"{case.image_size} --batch {case.batch} --precision {case.precision}"
        for case, why in GPU_ONLY.items()
    ]
    return cases, skipped


def default_torch_variants(device: str) -> tuple[str, ...]:
    """Eager everywhere; on a GPU also AMP with channels_last and torch.compile."""
    return ("eager",) if device == "cpu" else ("eager", "channels_last", "compile")


def bench_cases(
    cases: Sequence[Case],
    settings: Settings,
    torch_variants: Sequence[str] = (),
    report: Callable[[list[StepRow]], None] = lambda rows: None,
    cpu_processes: int | None = None,
    batch_parts: int = 0,
    say: Callable[[str], None] = lambda line: None,
    xla_options: Sequence[XlaOptions] = (),
) -> list[StepRow]:
    """Every case with JAX (also compiled with each of ``xla_options``, on ``cpu_processes`` pinned processes, and
    as ``batch_parts`` batch parts side by side, if given) and, if ``torch_variants`` is not empty, those torch
    variants; ``report`` sees each case's rows as soon as they are measured."""
    from resnet_jax.bench.jax_side import JaxStep
    from resnet_jax.bench.processes import JaxProcesses

    rows = []
    for case in cases:
        runners: list[StepRunner] = [JaxStep.of_case(case)]
        runners += [JaxStep.of_case(case, xla_options=options) for options in xla_options]
        if batch_parts:
            runners.append(JaxStep.of_case(case, batch_parts=batch_parts))
        if cpu_processes:
            runners.append(JaxProcesses(case, cpu_processes))
        if torch_variants:
            from resnet_jax.bench.torch_side import TorchStep

            runners += [TorchStep(case, variant) for variant in torch_variants]
        try:
            case_rows = time_runners(case, runners, settings, say)
        finally:
            for runner in runners:
                if isinstance(runner, JaxProcesses):
                    runner.close()
        report(case_rows)
        rows += case_rows
    return rows
