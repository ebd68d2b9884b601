"""The trainer in one process: CLI errors, the CLI on the demo config, NaN skipping and divergence stop,
kill -9 and resume with identical per-step losses, preemption signal, starting from an official checkpoint."""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastjepa import config
from fastjepa import step as fj_step
from fastjepa import train as fj_train
from fastjepa.checkpoint import CheckpointManager
from fastjepa.ijepa import IJEPA
from fastjepa.metrics import read_jsonl
from fastjepa.spec import ModelSpec

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["meta.model_name=vit_micro", "meta.pred_emb_dim=32", "meta.pred_depth=1", "train.progress=lines",
        "train.export=false", "train.log_every=1", "train.device=cpu"]


def tiny_cfg(folder: Path, *overrides: str):
    return config.load(ROOT / "configs/test_tiny.yaml", [*TINY, f"logging.folder={folder}", *overrides])


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def poison_forward(monkeypatch, bad_calls):
    """Make IJEPA.forward return a NaN loss on the given (1-based) calls."""
    real, calls = IJEPA.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if bad_calls(calls["n"]) else loss

    monkeypatch.setattr(IJEPA, "forward", forward)


def test_cli_config_and_data_errors_exit_2_with_the_message_and_no_traceback(tmp_path):
    bad_key = cli("-m", "fastjepa.train", "--config", "configs/test_tiny.yaml", "optimization.lrr=0.1")
    assert bad_key.returncode == 2
    assert "optimization.lrr" in bad_key.stderr and "optimization.lr" in bad_key.stderr.replace("lrr", "")
    assert "Traceback" not in bad_key.stderr + bad_key.stdout

    missing = tmp_path / "no_such_dataset"
    bad_data = cli("-m", "fastjepa.train", "--config", "configs/test_tiny.yaml", *TINY, "data.source=imagefolder",
                   f"data.root_path={missing}", f"logging.folder={tmp_path / 'run'}")
    assert bad_data.returncode == 2, bad_data.stderr
    assert str(missing) in bad_data.stderr and "Traceback" not in bad_data.stderr + bad_data.stdout
    assert "training" not in bad_data.stdout  # failed before any model was built


def test_cli_runs_the_demo_config_and_writes_metrics_checkpoint_and_exports(tmp_path):
    run = cli("-m", "fastjepa.train", "--config", "configs/demo_mnist.yaml", f"logging.folder={tmp_path}",
              "train.max_steps=3", "data.batch_size=16", "train.log_every=1", "train.progress=lines",
              "train.rankme_every=3", "train.rankme_samples=80", "train.device=cpu", "train.peak_tflops=1")
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in records if r.get("kind", "train") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["img_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_mb"] > 0 and r["lr"] > 0
    rankme = [r for r in train if "rankme" in r]
    assert len(rankme) == 1 and 1.0 <= rankme[0]["rankme"] <= 64
    assert CheckpointManager(tmp_path).latest().name == "step_00000003"
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "target_encoder.pt").is_file()
    assert list(tmp_path.glob("target_encoder_timm.*"))
    state = torch.load(tmp_path / "target_encoder.pt", weights_only=True)
    assert "blocks.0.attn.qkv.weight" in state and all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("fused", [False, True], ids=["foreach-host-check", "fused-found-inf"])
def test_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch, fused):
    if not fused:  # an optimizer without found_inf: the step reads the flag on the host
        from fastjepa.optim import param_groups

        monkeypatch.setattr(fj_step, "build_optimizer",
                            lambda enc, pred: torch.optim.AdamW(param_groups(enc, pred), foreach=True))
    poison_forward(monkeypatch, lambda n: n in (2, 3))
    result = fj_train.run(tiny_cfg(tmp_path, "train.max_steps=5", "train.max_bad_steps=3"))
    assert result.step == 5 and result.skipped_steps == 2
    assert math.isnan(result.losses[2]) and math.isnan(result.losses[3])
    assert all(math.isfinite(result.losses[s]) for s in (1, 4, 5))
    steps = {int(s["step"]) for s in result.optimizer.state.values()}
    assert steps == {3}  # 5 steps, 2 skipped: AdamW stepped 3 times
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["skipped_steps"] == 2


def test_a_divergence_before_any_checkpoint_says_so_in_words(tmp_path, monkeypatch):
    poison_forward(monkeypatch, lambda n: True)
    cfg = tiny_cfg(tmp_path, "train.max_steps=4", "train.max_bad_steps=2")
    with pytest.raises(fj_train.TrainingDiverged, match="No checkpoint was written before it diverged") as info:
        fj_train.run(cfg)
    assert "None" not in str(info.value)


