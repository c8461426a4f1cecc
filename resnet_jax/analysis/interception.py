"""Recording or rewriting what the parts of a model compute, without a second copy of the model.

Flax routes every method call of a bound module through the interceptors of ``nn.intercept_methods``.
The analyses use that to capture blocks, gate the backward pass through a branch or a skip, delete
blocks, and tap layer outputs. `intercept` is that interceptor written once: an analysis names the
calls it wants (a `Target`: a kind of module and one of its methods, e.g. `BLOCK`, `BRANCH`, `SKIP`)
and gives a hook for each; every other call runs unchanged. A hook receives the `Call` and returns
what the call should return: usually `Call.run()`, the original result, recorded or transformed.

Calls are numbered by residual block, in the order the forward pass reaches them, so a hook can
index per-block data (gates, deletion masks) with `Call.depth`, and the `BlockCount` that
`intercept` yields tells afterwards how many blocks ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn

from resnet_jax.models.blocks import Branch, PadShortcut, ProjectionShortcut, ResidualBlock


class Target(NamedTuple):
    """The calls of ``method`` on modules of the class (or any of the classes) ``modules``."""

    modules: type | tuple[type, ...]
    method: str = "__call__"


BLOCK = Target(ResidualBlock)  # a whole block: its output y
BRANCH = Target(Branch)  # a block's residual branch F
SKIP = Target(ResidualBlock, "_shortcut")  # the skip's value: the input itself, its pad or its projection
SHORTCUT_MODULE = Target((PadShortcut, ProjectionShortcut))  # the skip's submodule, where it has one


@dataclasses.dataclass(frozen=True)
class Call:
    """One intercepted call: the module, its arguments, and the block it is (`BLOCK`) or belongs to."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    depth: int  # 0 for the first residual block the forward pass calls; -1 for calls before it (the stem)
    original: Callable[..., Any]  # the method itself, as flax would have called it

    @property
    def inputs(self) -> Any:
        """The first argument: the input of a block, branch or layer."""
        return self.args[0]

    @property
    def path(self) -> str:
        """The module's place in the model, e.g. "stage2/block0/branch"."""
        return "/".join(self.module.path)

    def run(self) -> Any:
        """What the call computes unchanged."""
        return self.original(*self.args, **self.kwargs)

    def run_on(self, inputs: Any) -> Any:
        """What the call computes with ``inputs`` in place of its first argument."""
        return self.original(inputs, *self.args[1:], **self.kwargs)


Hook = Callable[[Call], Any]


@dataclasses.dataclass
class BlockCount:
    """The residual blocks the forward pass has called so far: all of them once it has run."""

    blocks: int = 0


@contextlib.contextmanager
def intercept(hooks: Mapping[Target, Hook]) -> Iterator[BlockCount]:
    """Within the block, every call that a target of ``hooks`` matches returns what its hook returns.

    Targets should not overlap; where they do, the first one listed wins.
    """
    count = BlockCount()

    def interceptor(original: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
        module, method = context.module, context.method_name
        if method == "__call__" and isinstance(module, ResidualBlock):
            count.blocks += 1  # before any hook runs: the block's own calls see its depth
        hook = next((h for t, h in hooks.items() if t.method == method and isinstance(module, t.modules)), None)
        if hook is None:
            return original(*args, **kwargs)
        return hook(Call(module, args, kwargs, count.blocks - 1, original))

    with nn.intercept_methods(interceptor):
        yield count
