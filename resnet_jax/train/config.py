"""Load an experiment config file and apply ``--config.KEY=VALUE`` overrides, checked against its keys.

The experiments of configs/ are shipped with the package (as the top-level ``configs`` package, beside
``resnet_jax``), so a name such as ``fashion_mnist_resnet20`` finds its file in a checkout and in an install.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import difflib
import functools
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

# configs/ beside the resnet_jax package: the checkout's folder, or the installed copy in site-packages.
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"

# Every config must define these (the CLI, the README and the tests rely on them).
REQUIRED_KEYS = (
    "model",
    "dataset",
    "data_dir",
    "batch_size",
    "num_train_steps",
    "learning_rate",
    "seed",
    "eval_every_steps",
    "checkpoint_every_steps",
)
# Keys renamed since runs were saved with them: old name -> new name (a dotted path for nested keys).
RENAMED_KEYS = {"threads": "batch_parts", "model_overrides.residual": "model_overrides.skip_connections"}
RENAMED_VALUES = {("parallelism", "threads"): "batch_parts"}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``get_config()`` of an experiment file (`config_file`), with ``KEY=VALUE`` overrides (nested keys by dots)."""
    path = config_file(path)
    # Experiment files import `configs.default`: make the folder holding configs/ importable.
    root = str(path.resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    config = run_config_file(path)
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"Config {str(path)!r} lacks the keys {missing}; start it from configs/default.py.")
    for override in overrides:
        apply_override(config, override)
    return config


def run_config_file(path: Path) -> ml_collections.ConfigDict:
    """``get_config()`` of the experiment file ``path``; a file that does not run, or does not return a config,
    is one line naming the file and the line at fault."""
    spec = importlib.util.spec_from_file_location(f"_resnet_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ValueError(f"Config {str(path)!r} line {error.lineno}: {error.msg}; fix the file.") from None
    except Exception as error:
        raise ValueError(
            f"Config {str(path)!r} fails to load ({type(error).__name__}: {error}); fix the file."
        ) from None
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"Config {str(path)!r} has no get_config() function; start it from configs/default.py.")
    try:
        config = module.get_config()
    except Exception as error:
        raise ValueError(
            f"get_config() of {str(path)!r} raised {type(error).__name__}: {error}; fix the file."
        ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"get_config() of {str(path)!r} returned {type(config).__name__}, not a ConfigDict.")
    return config


def read_saved_config(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """The config a checkpoint recorded (`run_meta`) in today's names: runs saved before a key or a value was
    renamed (`RENAMED_KEYS`, `RENAMED_VALUES`) load, evaluate and resume as they trained."""
    saved = copy.deepcopy(saved)
    for old, new in RENAMED_KEYS.items():  # a renamed key keeps its place: only the last name changes
        *parents, leaf = old.split(".")
        node = functools.reduce(lambda node, key: node.get(key) or {}, parents, saved)
        if leaf in node:
            node[new.rsplit(".", 1)[-1]] = node.pop(leaf)
    for (key, old_value), new_value in RENAMED_VALUES.items():
        if saved.get(key) == old_value:
            saved[key] = new_value
    return ml_collections.ConfigDict(saved)


def config_file(name_or_path: str | Path) -> Path:
    """The experiment file ``name_or_path`` names: a path to a file, else a packaged config.

    A bare name (``fashion_mnist_resnet20``) or a path under configs/ that is not here (``configs/default.py``,
    as the README writes them, run outside a checkout) is the file of that name in `CONFIGS_DIR`.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = CONFIGS_DIR / f"{path.name.removesuffix('.py')}.py"
    if path.parent in (Path(), Path("configs")) and packaged.is_file():
        return packaged
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
    raise FileNotFoundError(
        f"No config file {str(path)!r}. Give the path of an experiment file, or the name of a packaged one: "
        f"{', '.join(names)}."
    )


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Set ``KEY=VALUE`` (``a.b=VALUE`` for nested keys) with VALUE parsed as a Python literal."""
    key, sep, text = override.removeprefix("--config.").removeprefix("config.").partition("=")
    if not sep:
        raise ValueError(f"Override {override!r} is not KEY=VALUE (for example --config.batch_size=256).")
    *parents, leaf = key.split(".")
    node = config
    for depth, name in enumerate([*parents, leaf]):
        if name not in node:
            prefix = ".".join([*parents[:depth], name])
            renamed = RENAMED_KEYS.get(prefix)
            close = difflib.get_close_matches(name, list(node.keys()), n=1)
            hint = f" Did you mean {'.'.join([*parents[:depth], *close])!r}?" if close else ""
            hint = f" It is now called {renamed!r}." if renamed else hint
            raise ValueError(f"Unknown config key {prefix!r}.{hint} Valid keys here: {sorted(node.keys())}.")
        if name != leaf:
            node = node[name]
    current = node[leaf]
    value = _parse(text, current)
    try:
        node[leaf] = value
    except TypeError:
        raise ValueError(f"--config.{key}={text}: expected a {type(current).__name__} value, as {current!r}.") from None


def _parse(text: str, current: object) -> object:
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"Expected true or false, got {text!r}.")
    try:
        with warnings.catch_warnings():  # "1abc" warns of an invalid literal: it is a bare word, a string
            warnings.simplefilter("ignore", SyntaxWarning)
            value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if isinstance(current, float):
            with contextlib.suppress(ValueError):
                return float(text)  # nan, inf: parsed, so that the range checks can name them
        return text  # a bare word: a string
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    return value
