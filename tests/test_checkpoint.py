"""Checkpoints: round trip of model + optimizer + per-rank state, atomicity under a crash mid-save, retention."""

import pytest
import torch
import torch.distributed.checkpoint as dcp

from fastjepa.checkpoint import (
    LATEST,
    CheckpointManager,
    load_model_weights,
    read_meta,
    rng_state,
    set_rng_state,
    verify,
)
from fastjepa.ijepa import IJEPA
from fastjepa.mask_batch import Masks
from fastjepa.models import VisionTransformer, VisionTransformerPredictor
from fastjepa.optim import build_optimizer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def tiny_ijepa(seed: int) -> IJEPA:
    torch.manual_seed(seed)
    enc = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    pred = VisionTransformerPredictor(enc.grid, embed_dim=16, predictor_embed_dim=8, depth=1, num_heads=2)
    return IJEPA(enc, pred)


def trained(seed: int, steps: int = 2) -> tuple[IJEPA, torch.optim.Optimizer]:
    model = tiny_ijepa(seed)
    opt = build_optimizer(model.encoder, model.predictor)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    masks_enc, masks_pred = [torch.tensor([[0, 1, 2, 5, 6]] * 2)], [torch.tensor([[10, 11, 14]] * 2)]
    for _ in range(steps):
        model(x, Masks.from_lists(masks_enc, masks_pred)).backward()
        opt.step()
        opt.zero_grad()
        model.update_target(0.9)
    return model, opt


def assert_same_state(a: IJEPA, b: IJEPA, opt_a, opt_b) -> None:
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sa[k][key], sb[k][key], rtol=0, atol=0)


def test_round_trip_restores_model_optimizer_and_rank_state(tmp_path):
    model, opt = trained(seed=0)
    manager = CheckpointManager(tmp_path, keep_last=2)
    rng = rng_state()
    path = manager.save(7, model, opt, {"step": 7, "rng": rng, "loader": {"batches": 3}}, meta={"epoch": 1})
    assert manager.latest() == path and (tmp_path / LATEST).read_text() == path.name
    assert read_meta(path)["step"] == 7 and read_meta(path)["epoch"] == 1

    fresh, fresh_opt = trained(seed=1)  # different weights and optimizer moments, same structure
    torch.manual_seed(123)
    state = manager.load(path, fresh, fresh_opt)
    assert_same_state(model, fresh, opt, fresh_opt)
    assert state["loader"] == {"batches": 3} and state["exact"]
    set_rng_state(state["rng"])
    torch.set_rng_state(rng["torch"])
    expected = torch.rand(3)
    set_rng_state(state["rng"])
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_crash_during_save_keeps_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model, opt = trained(seed=0, steps=1)
    manager = CheckpointManager(tmp_path, keep_last=3)
    good = manager.save(1, model, opt, {"step": 1})
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2 = trained(seed=0, steps=3)
    real_save = dcp.save

    def crash_after_writing(state, *, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # shards fully written, then the process "dies"
        raise KeyboardInterrupt("simulated crash between the shard write and the commit")

    monkeypatch.setattr(dcp, "save", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        manager.save(3, model2, opt2, {"step": 3})
    monkeypatch.undo()

    assert (tmp_path / ".tmp-step_00000003").is_dir()  # the partial save is there, but not visible as a checkpoint
    assert manager.latest() == good
    fresh, fresh_opt = trained(seed=5)
    assert manager.load(manager.latest(), fresh, fresh_opt)["step"] == 1
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)
    CheckpointManager(tmp_path).remove_partial_saves()
    assert not (tmp_path / ".tmp-step_00000003").exists()


def test_crash_between_rename_and_pointer_update_falls_back_to_complete_dirs(tmp_path):
    model, opt = trained(seed=0, steps=1)
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(1, model, opt, {"step": 1})
    second = manager.save(2, model, opt, {"step": 2})
    (tmp_path / LATEST).write_text("step_00000001")  # pointer not yet updated when the crash hit
    assert manager.latest().name == "step_00000001"
    (tmp_path / LATEST).unlink()  # no pointer at all: the newest complete directory
    assert manager.latest() == second


def test_keep_last_prunes_rolling_checkpoints_but_not_permanent_ones(tmp_path):
    model, opt = trained(seed=0, steps=1)
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        manager.save(step, model, opt, {"step": step}, permanent=step == 2)
    names = [p.name for p in manager.complete_checkpoints()]
    assert names == ["step_00000002", "step_00000004", "step_00000005"]


def test_load_model_weights_reads_one_submodule_for_evaluation(tmp_path):
    model, opt = trained(seed=0)
    path = CheckpointManager(tmp_path).save(2, model, opt, {"step": 2})
    encoder = tiny_ijepa(seed=9).target_encoder
    load_model_weights(path, encoder, prefix="target_encoder.")
    for k, v in model.target_encoder.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[k], v, rtol=0, atol=0)


