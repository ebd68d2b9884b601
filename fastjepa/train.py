"""I-JEPA pretraining entry point.

    python -m fastjepa.train --config configs/in1k_vith14_ep300.yaml [key=value ...]
    torchrun --nproc_per_node=8 -m fastjepa.train --config ... train.parallel=fsdp
    fastjepa train --config ... --resume /path/to/run/step_00012000

One process per device; single process on CPU or GPU, DDP or FSDP2 under torchrun (see fastjepa.parallel).
Checkpoints are DCP directories in ``logging.folder`` (see fastjepa.checkpoint); a run restarted with the same
folder continues from its latest checkpoint (``train.resume=auto``). Metrics go to ``logging.folder/metrics.jsonl``.
The pieces (setup, one step, logging, checkpointing) are in ``fastjepa.trainer``; ``run`` is the loop.
"""

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastjepa import __version__, config
from fastjepa.checkpoint import CheckpointError, full_model_state
from fastjepa.compat.ijepa import export_timm
from fastjepa.data.loader import BadDataError
from fastjepa.ijepa import IJEPA
from fastjepa.models import build_models
from fastjepa.parallel import DistEnv, destroy_distributed
from fastjepa.spec import ModelSpec
from fastjepa.trainer import SetupError, StepOutOfMemory, Trainer, TrainingDiverged

logger = logging.getLogger("fastjepa")

__all__ = ["run", "main", "TrainResult", "SetupError", "TrainingDiverged", "StepOutOfMemory", "BadDataError",
           "CheckpointError"]


@dataclass
class TrainResult:
    model: IJEPA
    optimizer: torch.optim.Optimizer
    step: int
    folder: Path
    losses: dict[int, float] = field(default_factory=dict)
    skipped_steps: int = 0
    stopped_by_signal: bool = False


def run(cfg, *, resume: str | None = None, official_checkpoint: str | None = None) -> TrainResult:
    """Train with ``cfg`` (a ``fastjepa.config.Config``); every rank calls this. ``official_checkpoint``: start
    from an official I-JEPA ``.pth.tar`` trained with this config (weights, optimizer state, epoch), unless the
    run folder already has a checkpoint to resume. Logs to the ``fastjepa`` logger; configuring handlers is the
    application's business (the command line does it)."""
    tr = Trainer.setup(cfg, resume, official_checkpoint)
    result = TrainResult(tr.model, tr.optimizer, tr.state.step, tr.folder)
    try:
        tr.start()
        while tr.state.step < tr.total_steps:
            for images, masks, flops, waited in tr.epoch_batches():
                if stopped_after_step(tr, result, images, masks, flops, waited):
                    return result
                if tr.state.step >= tr.total_steps:
                    break
            if tr.state.batch_in_epoch >= tr.steps_per_epoch:
                tr.end_epoch()
                if tr.online_probe is not None and (tr.state.epoch + 1) % cfg.eval.every_epochs == 0:
                    tr.online_eval()
                if tr.state.step < tr.total_steps:
                    tr.save(permanent=(tr.state.epoch + 1) % cfg.train.checkpoint_every == 0, background=True)
                tr.state.epoch, tr.state.batch_in_epoch = tr.state.epoch + 1, 0
        tr.sink.finish_progress()
        if tr.online_probe is not None and tr.last_eval_step != tr.state.step:  # and at the end of training
            tr.online_eval()
        tr.save()
        if cfg.train.export:
            export_encoder(cfg, tr.model, tr.folder, tr.env)
    finally:
        result.step, result.skipped_steps = tr.state.step, tr.state.skipped_steps
        tr.close()
    return result


def stopped_after_step(tr: Trainer, result: TrainResult, images, masks, flops: float, waited: float) -> bool:
    """One step and what follows it (logging, divergence check, RankMe, checkpoints); whether a preemption signal
    stopped the run (after its checkpoint)."""
    s, t = tr.state, tr.cfg.train
    lr, wd, momentum = tr.sched.lr(s.step), tr.sched.weight_decay(s.step), tr.sched.momentum(s.step)
    try:
        out = tr.stepper(*tr.to_device(images, masks), s.step)
    except torch.cuda.OutOfMemoryError as e:
        raise tr.out_of_memory(e) from e
    s.step += 1
    s.batch_in_epoch += 1
    rankme = tr.rankme() if tr.rankme_images is not None and s.step % t.rankme_every == 0 else None
    record = tr.record(out, images.shape[0], flops, waited, lr, wd, momentum, rankme)
    log_step = record is not None
    if log_step:
        result.losses.update(record["losses"])
    if log_step or not tr.stepper.fused:
        tr.check_divergence()
    if tr.stop_requested(log_step):
        tr.sink.message(f"signal {signal.Signals(tr.stop.received).name}: checkpointing at step {s.step}")
        tr.save()
        result.stopped_by_signal = True
        return True
    if t.checkpoint_steps > 0 and s.step % t.checkpoint_steps == 0:
        tr.save(background=True)
    elif log_step:
        tr.manager.poll()  # an asynchronous save that has finished becomes latest
    return False


def export_encoder(cfg, model: IJEPA, folder: Path, env: DistEnv) -> None:
    """Write the final target encoder as a full state dict (``encoder.pt``) and a timm-named file (rank 0)."""
    state = full_model_state(model.target_encoder)
    if env.is_main:
        torch.save(state, folder / "target_encoder.pt")
        encoder, _ = build_models(ModelSpec.from_config(cfg))
        encoder.load_state_dict(state)
        path = export_timm(encoder, folder / "target_encoder_timm")
        logger.info(f"exported the target encoder: {folder / 'target_encoder.pt'}, {path}")


def configure_logging() -> None:
    """The command line's console: rank 0 logs progress, the other ranks only warnings and errors."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(stream=sys.stdout, level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%Y-%m-%d %H:%M:%S", force=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastjepa train", description="I-JEPA pretraining (single process, DDP, FSDP2).")
    p.add_argument("--version", action="version", version=f"fastjepa {__version__}")
    p.add_argument("--config", required=True, help="YAML config (official I-JEPA keys + fastjepa/train sections), or "
                                                   "the name of a shipped one (e.g. in1k_vith14_ep300)")
    p.add_argument("--resume", default=None,
                   help="'auto' (latest checkpoint in logging.folder, the default via train.resume), 'none', a "
                        "checkpoint directory or a run folder")
    p.add_argument("--official-checkpoint", default=None,
                   help="start from an official I-JEPA .pth.tar (weights, optimizer, epoch) trained with --config "
                        "(the official YAML loads unchanged)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. optimization.lr=0.001 train.max_steps=100")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    try:
        cfg = config.load(args.config, overrides=args.overrides)
    except (config.ConfigError, FileNotFoundError) as e:
        print(f"fastjepa train: config error: {e}", file=sys.stderr)
        return 2
    finished = False
    try:
        run(cfg, resume=args.resume, official_checkpoint=args.official_checkpoint)
        finished = True
    except (SetupError, config.ConfigError, CheckpointError) as e:
        print(f"fastjepa train: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"fastjepa train: {e}", file=sys.stderr)
        return 3
    except BadDataError as e:
        print(f"fastjepa train: {e}", file=sys.stderr)
        return 4
    except StepOutOfMemory as e:
        print(f"fastjepa train: {e}", file=sys.stderr)
        return 5
    finally:
        destroy_distributed(finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
