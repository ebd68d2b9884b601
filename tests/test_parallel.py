"""Two CPU processes under torchrun with FSDP2 (gloo; one unit per block of the encoder, the target encoder and the
predictor, whose last block computes the targets only; the fused one-pass update on each rank's shards) train
exactly as one process that computes both ranks' batches and averages their losses; the sharded checkpoint loads
back into a single unsharded process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import KILL_AT

from fastjepa import config, schedules
from fastjepa.checkpoint import CheckpointManager
from fastjepa.data import build_pretrain_loader, mean_std, normalize_on_device
from fastjepa.ijepa import build_ijepa
from fastjepa.masks import MultiBlockMaskCollator
from fastjepa.metrics import read_jsonl
from fastjepa.optim import build_optimizer
from fastjepa.spec import ModelSpec

pytestmark = [pytest.mark.dist, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
OVERRIDES = ["meta.model_name=vit_micro", "meta.pred_emb_dim=32", "meta.pred_depth=2", "train.progress=lines",
             "train.device=cpu", "train.log_every=1", f"train.max_steps={STEPS}", "train.checkpoint_steps=2",
             "train.parallel=fsdp", "data.batch_size=4", "train.dist_timeout_s=120"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not found")
    folder = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastjepa.train", "--config", "configs/test_tiny.yaml", *OVERRIDES, f"logging.folder={folder}",
           "fastjepa.update_impl=fused"]  # each rank's one-pass update on its shards (Triton interpreter)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return folder, proc


def reference_virtual_ranks(cfg, ranks: int = 2, steps: int = STEPS):
    """One process, one model: each step computes the loss on every rank's batch (their own loaders and mask
    collators, as the trainer builds them) and averages them (FSDP2 and HSDP average gradients over ranks); with
    SIGReg, its statistic is computed once over all ranks' samples together."""
    spec = ModelSpec.from_config(cfg)
    loaders = [build_pretrain_loader(cfg, rank=r, world_size=ranks,
                                     collator=MultiBlockMaskCollator.from_spec(spec, seed=cfg.fastjepa.seed, rank=r))
               for r in range(ranks)]
    torch.manual_seed(cfg.fastjepa.seed)
    model = build_ijepa(ModelSpec.from_config(cfg))
    optimizer = build_optimizer(model.encoder, model.predictor)
    sched = schedules.build(cfg.optimization, len(loaders[0]))
    mean, std = mean_std(cfg)
    for loader in loaders:
        loader.set_epoch(0)
    batches = [iter(loader) for loader in loaders]
    losses, sigreg = [], model.sigreg
    model.sigreg = None  # the I-JEPA term alone from forward: SIGReg is a statistic of all ranks' samples at once
    for step in range(steps):
        sched.apply(optimizer, step)
        per_rank, samples = [], []
        for it in batches:
            (images, _), masks = next(it)
            images = normalize_on_device(images, mean, std)
            per_rank.append(model(images, masks))
            if sigreg is not None:
                samples.append(model.sigreg_samples(model.encode_context(images, masks), masks))
        loss = sum(per_rank) / ranks
        if sigreg is not None:
            reg = sigreg(torch.cat(samples), seed=model.sigreg_step_seed(step))
            loss = (1 - model.sigreg_weight) * loss + model.sigreg_weight * reg
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_target(sched.momentum(step))
        losses.append(float(loss.detach()))
    return losses, model


