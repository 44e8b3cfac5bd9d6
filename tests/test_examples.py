"""examples/, run with the installed wheel: ``--help`` answers without running the job,
reruns reuse a finished output, nothing is left in the temp folder, and grad_cam.py
writes its picture."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import VENV_BIN, run_outside

ROOT = Path(__file__).resolve().parents[1]
MINE = ["grad_cam.py", "activation_patching.py", "image_search.py", "visualizer_attention.py"]


@pytest.fixture
def run_example(venv):
    """Run an example with the installed wheel's Python (nothing of the checkout on its path)."""

    def run(script: str, *args: str, cwd: Path, tmp: Path) -> subprocess.CompletedProcess:
        return run_outside([venv / VENV_BIN / "python", ROOT / "examples" / script, *args], cwd=cwd, check=False,
                           TMPDIR=str(tmp), TORCHINDUCTOR_CACHE_DIR=str(tmp.parent / "inductor"))  # fmt: skip

    return run


@pytest.mark.parametrize("script", MINE)
def test_help_answers_without_running_the_job(run_example, script, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    done = run_example(script, "--help", cwd=tmp_path, tmp=tmp)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and done.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "inductor") == ["tmp"]  # no picture, no output
    assert list(tmp.iterdir()) == []


def test_grad_cam_writes_its_picture(run_example, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    done = run_example("grad_cam.py", "--out", "pictures/cam.png", cwd=tmp_path, tmp=tmp)
    assert done.returncode == 0, done.stderr
    assert "matches the hook-based Grad-CAM" in done.stdout  # the example checks itself against hooks
    pixels = imread(tmp_path / "pictures" / "cam.png")
    assert pixels.shape[:2] == (480, 720)  # 9 x 6 inches at 80 dpi: 2 images x (input, map, overlay)
    assert pixels[..., :3].std() > 0.05
    assert list(tmp.iterdir()) == []


def test_image_search_reruns_reuse_the_output_and_leave_no_temp_files(run_example, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    first = run_example("image_search.py", "--out", "feats", cwd=tmp_path, tmp=tmp)
    assert first.returncode == 0, first.stderr
    assert "16 images -> feats/" in first.stdout
    manifest = tmp_path / "feats" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    second = run_example("image_search.py", "--out", "feats", cwd=tmp_path, tmp=tmp)
    assert second.returncode == 0, second.stderr
    assert "already complete" in second.stdout + second.stderr
    assert manifest.stat().st_mtime_ns == stamp  # not computed again
    assert first.stdout.splitlines()[1:] == second.stdout.splitlines()[-len(first.stdout.splitlines()) + 1 :]
    assert list(tmp.iterdir()) == []  # the synthetic images went with their temporary folder
    without_out = run_example("image_search.py", cwd=tmp_path, tmp=tmp)
    assert without_out.returncode == 0, without_out.stderr
    assert list(tmp.iterdir()) == []
