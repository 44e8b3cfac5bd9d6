"""examples/: ``--help`` answers without running the job, reruns reuse a finished
output, nothing is left in the temp folder, and grad_cam.py writes its picture."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MINE = ["grad_cam.py", "activation_patching.py", "image_search.py", "visualizer_attention.py"]


def _run(script: str, *args: str, cwd: Path, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1",
               TORCHINDUCTOR_CACHE_DIR=str(tmp.parent / "inductor"),  # torch's own cache, not the example's
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.parametrize("script", MINE)
def test_help_answers_without_running_the_job(script, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    done = _run(script, "--help", cwd=tmp_path, tmp=tmp)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and done.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "inductor") == ["tmp"]  # no picture, no output
    assert list(tmp.iterdir()) == []


def test_grad_cam_writes_its_picture(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    done = _run("grad_cam.py", "--out", "pictures/cam.png", cwd=tmp_path, tmp=tmp)
    assert done.returncode == 0, done.stderr
    assert "matches the hook-based Grad-CAM" in done.stdout  # the example checks itself against hooks
    pixels = imread(tmp_path / "pictures" / "cam.png")
    assert pixels.shape[:2] == (480, 720)  # 9 x 6 inches at 80 dpi: 2 images x (input, map, overlay)
    assert pixels[..., :3].std() > 0.05
    assert list(tmp.iterdir()) == []


def test_image_search_reruns_reuse_the_output_and_leave_no_temp_files(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    first = _run("image_search.py", "--out", "feats", cwd=tmp_path, tmp=tmp)
    assert first.returncode == 0, first.stderr
    assert "16 images -> feats/" in first.stdout
    manifest = tmp_path / "feats" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    second = _run("image_search.py", "--out", "feats", cwd=tmp_path, tmp=tmp)
    assert second.returncode == 0, second.stderr
    assert "already complete" in second.stdout + second.stderr
    assert manifest.stat().st_mtime_ns == stamp  # not computed again
    assert first.stdout.splitlines()[1:] == second.stdout.splitlines()[-len(first.stdout.splitlines()) + 1 :]
    assert list(tmp.iterdir()) == []  # the synthetic images went with their temporary folder
    without_out = _run("image_search.py", cwd=tmp_path, tmp=tmp)
    assert without_out.returncode == 0, without_out.stderr
    assert list(tmp.iterdir()) == []