def test_consecutive_nan_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_forward(monkeypatch, lambda n: n >= 3)
    cfg = tiny_cfg(tmp_path, "train.max_steps=8", "train.max_bad_steps=2", "train.checkpoint_steps=1")
    with pytest.raises(fj_train.TrainingDiverged, match="2 consecutive steps had a non-finite loss"):
        fj_train.run(cfg)
    latest = CheckpointManager(tmp_path).latest()
    assert latest is not None and int(latest.name.split("_")[1]) <= 3
    monkeypatch.undo()
    result = fj_train.run(tiny_cfg(tmp_path, "train.max_steps=5", "train.max_bad_steps=2"))  # resumes from it
    assert all(math.isfinite(result.losses[s]) for s in range(int(latest.name.split("_")[1]) + 1, 6))


KILL_AT = textwrap.dedent("""
    import os, signal, sys
    from fastjepa.ijepa import IJEPA
    from fastjepa.train import main
    real, calls = IJEPA.forward, [0]
    def forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT_CALL"]):
            os.kill(os.getpid(), signal.{sig})
        return real(self, *args, **kwargs)
    IJEPA.forward = forward
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_and_resume_gives_the_uninterrupted_losses(tmp_path):
    common = [*TINY, "train.max_steps=6", "train.checkpoint_steps=2"]
    reference = fj_train.run(tiny_cfg(tmp_path / "ref", "train.max_steps=6", "train.checkpoint_steps=2")).losses

    folder = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_AT.format(sig="SIGKILL"), "--config",
                             "configs/test_tiny.yaml", *common, f"logging.folder={folder}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=240, env={**os.environ, "KILL_AT_CALL": "5"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert CheckpointManager(folder).latest().name == "step_00000004"

    resumed = fj_train.run(tiny_cfg(folder, "train.max_steps=6", "train.checkpoint_steps=2"))
    assert sorted(resumed.losses) == [5, 6]
    losses = {r["step"]: r["loss"] for r in read_jsonl(folder / "metrics.jsonl")}
    assert sorted(losses) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for step, loss in reference.items():
        assert abs(losses[step] - loss) <= 1e-6, (step, losses[step], loss)


def test_sigterm_checkpoints_at_the_next_step_and_exits_cleanly(tmp_path):
    run = subprocess.run([sys.executable, "-c", KILL_AT.format(sig="SIGTERM"), "--config", "configs/test_tiny.yaml",
                          *TINY, "train.max_steps=6", f"logging.folder={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "KILL_AT_CALL": "3"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "signal SIGTERM: checkpointing at step 3" in run.stdout
    assert CheckpointManager(tmp_path).latest().name == "step_00000003"


def test_official_checkpoint_starts_training_at_its_epoch(tmp_path):
    from fastjepa.compat.ijepa import save_official
    from fastjepa.ijepa import build_ijepa
    from fastjepa.optim import build_optimizer

    cfg = tiny_cfg(tmp_path / "run", "optimization.epochs=2", "train.max_steps=10")
    torch.manual_seed(7)
    official = build_ijepa(ModelSpec.from_config(cfg))
    save_official(tmp_path / "jepa-ep1.pth.tar", official, build_optimizer(official.encoder, official.predictor), 1)
    result = fj_train.run(cfg, official_checkpoint=str(tmp_path / "jepa-ep1.pth.tar"))
    assert sorted(result.losses) == [9, 10]  # epoch 1 of 8 steps done: training resumes at step 9
    # The target encoder moved by two EMA steps from the official weights (a fresh init would be far away).
    drift = (result.model.target_encoder.blocks[0].attn.qkv.weight - official.target_encoder.blocks[0].attn.qkv.weight)
    assert drift.abs().max() < 1e-3


def test_official_meta_load_checkpoint_starts_from_the_tagged_file_in_the_run_folder(tmp_path):
    """The official trainer's keys: meta.load_checkpoint reads <folder>/<write_tag>-latest.pth.tar (or
    meta.read_checkpoint); a missing file stops before any model is built."""
    from fastjepa.compat.ijepa import save_official
    from fastjepa.ijepa import build_ijepa

    folder = tmp_path / "run"
    folder.mkdir()
    cfg = tiny_cfg(folder, "optimization.epochs=2", "train.max_steps=9", "meta.load_checkpoint=true",
                   "logging.write_tag=mine")
    with pytest.raises(fj_train.SetupError, match="mine-latest.pth.tar not found"):
        fj_train.run(cfg)
    save_official(folder / "mine-latest.pth.tar", build_ijepa(ModelSpec.from_config(cfg)), None, 1)
    assert sorted(fj_train.run(cfg).losses) == [9]
