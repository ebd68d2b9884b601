"""The kernel benchmark suite runs end to end on CPU (tiny shapes) and writes its CSV, markdown and plots."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; GPU runs are real benchmarks")
def test_kernels_suite_quick_on_cpu(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "bench", "--suite", "kernels", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "kernels.csv") as f:
        rows = list(csv.DictReader(f))
    ops = {r["op"] for r in rows}
    assert ops == {"masked_gather", "target_norm_gather", "target_norm_smooth_l1", "predictor_tokens", "ema"}
    providers = {(r["op"], r["provider"]) for r in rows}
    for op in ops:
        assert (op, "reference") in providers and (op, "triton") in providers
    assert ("masked_gather", "compile") in providers and ("ema", "foreach_lerp") in providers
    assert all(float(r["median"]) > 0 and float(r["gbps"]) > 0 for r in rows)
    assert "| masked_gather |" in (tmp_path / "kernels.md").read_text()
    for op in ops:
        assert (tmp_path / f"kernels_{op}.png").stat().st_size > 0
