"""scripts/gpu_check.sh --dry-run: every stage's command runs at tiny sizes on the CPU, and the summary, the log and
the results archive come out as they would on a GPU (at most 8 files, as the device tool brings back)."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "tests", "step", "profile", "attention", "kernels", "cuda_ext")


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_the_summary(tmp_path):
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "results.tar.gz", "summary.md"]
    summary = (tmp_path / "summary.md").read_text()
    for stage in STAGES:
        assert f"| {stage} | ok |" in summary, summary
    assert "| quick |" in summary and "| category | ms | share |" in summary and "dry run" in summary
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./step/train_step.md", "./step/train_step.png", "./profile/profile.md", "./kernels/kernels.md",
            "./attention/attention.md", "./env.txt", "./tests.log"} <= names
