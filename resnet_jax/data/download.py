"""MNIST and Fashion-MNIST fetched where they are missing: the four IDX files of each, from their publishers,
each kept only once its size and SHA-256 match the ones pinned here.

A file is written under a temporary name in its folder and renamed into place after the check, so neither an
interrupted nor a corrupted download leaves a file that a later run would trust; the files in a folder are used
as they are (ones put there by hand too). Two environment variables move the defaults, as TFDS_DATA_DIR does
for tfds: ``RESNET_JAX_DATA_DIR`` (where data sets go when no data_dir is given, instead of
``~/.cache/resnet-jax/datasets``) and ``RESNET_JAX_DATA_MIRROR`` (a server holding the same files as
``MIRROR/DATASET/FILE``, instead of the publishers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, TextIO

DATA_DIR_VARIABLE = "RESNET_JAX_DATA_DIR"
MIRROR_VARIABLE = "RESNET_JAX_DATA_MIRROR"
ATTEMPTS = 3  # a download that breaks off or arrives with other bytes is tried again, this many times in all
TIMEOUT_S = 60  # for connecting and for each read
CHUNK_BYTES = 1 << 16
PROGRESS_MIN_BYTES = 1 << 20  # files this large report their progress in quarters


@dataclasses.dataclass(frozen=True)
class PinnedFile:
    """A file as its publisher serves it: name, size in bytes and SHA-256 (hex)."""

    name: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class PublishedFiles:
    """The files of one data set and the folder URL they are published under."""

    url: str
    files: tuple[PinnedFile, ...]

    def file(self, name: str) -> PinnedFile:
        return next(pinned for pinned in self.files if pinned.name == name)


# The sizes and sums are those that tensorflow_datasets pins for the same URLs.
IDX_DOWNLOADS = {
    "fashion_mnist": PublishedFiles(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        (
            PinnedFile(
                "train-images-idx3-ubyte.gz",
                26421880,
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            ),
            PinnedFile(
                "train-labels-idx1-ubyte.gz", 29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
            ),
            PinnedFile(
                "t10k-images-idx3-ubyte.gz", 4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
            ),
            PinnedFile(
                "t10k-labels-idx1-ubyte.gz", 5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
            ),
        ),
    ),
    "mnist": PublishedFiles(
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        (
            PinnedFile(
                "train-images-idx3-ubyte.gz",
                9912422,
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            ),
            PinnedFile(
                "train-labels-idx1-ubyte.gz", 28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
            ),
            PinnedFile(
                "t10k-images-idx3-ubyte.gz", 1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
            ),
            PinnedFile(
                "t10k-labels-idx1-ubyte.gz", 4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
            ),
        ),
    ),
}


class DownloadError(OSError):
    """A file could not be downloaded, or never arrived with the pinned bytes; the message says how to get it."""


def default_folder(dataset: str) -> Path:
    """Where ``dataset`` goes when no data_dir is given: ``$RESNET_JAX_DATA_DIR/DATASET``, else the user's cache."""
    root = os.environ.get(DATA_DIR_VARIABLE)
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(cache) / "resnet-jax" / "datasets"
    return Path(root).expanduser() / dataset


def file_url(dataset: str, name: str) -> str:
    """The URL of one file: on the mirror of ``$RESNET_JAX_DATA_MIRROR`` when set, else at its publisher."""
    mirror = os.environ.get(MIRROR_VARIABLE)
    if mirror:
        return f"{mirror.rstrip('/')}/{dataset}/{name}"
    return IDX_DOWNLOADS[dataset].url + name


def fetch_files(dataset: str, names: Iterable[str], folder: Path, log: TextIO | None = None) -> None:
    """Download the files ``names`` of ``dataset`` into ``folder``, each checked against its pinned size and sum.

    Progress and retries are reported on ``log`` (default: stderr). Raises `DownloadError`, naming the file, its
    URL and where to put it by hand, when a server cannot be reached or never sends the pinned bytes.
    """
    log = log or sys.stderr
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        url = file_url(dataset, name)
        by_hand = f"Without network here, fetch {url} elsewhere and put it at {folder / name}."
        try:
            fetch(url, folder / name, IDX_DOWNLOADS[dataset].file(name), log)
        except urllib.error.HTTPError as error:
            raise DownloadError(
                f"Could not download {dataset}'s {name} to {folder}: {url} answered HTTP {error.code} "
                f"{error.reason}. {by_hand}"
            ) from None
        except urllib.error.URLError as error:
            raise DownloadError(
                f"Could not download {dataset}'s {name} to {folder}: {url} cannot be reached ({error.reason}). "
                f"{by_hand}"
            ) from None


def unreachable(url: str) -> str | None:
    """Why the server of ``url`` cannot be reached, or None when it answers (with any HTTP status).

    A quick test ahead of tools that retry a dead connection for minutes (tfds' downloader).
    """
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "resnet-jax"})
    try:
        urllib.request.urlopen(request, timeout=TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except urllib.error.URLError as error:
        return str(error.reason)
    except OSError as error:
        return str(error)
    return None


def fetch(url: str, path: Path, pinned: PinnedFile, log: TextIO) -> Path:
    """``url`` saved at ``path`` once its size and SHA-256 are ``pinned``'s; tried up to `ATTEMPTS` times."""
    print(f"Downloading {url} ({_in_units(pinned.size)}) to {path.parent}", file=log, flush=True)
    for attempt in range(1, ATTEMPTS + 1):
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(descriptor, "wb") as out:
                size, sha256 = _copy(url, out, pinned.size, log)
            if (size, sha256) == (pinned.size, pinned.sha256):
                os.replace(temporary, path)  # atomic: the file appears whole and checked, or not at all
                return path
            if size != pinned.size:
                problem = f"arrived as {size} bytes, not the pinned {pinned.size}"
            else:
                problem = f"arrived with SHA-256 {sha256}, not the pinned {pinned.sha256}"
        except (http.client.HTTPException, ConnectionError, TimeoutError) as error:  # the transfer broke off
            problem = f"broke off ({type(error).__name__}: {error})"
        finally:
            Path(temporary).unlink(missing_ok=True)
        print(f"{url} {problem}; {'trying again' if attempt < ATTEMPTS else 'giving up'}.", file=log, flush=True)
    raise DownloadError(
        f"Gave up on {url} after {ATTEMPTS} tries, keeping nothing in {path.parent}: the last one {problem}. If a "
        f"proxy or mirror ({MIRROR_VARIABLE}) serves other bytes, fetch {pinned.name} from its publisher and put "
        f"it at {path}."
    )


def _copy(url: str, out: BinaryIO, expected_size: int, log: TextIO) -> tuple[int, str]:
    """Stream ``url`` into ``out``; its size and SHA-256. Files over `PROGRESS_MIN_BYTES` report each quarter."""
    digest, size, quarter = hashlib.sha256(), 0, 0
    request = urllib.request.Request(url, headers={"User-Agent": "resnet-jax"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            if expected_size >= PROGRESS_MIN_BYTES and quarter < 4 and size * 4 // expected_size > quarter:
                quarter = min(size * 4 // expected_size, 4)
                name = url.rsplit("/", 1)[-1]
                print(f"  {name}: {25 * quarter}% of {_in_units(expected_size)}", file=log, flush=True)
    return size, digest.hexdigest()


def _in_units(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"
