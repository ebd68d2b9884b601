"""Which checkpoint a run resumes, and whether it may: the choice (``train.resume`` / ``--resume``), its content
verified (a damaged one falls back to an older one of its folder unless it was named), and the settings it must
share with the run (the model's shape, the batch size, the kind of target), all before any model is built; then
the restore itself (``resume_state``), which returns where the run continues.
Problems are ``CheckpointError`` with the fix; the trainer reports them as setup errors (exit 2)."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from fastjepa.checkpoint import CheckpointError, CheckpointManager, agreed, read_meta, set_rng_state, step_of, verify

logger = logging.getLogger(__name__)

# The settings that give the weights their shapes: a checkpoint loads only into the model they describe.
MODEL_SHAPE_KEYS = ("meta.model_name", "mask.patch_size", "data.crop_size", "fastjepa.in_chans", "meta.pred_depth",
                    "meta.pred_emb_dim")


def recorded_settings(cfg) -> dict:
    """What a checkpoint's ``meta.json`` records of the run, for ``check_resume_compatible``."""
    return {"batch_size": cfg.data.batch_size, "target_encoder": cfg.fastjepa.target_encoder,
            "model": {key: cfg.get(key) for key in MODEL_SHAPE_KEYS}}


def check_resume_compatible(cfg, path: Path | None) -> None:
    """A checkpoint continues only with the model it was written for (every differing shape setting named), the
    batch size it was written with (the schedules count its batches) and the same kind of target (an EMA target's
    weights exist only in an EMA run's checkpoints)."""
    if path is None:
        return
    meta = read_meta(path)
    saved_model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    differ = [f"{key}={saved_model[key]} (this run: {cfg.get(key)})" for key in MODEL_SHAPE_KEYS
              if key in saved_model and saved_model[key] != cfg.get(key)]
    if differ:
        raise CheckpointError(
            f"{path} holds another model: it was written with {', '.join(differ)}. Set "
            f"{' '.join(d.split(' (')[0] for d in differ)} to continue it, or start a new run (a new logging.folder, "
            "or train.resume=none in an empty one)")
    for key, saved in (("data.batch_size", meta.get("batch_size")),
                       ("fastjepa.target_encoder", meta.get("target_encoder", "ema"))):
        if saved is not None and saved != cfg.get(key):
            raise CheckpointError(
                f"{path} was written with {key}={saved}, this run has {key}={cfg.get(key)}: set {key}={saved} to "
                "continue it, or start a new run (a new logging.folder, or train.resume=none in an empty one)")


def resolve_resume(cfg, manager: CheckpointManager, resume: str | None) -> Path | None:
    """The checkpoint to resume (content verified), or None for a fresh start in a folder without checkpoints."""
    choice = resume if resume is not None else cfg.train.resume
    if choice in (None, "", "none"):
        if manager.latest() is not None:
            raise CheckpointError(f"logging.folder={manager.folder} already holds checkpoints "
                                  f"({manager.latest().name}) and train.resume=none: continue it with "
                                  "train.resume=auto, or use a new logging.folder")
        return None
    if choice == "auto":
        latest = manager.latest()
        return None if latest is None else manager.verified(latest)
    path = Path(choice)
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such directory; pass a step_XXXXXXXX checkpoint directory or a "
                              "run folder")
    if not path.name.startswith("step_"):
        found = CheckpointManager(path).latest()
        if found is None:
            raise CheckpointError(f"--resume {path}: no complete checkpoint in that folder")
        return CheckpointManager(path).verified(found)
    problem = verify(path)
    if problem is None:
        problem = verify(path, content=True)
    if problem is not None:
        raise CheckpointError(f"--resume {path}: {problem}; pass another checkpoint (or the run folder: its "
                              "newest usable one is used)")
    return path


def names_one_checkpoint(cfg, resume: str | None) -> bool:
    """Whether the resume was asked of one checkpoint by name (no other may stand in for it)."""
    choice = resume if resume is not None else cfg.train.resume
    return choice not in (None, "", "none", "auto") and Path(choice).name.startswith("step_")


@dataclass
class TrainState:
    """Where the run is; with the weights, what a checkpoint restores."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0


def resume_state(path: Path, fall_back: bool, manager: CheckpointManager, model, optimizer, loader) -> TrainState:
    """``restore(path)``; a checkpoint that fails to load or holds non-finite weights falls back (``fall_back``)
    to the newest older one that verifies, after one warning line naming it and the reason; else the run
    stops with that reason (``CheckpointError``, exit 2), never silently from step 0."""
    while True:
        try:
            state, problem = restore(path, manager, model, optimizer, loader), None
        except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 -- whatever a damaged file raises
            text = str(e).strip()
            state, problem = None, f"{type(e).__name__}: {text.splitlines()[0] if text else 'no message'}"
        if problem is None:
            bad = [name for name, p in model.named_parameters()
                   if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]
            problem = f"non-finite weights in {bad[0]} and {len(bad) - 1} more tensors" if bad else None
        problem = agreed(problem)
        if problem is None:
            return state
        older = _older_usable(path) if fall_back else None
        if older is None:
            raise CheckpointError(f"checkpoint {path} cannot be resumed: {problem}; pass --resume with another "
                                  "checkpoint, or start over in a new logging.folder")
        logger.warning(f"checkpoint {path} cannot be resumed ({problem}); falling back to {older}")
        manager.start_timeline(step_of(older), keep=older)
        path = older


def _older_usable(path: Path) -> Path | None:
    """The newest checkpoint before ``path`` in its folder whose content verifies, or None."""
    folder = CheckpointManager(path.parent)
    previous = folder.previous(path)
    try:
        return None if previous is None else folder.verified(previous)
    except CheckpointError:
        return None


def restore(path: Path, manager: CheckpointManager, model, optimizer, loader) -> TrainState:
    """Weights, optimizer, RNG and data position from checkpoint ``path``. Written by another number of ranks
    or data workers, the data position continues at the same share of the epoch, approximately (noted)."""
    saved = manager.load(path, model, optimizer)
    epoch, batch = saved["epoch"], saved["batch_in_epoch"]
    exact = saved["exact"]
    if saved["loader"] is not None:
        loader.set_epoch(epoch)
        exact = loader.load_state_dict(saved["loader"]) and exact
        batch = loader.consumed
    # The step counts this run's batches: another world size changes the batches per epoch.
    step = saved["step"] if exact else epoch * len(loader) + batch
    if step < saved["step"]:  # renumbered: the saves ahead of this step belong to the old numbering
        manager.start_timeline(step, keep=path)
    set_rng_state(saved["rng"])
    model.sync_target_replica()
    logger.info(f"resumed from {path} at step {step} (epoch {epoch}, batch {batch} of {len(loader)})"
                + ("" if exact else "; written by another number of ranks or data workers: the data position "
                   "in this epoch and the RNG are approximate"))
    return TrainState(step=step, epoch=epoch, batch_in_epoch=batch, skipped_steps=saved["skipped_steps"])
