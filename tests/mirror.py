"""A stand-in for the publishers of MNIST and Fashion-MNIST: an HTTP server on 127.0.0.1 serving IDX files made
by the tests as ``/DATASET/FILE`` (the layout of ``RESNET_JAX_DATA_MIRROR``), able to send a file corrupted or
cut short; and the pinned sizes and sums that go with its files, for this process or for child processes."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import threading
from pathlib import Path

from idx_files import make_idx_folder

from resnet_jax.data.download import PinnedFile, PublishedFiles

FAULTS = ("corrupt", "truncate", "missing")


class Mirror:
    """Serves ``files`` (URL path -> bytes) until closed; ``faults[path]`` lists what goes wrong with the next
    requests of that path ("corrupt": one byte changed, "truncate": the connection closes halfway, "missing": 404).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = {}
        self.requests: list[str] = []
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def add_idx_dataset(self, dataset: str, folder: Path, num_train: int = 64, num_test: int = 40) -> dict:
        """Gzipped IDX files of random images (written into ``folder``) served as ``dataset``'s; their arrays."""
        arrays = make_idx_folder(folder, compressed=True, num_train=num_train, num_test=num_test)
        for path in sorted(folder.glob("*.gz")):
            self.files[f"/{dataset}/{path.name}"] = path.read_bytes()
        return arrays

    def published(self, dataset: str) -> PublishedFiles:
        """The pinned sizes and sums of ``dataset``'s files as this mirror serves them (without faults)."""
        prefix = f"/{dataset}/"
        files = tuple(
            PinnedFile(path.removeprefix(prefix), len(data), hashlib.sha256(data).hexdigest())
            for path, data in sorted(self.files.items())
            if path.startswith(prefix)
        )
        return PublishedFiles(self.url + prefix, files)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                pending = mirror.faults.get(self.path, [])
                fault = pending.pop(0) if pending else None
                data = mirror.files.get(self.path)
                if data is None or fault == "missing":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "corrupt":
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                self.wfile.write(data[: len(data) // 2] if fault == "truncate" else data)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def write_child_setup(folder: Path, pinned: dict[str, PublishedFiles], blocked: tuple[str, ...] = ()) -> Path:
    """A ``sitecustomize.py`` in ``folder`` for child processes (put ``folder`` first on their PYTHONPATH): it pins
    the mirror's sums in place of the publishers' and makes the modules ``blocked`` unimportable, as in an install
    without them."""
    folder.mkdir(parents=True, exist_ok=True)
    table = {name: [files.url, [dataclasses.astuple(f) for f in files.files]] for name, files in pinned.items()}
    (folder / "pinned.json").write_text(json.dumps(table))
    (folder / "sitecustomize.py").write_text(
        "import json, sys\n"
        "from pathlib import Path\n"
        f"for name in {list(blocked)!r}:\n"
        "    sys.modules[name] = None  # `import name` raises ImportError, as where it is not installed\n"
        "from resnet_jax.data import download\n"
        "for dataset, (url, files) in json.loads((Path(__file__).parent / 'pinned.json').read_text()).items():\n"
        "    pinned = tuple(download.PinnedFile(*f) for f in files)\n"
        "    download.IDX_DOWNLOADS[dataset] = download.PublishedFiles(url, pinned)\n"
    )
    return folder
