"""The ``resnet-jax`` command: it loads the command line, and with it JAX, with Ctrl-C held back.

Loading JAX and Flax takes a second or more. A KeyboardInterrupt raised in that time lands inside the import
machinery, or inside an extension module's initialisation, which can crash the interpreter. So a Ctrl-C while
loading is only noted, and the command stops with one line as soon as the load ends. After that, Ctrl-C is
handled by `resnet_jax.cli.main` and by training. This works because the package itself loads nothing heavy
until it is used (`resnet_jax.__getattr__`).
"""

from __future__ import annotations

import signal
import sys
from typing import Any


def main() -> int:
    """Load `resnet_jax.cli` and run the command that ``sys.argv`` names."""
    interrupted: list[int] = []

    def note(signum: int, frame: Any) -> None:
        interrupted.append(signum)

    previous = signal.signal(signal.SIGINT, note)
    try:
        from resnet_jax.cli import main as run_command
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        print("resnet-jax: interrupted while loading; nothing ran", file=sys.stderr)
        return 128 + signal.SIGINT
    return run_command()