def test_an_asynchronous_save_becomes_latest_only_once_written_and_holds_the_state_it_was_given(tmp_path,
                                                                                               monkeypatch):
    import threading

    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    model, opt = trained(seed=0, steps=1)
    manager = CheckpointManager(tmp_path, keep_last=3)
    first = manager.save(1, model, opt, {"step": 1})
    model2, opt2 = trained(seed=0, steps=2)
    expected = {k: v.clone() for k, v in model2.state_dict().items()}
    release, real_write = threading.Event(), FileSystemWriter.write_data

    def held_write(self, plan, planner):
        release.wait(timeout=60)  # the background writer waits here while the test looks
        return real_write(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", held_write)
    second = manager.save(2, model2, opt2, {"step": 2}, asynchronous=True)
    assert manager.poll() is None and manager.latest() == first  # in flight: not a checkpoint yet
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # training goes on; the save holds the state it was given
    release.set()
    assert manager.wait() == second and manager.latest() == second and verify(second) is None
    fresh, fresh_opt = trained(seed=5)
    manager.load(second, fresh, fresh_opt)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)


def test_a_renumbered_resume_keeps_its_checkpoint_until_the_new_timeline_has_one(tmp_path):
    """Issue 22, case 1: a one-rank step 6 resumed on two ranks continues at step 3. Killed before its first save,
    the folder must still resume step 6 (it used to be moved aside at once: the rerun started from step 0)."""
    model, opt = trained(seed=0)
    first = CheckpointManager(tmp_path, keep_last=0)
    for step in (4, 5, 6):
        first.save(step, model, opt, {"step": step})
    resumed = tmp_path / "step_00000006"
    second = CheckpointManager(tmp_path, keep_last=0)
    moved = second.start_timeline(3, keep=resumed)  # what the trainer does when another world size renumbers
    # the old numbering's 4 and 5 would be overwritten by the new timeline's saves: aside; 6 is what was resumed
    assert [p.name for p in moved] == ["step_00000004", "step_00000005"]
    # killed here: a new process (auto-resume) finds step 6, and only step 6
    assert CheckpointManager(tmp_path).latest() == resumed
    assert [p.name for p in CheckpointManager(tmp_path).complete_checkpoints()] == ["step_00000006"]
    # the new timeline's first checkpoint (step 4) is complete: only now is step 6 moved aside
    new = second.save(4, model, opt, {"step": 4})
    assert CheckpointManager(tmp_path).latest() == new and not resumed.exists()
    assert sorted(p.parent.name.startswith("abandoned-") for p in tmp_path.glob("abandoned-*/step_00000006")) == [True]


def test_the_new_timeline_writes_its_own_checkpoint_where_the_resumed_one_has_the_same_step(tmp_path):
    model, opt = trained(seed=0)
    CheckpointManager(tmp_path).save(6, model, opt, {"step": 6, "timeline": "old"})
    manager = CheckpointManager(tmp_path)
    manager.start_timeline(3, keep=tmp_path / "step_00000006")
    path = manager.save(6, model, opt, {"step": 6, "timeline": "new"})  # not "already saved": another timeline
    assert torch.load(path / "rank0.pt", weights_only=False)["timeline"] == "new"
    assert [torch.load(p / "rank0.pt", weights_only=False)["timeline"] for p in tmp_path.glob("abandoned-*/*")] == [
        "old"]
