"""scripts/gpu_check.sh --dry-run: every stage's command runs at tiny sizes on the CPU, and the summary, the log and
the results archive come out as they would on a GPU (at most 8 files, as the device tool brings back); the
kernel suite's results in it are checked as its own smoke test."""

import csv
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "step_fastjepa", "step_pytorch", "step_official", "step_report", "train", "profile", "tests",
          "blocks", "kernels", "attention", "step_fastjepa_fp8", "step_fastjepa_torchao_fp8", "step_fastjepa_fp8_all",
          "cuda_ext")


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
    assert "# Roofline of one step" in summary and "| category | floor ms |" in summary
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = set(tar.getnames())
        kernels = list(csv.DictReader(io.TextIOWrapper(tar.extractfile("./kernels/kernels.csv"))))
        blocks = list(csv.DictReader(io.TextIOWrapper(tar.extractfile("./blocks/kernels.csv"))))
        steps = list(csv.DictReader(io.TextIOWrapper(tar.extractfile("./step/train_step.csv"))))
        report = tar.extractfile("./step/train_step.md").read().decode()
        train = tar.extractfile("./train/train_check.md").read().decode()
    assert {"./step/train_step.md", "./step/train_step.png", "./profile/profile.md", "./kernels/kernels.md",
            "./attention/attention.md", "./env.txt", "./tests.log", "./train/train_check.log"} <= names
    # one process per step provider, one table with the ratios of all of them (the late fp8 providers included)
    assert [r["provider"] for r in steps] == ["fastjepa", "pytorch", "official", "fastjepa_fp8",
                                              "fastjepa_torchao_fp8", "fastjepa_fp8_all"]
    assert "| quick | fastjepa_fp8_all |" in report and "| quick | official | " in report
    assert "| quick | fp8=target, torchao's layers |" in summary
    # the real trainer on shards made on the spot, resumed from its checkpoint by a second run
    assert "(resumed) |" in train and "resumed to step" in summary
    assert "step_fastjepa: " in summary and "0 graphs left eager after a compile failure" in summary
    # the kernel suite (run by the interpreter here): every fused op against its baselines, with plots
    ops = {r["op"] for r in kernels}
    assert ops == {"masked_gather", "target_norm_gather", "target_norm_smooth_l1", "predictor_tokens", "ema"}
    providers = {(r["op"], r["provider"]) for r in kernels}
    assert all((op, "reference") in providers and (op, "triton") in providers for op in ops)
    assert ("masked_gather", "compile") in providers and ("ema", "foreach_lerp") in providers
    assert all(float(r["median"]) > 0 and float(r["gbps"]) > 0 for r in kernels)
    assert {f"./kernels/kernels_{op}.png" for op in ops} <= names
    # the block_impl and update_impl candidates, each against the PyTorch ops (and their compiled fusion)
    assert {(r["op"], r["provider"]) for r in blocks} >= {
        (op, p) for op in ("add_layer_norm", "bias_gelu", "residual_mlp", "layer_norm_fp8", "gelu_fp8",
                           "residual_mlp_fp8") for p in ("reference", "compile", "triton")
    } | {("adamw_ema", p) for p in ("reference", "separate", "triton")}
