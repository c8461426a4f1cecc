"""What the command reads from users, made hostile: 16-bit and oversized images, damaged IDX, PyTorch and config
files, outputs that exist or cannot be written, and random bytes fed to each reader. Every one must end in one
line of the command's faults (`resnet_jax.faults`, ValueError, FileNotFoundError), never a traceback or a hang."""

from __future__ import annotations

import contextlib
import gzip
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import torch
from idx_files import write_idx

from resnet_jax.cli import BAD_INPUT, CORRUPT_DATA, main
from resnet_jax.data import read_idx
from resnet_jax.faults import CorruptDataError
from resnet_jax.inference import read_image
from resnet_jax.models.torch_weights import read_state_dict
from resnet_jax.train.config import apply_override, load_config

REPO = Path(__file__).resolve().parent.parent
# What a reader may raise for bad bytes: each is one line of the CLI (exit 2 or 65), with no traceback.
READER_FAULTS = (ValueError, FileNotFoundError, CorruptDataError)


def write_png(path: Path, pixels: np.ndarray, bits: int) -> Path:
    """A PNG written byte by byte (PIL cannot write 16-bit colour): greyscale for 2-D ``pixels``, RGB for 3-D."""
    height, width = pixels.shape[:2]
    dtype = ">u2" if bits == 16 else "u1"
    rows = b"".join(b"\x00" + pixels[y].astype(dtype).tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    colour = 0 if pixels.ndim == 2 else 2
    header = struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_pngs_are_scaled_by_their_bit_depth(tmp_path, channels):
    rng = np.random.default_rng(0)
    grey, colour = rng.integers(0, 65536, (12, 10)), rng.integers(0, 65536, (12, 10, 3))
    for pixels in (grey, colour):
        path = write_png(tmp_path / f"{pixels.ndim}.png", pixels, bits=16)
        image = np.asarray(read_image(path, channels), np.float64)
        expected = pixels / 257  # 16 bits to 8
        if channels == 3 and pixels.ndim == 2:
            expected = np.repeat(expected[..., None], 3, axis=-1)
        if channels == 1 and pixels.ndim == 3:
            expected = expected @ np.array([0.299, 0.587, 0.114])  # PIL's L conversion
        np.testing.assert_allclose(image, expected, atol=1.01)
        assert (image == 255).mean() < 0.05  # PIL's own conversion made nearly every pixel 255


def test_an_image_over_the_pixel_limit_is_refused_in_one_line(tmp_path):
    path = tmp_path / "bomb.png"
    write_png(path, np.zeros((1, 1), np.uint8), bits=8)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 20_000, 20_000)  # the header claims 400 megapixels
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="too large to decode safely"):
        read_image(path)


def test_damaged_idx_files_name_the_file(tmp_path):
    good = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(good, np.zeros((4, 28, 28), np.uint8))
    data = good.read_bytes()
    for name, damaged in (("truncated.gz", data[: len(data) // 2]), ("garbled.gz", data[:10] + b"\xff" * 40)):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(CorruptDataError, match=rf"{name} is damaged .*delete it to download it again"):
            read_idx(tmp_path / name)


def test_damaged_pytorch_files_are_called_damaged(tmp_path):
    torch.save({"fc.weight": torch.zeros(10, 4)}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "random.safetensors").write_bytes(np.random.default_rng(1).bytes(4000))
    for name in ("truncated.pth", "random.pth", "random.safetensors"):
        with pytest.raises(CorruptDataError, match=f"{name} is damaged or not a weights file"):
            read_state_dict(tmp_path / name)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")
    with pytest.raises(ValueError, match="may be a whole pickled model"):
        read_state_dict(tmp_path / "model.pth")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("def get_config(:\n", "line 1: invalid syntax"),
        ("import no_such_module\n", "fails to load (ModuleNotFoundError"),
        ("x = 1\n", "has no get_config() function"),
        ("def get_config():\n    return {}\n", "returned dict, not a ConfigDict"),
        ("def get_config():\n    return 1 / 0\n", "raised ZeroDivisionError"),
    ],
)
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, capsys, text, message):
    path = tmp_path / "broken.py"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--workdir", str(tmp_path / "run")]) == BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1


def test_a_damaged_pytorch_file_exits_with_the_corrupt_data_status(tmp_path, capsys):
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(1000))
    args = [
        "convert",
        "--from-torch",
        str(tmp_path / "random.pth"),
        "--model",
        "resnet18",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == CORRUPT_DATA
    assert "is damaged or not a weights file" in capsys.readouterr().err


# ---- Fuzz: random bytes and random text, each reader must answer with one of its faults ----


def random_blobs(seed: int, count: int) -> list[bytes]:
    """Random bytes of random lengths, some starting like the real thing (an IDX magic, a gzip or PNG header)."""
    rng = np.random.default_rng(seed)
    starts = [b"", b"\x00\x00\x08\x03", b"\x00\x00\x08\x01", b"\x1f\x8b\x08\x00", b"\x89PNG\r\n\x1a\n", b"PK\x03\x04"]
    return [starts[i % len(starts)] + rng.bytes(int(rng.integers(0, 300))) for i in range(count)]


def test_fuzz_the_idx_reader(tmp_path):
    for index, blob in enumerate(random_blobs(0, 300)):
        for name, data in ((f"{index}", blob), (f"{index}.gz", gzip.compress(blob)), (f"{index}r.gz", blob)):
            (tmp_path / name).write_bytes(data)
            with contextlib.suppress(*READER_FAULTS):
                read_idx(tmp_path / name)


def test_fuzz_the_image_reader(tmp_path):
    for index, blob in enumerate(random_blobs(1, 300)):
        path = tmp_path / f"{index}.png"
        path.write_bytes(blob)
        for channels in (1, 3):
            with contextlib.suppress(*READER_FAULTS):
                read_image(path, channels)


def test_fuzz_the_config_overrides():
    config = load_config(REPO / "configs" / "default.py")
    rng = np.random.default_rng(2)
    alphabet = [*"abcdefghijklmnopqrstuvwxyz_.=0123456789-+eE()[]{}'\",:nainf ", "\x00", "\n", "1e999"]
    keys = [*config.keys(), "distributed.num_processes", "model_overrides.zero_init_residual", "no.such"]
    for _ in range(2000):
        key = keys[int(rng.integers(len(keys)))]
        value = "".join(rng.choice(alphabet, int(rng.integers(0, 12))))
        with contextlib.suppress(ValueError):
            apply_override(config.copy_and_resolve_references(), f"--config.{key}={value}")
    with pytest.raises(ValueError):
        apply_override(ml_collections.ConfigDict({"a": 1}), "--config.a=" + "[" * 500)


def test_fuzz_config_files_in_a_process_that_must_not_hang(tmp_path):
    """Random config files through the real command: every one ends in one line (or trains nothing, for none)."""
    files = []
    for index, blob in enumerate(random_blobs(3, 20)):
        files.append(tmp_path / f"config_{index}.py")
        files[-1].write_bytes(blob)
    script = (
        "import sys\nfrom resnet_jax.cli import main\n"
        "codes = [main(['train', '--config', f, '--workdir', f + '.run']) for f in sys.argv[1:]]\n"
        "print(codes)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, files)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert eval(done.stdout.strip().splitlines()[-1]) == [BAD_INPUT] * len(files)
    assert len([line for line in done.stderr.splitlines() if line.startswith("resnet-jax train: error:")]) == len(files)
