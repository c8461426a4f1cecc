"""benchmarks/gallery.sh, the results gallery's one command, at toy sizes (DRY=1): it trains the nets, runs every
section's analysis on them, and when started again skips what is done."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("paths/paths.json", "paths_half/paths.json", "lesion/lesion.json", "landscape/landscape.json")
OUTPUTS += ("hessian/hessian.json", "cka/cka.json", "jacobian/jacobian.json", "lesion_drop_path/lesion.json")


@pytest.mark.slow  # five toy training runs and eight analyses: minutes
def test_the_gallery_script_trains_analyses_and_resumes_at_toy_sizes(tmp_path):
    env = os.environ | {
        "DRY": "1",
        "PYTHON": sys.executable,
        "RUNS": str(tmp_path / "gallery"),
        "PYTHONPATH": str(ROOT),
    }

    def run() -> str:
        script = ROOT / "benchmarks" / "gallery.sh"
        done = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        return done.stdout

    assert "all parts done" in run()
    assert (tmp_path / "gallery" / "degradation.json").is_file()
    assert sorted(p.name for p in (tmp_path / "gallery" / "runs").iterdir()) == [
        "plain14",
        "plain8",
        "resnet14",
        "resnet8",
    ]
    assert (tmp_path / "gallery" / "stochastic_depth" / "resnet8_drop0.5" / "curves.png").is_file()
    for output in OUTPUTS:
        assert (tmp_path / "gallery" / "analysis" / output).is_file(), output
    again = run()  # everything is there: nothing runs again
    assert again.count("done before") == 2 + len(OUTPUTS) and "limit" not in again
