"""Which checkpoint a run resumes, and whether it may: the choice (``train.resume`` / ``--resume``), its content
verified (a damaged one falls back to an older one of its folder unless it was named), and the settings it must
share with the run (the model's shape, the batch size, the kind of target), all before any model is built.
Problems are ``CheckpointError`` with the fix; the trainer reports them as setup errors (exit 2)."""

from pathlib import Path

from fastjepa.checkpoint import CheckpointError, CheckpointManager, read_meta, verify

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