def test_fsdp2_two_processes_match_one_process(fsdp_run, tmp_path):
    folder, _ = fsdp_run
    cfg = config.load(ROOT / "configs/test_tiny.yaml", [*OVERRIDES, f"logging.folder={tmp_path}"])
    ref_losses, ref_model = reference_virtual_ranks(cfg)

    records = read_jsonl(folder / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # written once per step, by rank 0 only
    for r, ref in zip(records, ref_losses, strict=True):
        assert abs(r["loss"] - ref) <= 1e-5, (r["step"], r["loss"], ref)

    # The sharded checkpoint (one shard file and one state file per rank) loads into one unsharded process.
    latest = CheckpointManager(folder).latest()
    assert latest.name == f"step_{STEPS:08d}"
    assert sorted(p.name for p in latest.glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]
    torch.manual_seed(123)
    loaded = build_ijepa(ModelSpec.from_config(cfg))
    CheckpointManager(folder).load(latest, loaded, None)
    for (name, p), q in zip(loaded.state_dict().items(), ref_model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp2_run_exports_the_full_target_encoder(fsdp_run):
    folder, proc = fsdp_run
    assert "parallel=fsdp" in proc.stdout
    state = torch.load(folder / "target_encoder.pt", weights_only=True)
    loaded = build_ijepa(ModelSpec.from_config(config.load(ROOT / "configs/test_tiny.yaml", OVERRIDES))).target_encoder
    assert state.keys() == loaded.state_dict().keys()
    assert all(v.shape == loaded.state_dict()[k].shape for k, v in state.items())  # gathered, not shards


def test_fsdp2_units_cover_every_block_of_the_three_models(tmp_path):
    """One FSDP2 unit per block (the predictor's too, in every layout) and per model, on a 1-rank gloo group."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from fastjepa.parallel import apply_fsdp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for layout in ("repeat", "shared", "official"):
            cfg = config.load(ROOT / "configs/test_tiny.yaml", [*OVERRIDES, f"fastjepa.predictor_layout={layout}"])
            model = apply_fsdp(build_ijepa(ModelSpec.from_config(cfg)), torch.device("cpu"), bf16=False)
            blocks = [*model.encoder.blocks, *model.target_encoder.blocks, *model.predictor.predictor_blocks]
            assert len(model.predictor.predictor_blocks) == 2
            assert all(isinstance(m, FSDPModule) for m in [*blocks, model.encoder, model.predictor, model])
    finally:
        dist.destroy_process_group()


def torchrun(folder: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fastjepa.train", "--config", "configs/test_tiny.yaml", *OVERRIDES, *overrides,
           f"logging.folder={folder}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_two_rank_checkpoint_continues_on_one_rank_at_the_same_share_of_the_epoch(fsdp_run, tmp_path):
    """Step 4 of 8 per epoch on 2 ranks (32 samples behind) is step 8 of 16 on one rank."""
    folder = tmp_path / "run"
    shutil.copytree(fsdp_run[0], folder)
    run = torchrun(folder, "train.parallel=auto", "train.max_steps=10", nproc=1)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "at step 8 (epoch 0, batch 8 of 16)" in run.stdout and "approximate" in run.stdout
    steps = [r["step"] for r in read_jsonl(folder / "metrics.jsonl") if r.get("kind", "train") == "train"]
    assert steps == [1, 2, 3, 4, 9, 10]


def test_a_one_rank_checkpoint_continues_on_two_ranks(tmp_path):
    single = torchrun(tmp_path, "train.parallel=auto", "train.max_steps=6", "train.checkpoint_steps=6", nproc=1)
    assert single.returncode == 0, single.stderr[-3000:]
    run = torchrun(tmp_path, "train.max_steps=5")  # 6 of 16 on one rank = 3 of 8 on two
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "at step 3 (epoch 0, batch 3 of 8)" in run.stdout and "approximate" in run.stdout
    assert CheckpointManager(tmp_path).latest().name == "step_00000005"
    # the one-rank step 6 belongs to the old numbering: moved aside once the new numbering's first checkpoint
    # (step 4) was complete, so it is never resumed instead of step 5
    assert [p.name for p in CheckpointManager(tmp_path).complete_checkpoints()] == ["step_00000004", "step_00000005"]
    assert [p.name for p in tmp_path.glob("abandoned-*/*")] == ["step_00000006"]


def test_a_renumbered_resume_killed_before_its_first_save_resumes_the_same_checkpoint_again(tmp_path):
    """Issue 22, case 1: one rank to step 6, resumed on two ranks (step 3 there), both killed before their first
    save: the rerun resumes step 6 again (it used to find no checkpoint and start from step 0)."""
    single = torchrun(tmp_path, "train.parallel=auto", "train.max_steps=6", "train.checkpoint_steps=3", nproc=1)
    assert single.returncode == 0, single.stderr[-3000:]
    script = tmp_path / "kill_at.py"
    script.write_text(KILL_AT.format(sig="SIGKILL"))
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), "--config", "configs/test_tiny.yaml", *OVERRIDES, "train.max_steps=5",
                             f"logging.folder={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT_CALL": "1"})
    assert killed.returncode != 0 and "at step 3 (epoch 0, batch 3 of 8)" in killed.stdout, killed.stdout[-2000:]
    assert CheckpointManager(tmp_path).latest().name == "step_00000006"
    rerun = torchrun(tmp_path, "train.max_steps=5")
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "step_00000006 at step 3 (epoch 0, batch 3 of 8)" in rerun.stdout


@pytest.mark.parametrize("scope", ["target", "all"])
def test_fp8_under_fsdp2_tracks_the_fp32_run(fsdp_run, tmp_path, scope):
    """The FP8 target replica sharded like the target (and with ``all`` torchao's FP8 layers on sharded weights):
    two ranks train, and the first loss (same weights, same data) differs from the fp32 run's by what FP8's error
    allows."""
    run = torchrun(tmp_path, f"fastjepa.fp8={scope}", "train.max_steps=2")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    fp8 = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("kind", "train") == "train"]
    fp32 = [r["loss"] for r in read_jsonl(fsdp_run[0] / "metrics.jsonl") if r.get("kind", "train") == "train"]
    assert len(fp8) == 2 and all(torch.isfinite(torch.tensor(fp8)))
    assert abs(fp8[0] - fp32[0]) <= 0.02 * fp32[0] and fp8[0] != fp32[0], (fp8, fp32)


def test_hsdp_on_a_2x2_mesh_matches_one_process_and_resumes_as_fsdp(tmp_path):
    """Four processes as 2 replicas x 2 shards train exactly as one process over the four ranks' batches; their
    checkpoint continues under plain FSDP2 on the same four processes (DCP reshards) with the same losses."""
    folder = tmp_path / "run"
    hsdp = torchrun(folder, "train.parallel=hsdp", "train.shard_size=2", "train.max_steps=2", nproc=4)
    assert hsdp.returncode == 0, hsdp.stdout[-2000:] + hsdp.stderr[-3000:]
    assert "parallel=hsdp" in hsdp.stdout
    fsdp = torchrun(folder, "train.parallel=fsdp", "train.max_steps=4", nproc=4)
    assert fsdp.returncode == 0, fsdp.stdout[-2000:] + fsdp.stderr[-3000:]
    assert "resumed from" in fsdp.stdout and "approximate" not in fsdp.stdout
    cfg = config.load(ROOT / "configs/test_tiny.yaml", [*OVERRIDES, f"logging.folder={tmp_path / 'ref'}"])
    reference, _ = reference_virtual_ranks(cfg, ranks=4, steps=4)
    losses = [r["loss"] for r in read_jsonl(folder / "metrics.jsonl") if r.get("kind", "train") == "train"]
    assert len(losses) == 4
    for step, (got, want) in enumerate(zip(losses, reference, strict=True), 1):
        assert abs(got - want) <= 1e-5, (step, got, want)


def test_sigreg_with_an_online_target_on_two_ranks_equals_one_process_over_the_whole_batch(tmp_path):
    """SIGReg's statistic over both ranks' samples (per-slice sums all-reduced, gradients too) and a teacher-free
    target: the two-rank losses equal one process's that sees both halves."""
    options = ["fastjepa.sigreg.weight=0.2", "fastjepa.sigreg.slices=64", "fastjepa.target_encoder=online"]
    run = torchrun(tmp_path / "run", *options)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    cfg = config.load(ROOT / "configs/test_tiny.yaml", [*OVERRIDES, *options, f"logging.folder={tmp_path}"])
    reference, _ = reference_virtual_ranks(cfg)
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("kind", "train") == "train"]
    assert len(records) == STEPS and all(r["sigreg"] > 0 for r in records)
    for r, want in zip(records, reference, strict=True):
        assert abs(r["loss"] - want) <= 1e-5, (r["step"], r["loss"], want)
