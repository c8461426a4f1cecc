"""The JAX train step as ``resnet-jax train --cpu-processes N`` runs it: N processes of one job, each pinned
to its own cores, pmap over one CPU device per process, gradients averaged through gloo.

`JaxProcesses` is a step runner like `JaxStep`; it drives its worker processes through their stdin and reads
one JSON line back from each. Between commands the workers block on stdin, so the cores are free for the
runners timed in between (PyTorch uses all of them).

    python -m resnet_jax.bench.processes CASE_JSON ADDRESS NUM_PROCESSES RANK   # one worker (started for you)
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from typing import Any

from resnet_jax.bench.cases import Case
from resnet_jax.cpu.host_memory import keep_freed_host_memory
from resnet_jax.cpu.processes import cores_per_process, start_cpu_processes

REPLY = "resnet-jax-bench-reply "  # marks the workers' answers among anything else they print


class JaxProcesses:
    """``JaxStep`` on ``num_processes`` pinned CPU processes; the global batch is ``case.batch``."""

    framework = "jax"

    @staticmethod
    def core_groups_for(case: Case, num_processes: int) -> list[list[int]]:
        """Each process's cores; refuses a split that cannot run (the CLI asks before timing anything)."""
        groups = cores_per_process(num_processes)
        if case.batch % num_processes:
            raise ValueError(f"batch {case.batch} does not split over {num_processes} processes; make it a multiple.")
        return groups

    def __init__(self, case: Case, num_processes: int) -> None:
        groups = self.core_groups_for(case, num_processes)
        self.variant = f"pmap, {num_processes} processes"
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (the workers' stderr, shown if one fails; closed by close())
        self._workers = start_cpu_processes(
            lambda address, rank: [
                *(sys.executable, "-m", "resnet_jax.bench.processes"),
                *(json.dumps(dataclasses.asdict(case)), address, str(num_processes), str(rank)),
            ],
            groups,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def _ask(self, command: dict[str, Any]) -> Any:
        """Send ``command`` to every worker; process 0's answer."""
        for worker in self._workers:
            worker.stdin.write(json.dumps(command) + "\n")
            worker.stdin.flush()
        answers = [self._answer(rank) for rank in range(len(self._workers))]
        return answers[0]

    def _answer(self, rank: int) -> Any:
        for line in self._workers[rank].stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        for worker in self._workers:  # the others would wait for it in a collective
            worker.kill()
            worker.wait()
        self._log.seek(0)
        log = self._log.read()
        self.close()
        raise RuntimeError(f"bench worker {rank} stopped:\n{log[-3000:]}")

    def compile(self) -> float:
        return self._ask({"do": "compile"})

    def run(self, num_steps: int) -> list[float]:
        return self._ask({"do": "run", "steps": num_steps})

    def peak_memory(self) -> tuple[int | None, str]:
        size, source = self._ask({"do": "peak_memory"})
        return size, f"{source}, in each process"

    def close(self) -> None:
        """Stop the workers (they exit when their stdin closes)."""
        for worker in self._workers:
            if worker.stdin and not worker.stdin.closed:
                worker.stdin.close()
        for worker in self._workers:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
        self._log.close()


def serve(case: Case, address: str, num_processes: int, rank: int) -> None:
    """One worker: join the job, build this process's share of the step, answer commands until stdin closes."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes, rank)
    from resnet_jax.bench.jax_side import JaxStep

    step = JaxStep.of_case(case)
    actions = {
        "compile": lambda command: step.compile(),
        "run": lambda command: step.run(command["steps"]),
        "peak_memory": lambda command: step.peak_memory(),
    }
    for line in sys.stdin:
        command = json.loads(line)
        print(REPLY + json.dumps(actions[command["do"]](command)), flush=True)


if __name__ == "__main__":
    keep_freed_host_memory()
    case_json, address, num_processes, rank = sys.argv[1:]
    serve(Case(**json.loads(case_json)), address, int(num_processes), int(rank))
