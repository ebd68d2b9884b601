"""I-JEPA pretraining entry point.

    python -m fastjepa.train --config configs/vith14_in1k.yaml [key=value ...]
    torchrun --nproc_per_node=8 -m fastjepa.train --config ... train.parallel=fsdp
    fastjepa-train --config ... --resume /path/to/run/step_00012000

One process per device; single process on CPU or GPU, DDP or FSDP2 under torchrun (see fastjepa.parallel).
Checkpoints are DCP directories in ``logging.folder`` (see fastjepa.checkpoint); a run restarted with the same
folder continues from its latest checkpoint (``train.resume=auto``). Metrics go to ``logging.folder/metrics.jsonl``.
"""

import argparse
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from fastjepa import config as fj_config
from fastjepa import schedules
from fastjepa.checkpoint import CheckpointManager, full_model_state, rng_state, set_rng_state
from fastjepa.ijepa import IJEPA, build_ijepa
from fastjepa.kernels import set_fused
from fastjepa.metrics import IJEPAFlops, MetricsSink, StepAccumulator, detect_peak_tflops
from fastjepa.optim import build_optimizer
from fastjepa.parallel import DistEnv, destroy_distributed, init_distributed, parallelize, resolve_strategy

logger = logging.getLogger("fastjepa")


class SetupError(Exception):
    """A problem with the config, data or checkpoint paths, found before any model is built."""


class TrainingDiverged(RuntimeError):
    """``train.max_bad_steps`` consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    model: IJEPA
    optimizer: torch.optim.Optimizer
    step: int
    folder: Path
    losses: dict[int, float] = field(default_factory=dict)
    skipped_steps: int = 0
    stopped_by_signal: bool = False


class _StopSignal:
    """SIGTERM/SIGUSR1 (preemption notice) -> save a checkpoint at the next step boundary and exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def install(self) -> None:
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum


def _log_setup(rank: int) -> None:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of all gradients in one fused reduction (foreach), left on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2: a partial norm over each rank's shard
        norm = norm.full_tensor()
    return norm


def _mean_over_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= env.world_size
    return values


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _build_data(cfg, env: DistEnv):
    from fastjepa.data import build_pretrain_loader
    from fastjepa.masks import MultiBlockMaskCollator

    collator = MultiBlockMaskCollator.from_config(cfg, rank=env.rank)
    loader = build_pretrain_loader(cfg, rank=env.rank, world_size=env.world_size, collator=collator)
    if len(loader) < 1:
        raise SetupError(f"the data source gives no full batch of data.batch_size={cfg.data.batch_size} per rank "
                         f"on {env.world_size} rank(s); lower data.batch_size or add data")
    return loader


def _normalizer(cfg, device: torch.device):
    from fastjepa.data import mean_std, normalize_on_device

    mean, std = mean_std(cfg)

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return normalize_on_device(images.to(device, non_blocking=True), mean, std, torch.float32)

    return normalize


def _resolve_resume(cfg, manager: CheckpointManager, resume: str | None) -> Path | None:
    choice = resume if resume is not None else cfg.train.resume
    if choice in (None, "", "none"):
        if manager.latest() is not None:
            raise SetupError(f"logging.folder={manager.folder} already holds checkpoints ({manager.latest().name}) "
                             "and train.resume=none: continue it with train.resume=auto, or use a new logging.folder")
        return None
    if choice == "auto":
        return manager.latest()
    path = Path(choice)
    if (path / "latest").is_file() or (path.is_dir() and not (path / "meta.json").is_file()):
        found = CheckpointManager(path).latest()
        if found is None:
            raise SetupError(f"--resume {path}: no complete checkpoint in that folder")
        return found
    if not (path / "meta.json").is_file():
        raise SetupError(f"--resume {path}: not a fastjepa checkpoint directory (no meta.json); pass a "
                         "step_XXXXXXXX directory or a run folder")
    return path


def _rankme_images(cfg, env: DistEnv, count: int) -> torch.Tensor:
    """A fixed set of this rank's images (the first of epoch 0, from a loader of its own) for RankMe."""
    loader = _build_data(cfg, env)
    loader.set_epoch(0)
    images = []
    for (x, _), _, _ in loader:
        images.append(x)
        if sum(len(i) for i in images) >= count:
            break
    return torch.cat(images)[:count]


@torch.no_grad()
def _rankme(model: IJEPA, images: torch.Tensor, normalize, batch_size: int, autocast: dict) -> float:
    from fastjepa.eval.rankme import rankme

    feats = []
    for i in range(0, len(images), batch_size):
        with torch.autocast(**autocast):
            feats.append(model.target_encoder(normalize(images[i:i + batch_size])).float().mean(1))
    return rankme(torch.cat(feats))


def run(cfg, *, resume: str | None = None, official_checkpoint: str | None = None) -> TrainResult:
    """Train with ``cfg`` (a ``fastjepa.config.Config``); every rank calls this. ``official_checkpoint``: start
    from an official I-JEPA ``.pth.tar`` trained with this config (weights, optimizer state, epoch), unless the
    run folder already has a checkpoint to resume."""
    t = cfg.train
    env = init_distributed(t.dist_timeout_s, t.device)
    _log_setup(env.rank)
    folder = Path(cfg.logging.folder)
    strategy = resolve_strategy(t.parallel, env.world_size)
    bf16 = bool(cfg.meta.use_bfloat16) and env.device.type == "cuda"

    # Data (and its paths) first, so a bad path fails before a model is built.
    torch.manual_seed(cfg.fastjepa.seed)
    try:
        cfg.require_paths(("logging.folder", "data.root_path") if cfg.data.source == "imagefolder"
                          else ("logging.folder",))
        loader = _build_data(cfg, env)
        ipe = len(loader)
        sched = schedules.build(cfg.optimization, ipe)
        manager = CheckpointManager(folder, keep_last=t.keep_last)
        resume_from = _resolve_resume(cfg, manager, resume)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        raise SetupError(str(e)) from e
    if official_checkpoint is not None and not Path(official_checkpoint).is_file():
        raise SetupError(f"--official-checkpoint {official_checkpoint}: file not found")
    total_steps = int(cfg.optimization.epochs * ipe)
    if t.max_steps > 0:
        total_steps = min(total_steps, t.max_steps)

    # Model: identical initialisation on every rank (FSDP2 keeps each rank's slice of its own full tensors).
    set_fused(cfg.fastjepa.fused)
    torch.manual_seed(cfg.fastjepa.seed)
    official_opt, start_step = None, 0
    if official_checkpoint is not None and resume_from is None:
        from fastjepa.compat.ijepa import load_official

        folder.mkdir(parents=True, exist_ok=True)
        resolved = cfg.dump(folder / f"config.rank{env.rank}.yaml")  # load_official reads a YAML file
        off = load_official(official_checkpoint, resolved)
        resolved.unlink()
        model, official_opt, start_step = off.model, off.optimizer_state, off.epoch * ipe
        logger.info(f"loaded official checkpoint {official_checkpoint} (epoch {off.epoch})")
    else:
        model = build_ijepa(cfg)
    model.to(env.device)
    flops = IJEPAFlops.from_model(model)
    train_module = parallelize(model, env, strategy, bf16=bf16, activation_checkpointing=t.activation_checkpointing,
                               compile=t.compile)
    optimizer = build_optimizer(model.encoder, model.predictor)
    if official_opt is not None:
        if strategy == "fsdp":
            logger.warning("official optimizer state is not loaded under FSDP2 (weights are); AdamW restarts")
        else:
            optimizer.load_state_dict(official_opt)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    fused_skip = all(g.get("fused") for g in optimizer.param_groups)
    autocast = {"device_type": env.device.type, "dtype": torch.bfloat16, "enabled": bf16 and strategy != "fsdp"}
    normalize = _normalizer(cfg, env.device)

    manager.remove_partial_saves()
    skipped_total, epoch, batch_in_epoch = 0, start_step // ipe, start_step % ipe
    loader_state = None
    if resume_from is not None:
        state = manager.load(resume_from, model, optimizer)
        start_step, epoch, skipped_total = state["step"], state["epoch"], state["skipped_steps"]
        batch_in_epoch, loader_state = state["batch_in_epoch"], state["loader"]
        set_rng_state(state["rng"])
        logger.info(f"resumed from {resume_from} at step {start_step}"
                    + ("" if state["exact"] else " (other world size: data position and RNG approximate)"))
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        cfg.dump(folder / "config.yaml")

    peak_tflops = t.peak_tflops or detect_peak_tflops(env.device)
    sink = MetricsSink(folder, total_steps, start_step, enabled=env.is_main,
                      progress={"auto": None, "bar": True, "lines": False}[t.progress])
    rankme_images = _rankme_images(cfg, env, t.rankme_samples) if t.rankme_every > 0 else None
    stop = _StopSignal()
    stop.install()
    sink.message(f"training {total_steps} steps ({ipe} per epoch) on {env.world_size} x {env.device.type}, "
                 f"parallel={strategy}, bf16={bf16}, from step {start_step}")

    def save(step_done: int, permanent: bool = False) -> None:
        # Position of the next batch: an epoch just finished resumes at the start of the next one.
        next_epoch, next_batch = (epoch + 1, 0) if batch_in_epoch >= ipe else (epoch, batch_in_epoch)
        manager.save(step_done, model, optimizer, {
            "step": step_done, "epoch": next_epoch, "batch_in_epoch": next_batch,
            "loader": loader.state_dict() if next_batch > 0 else None, "rng": rng_state(),
            "skipped_steps": skipped_total,
        }, meta={"epoch": next_epoch, "ipe": ipe}, permanent=permanent)

    step = start_step
    result = TrainResult(model, optimizer, step, folder)
    consecutive_bad = torch.zeros((), dtype=torch.int64, device=env.device)
    bad_in_window = torch.zeros((), dtype=torch.int64, device=env.device)
    acc = StepAccumulator()
    last_log_time = time.perf_counter()
    try:
        while step < total_steps:
            loader.set_epoch(epoch)
            if loader_state is not None:
                loader.load_state_dict(loader_state)
                loader_state = None
            batches = iter(loader)
            while step < total_steps and batch_in_epoch < ipe:
                t_data = time.perf_counter()
                (images, _), masks_enc, masks_pred = next(batches)
                data_seconds = time.perf_counter() - t_data
                images = normalize(images)
                masks_enc = [m.to(env.device, non_blocking=True) for m in masks_enc]
                masks_pred = [m.to(env.device, non_blocking=True) for m in masks_pred]

                lr, wd = sched.apply(optimizer, step)
                momentum = sched.momentum(step)
                with torch.autocast(**autocast):
                    loss = train_module(images, masks_enc, masks_pred)
                loss.backward()
                grad_norm = _grad_norm(params)
                if t.clip_grad > 0:
                    torch.nn.utils.clip_grads_with_norm_(params, t.clip_grad, grad_norm, foreach=True)
                bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
                if fused_skip:
                    # Fused AdamW skips the update (and its step count) where found_inf is set: no host sync.
                    optimizer.found_inf, optimizer.grad_scale = bad.float(), None
                    optimizer.step()
                    model.update_target(momentum)
                elif not bool(bad):
                    optimizer.step()
                    model.update_target(momentum)
                optimizer.zero_grad(set_to_none=True)
                consecutive_bad = (consecutive_bad + 1) * bad
                bad_in_window += bad
                step += 1
                batch_in_epoch += 1
                acc.add(loss, grad_norm, images.shape[0],
                        flops.per_image([m.shape[1] for m in masks_enc], [m.shape[1] for m in masks_pred])
                        * images.shape[0], data_seconds)

                log_now = step % t.log_every == 0 or step == total_steps
                if log_now or not fused_skip:
                    if int(consecutive_bad) >= t.max_bad_steps:
                        raise TrainingDiverged(
                            f"{t.max_bad_steps} consecutive steps had a non-finite loss or gradient (last at step "
                            f"{step}); stopping. The last good checkpoint is kept: {manager.latest()}. Lower "
                            "optimization.lr, check the data, or raise train.max_bad_steps.")
                if log_now:
                    losses = _mean_over_ranks(torch.stack(acc.losses).float(), env).tolist()
                    norms = torch.stack(acc.grad_norms).float().tolist()
                    n_bad = int(bad_in_window)
                    skipped_total += n_bad
                    bad_in_window.zero_()
                    now = time.perf_counter()
                    elapsed = now - last_log_time
                    step_time = elapsed / acc.steps
                    record = {
                        "step": step, "epoch": epoch, "loss": losses[-1], "loss_avg": sum(losses) / len(losses),
                        "lr": lr, "wd": wd, "momentum": momentum, "grad_norm": norms[-1],
                        "img_per_s": acc.images * env.world_size / elapsed, "step_time_s": step_time,
                        "data_time_s": acc.data_seconds / acc.steps, "peak_mem_mb": _peak_memory_mb(env.device),
                        "skipped_steps": skipped_total, "eta_s": step_time * (total_steps - step),
                    }
                    if peak_tflops > 0:
                        record["mfu"] = acc.flops / elapsed / (peak_tflops * 1e12)
                    if t.log_every == 1:
                        result.losses[step] = losses[-1]
                    else:
                        result.losses.update(zip(range(step - len(losses) + 1, step + 1), losses, strict=True))
                    sink.log(record)
                    acc.reset()
                    last_log_time = time.perf_counter()
                if rankme_images is not None and step % t.rankme_every == 0:
                    value = _rankme(model, rankme_images, normalize, cfg.data.batch_size, autocast)
                    sink.log({"step": step, "kind": "rankme", "rankme": value})
                if env.distributed and log_now:
                    # Ranks get the signal at slightly different times: agree at log steps, all or none.
                    flag = torch.tensor([float(stop.received is not None)], device=env.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    if flag.item() > 0 and stop.received is None:
                        stop.received = signal.SIGTERM
                if stop.received is not None and (not env.distributed or log_now):
                    sink.message(f"signal {signal.Signals(stop.received).name}: checkpointing at step {step}")
                    save(step)
                    result.stopped_by_signal = True
                    return result
                if t.checkpoint_steps > 0 and step % t.checkpoint_steps == 0:
                    save(step)
            if batch_in_epoch >= ipe:
                if step < total_steps:
                    save(step, permanent=(epoch + 1) % t.checkpoint_every == 0)
                epoch, batch_in_epoch = epoch + 1, 0
        save(step)
        if t.export:
            export_encoder(cfg, model, folder, env)
    finally:
        result.step, result.skipped_steps = step, skipped_total
        stop.restore()
        sink.close()
    return result


def export_encoder(cfg, model: IJEPA, folder: Path, env: DistEnv) -> None:
    """Write the final target encoder as a full state dict (``encoder.pt``) and a timm-named file (rank 0)."""
    from fastjepa.compat.ijepa import export_timm
    from fastjepa.models import build_models

    state = full_model_state(model.target_encoder)
    if env.is_main:
        torch.save(state, folder / "target_encoder.pt")
        encoder, _ = build_models(cfg)
        encoder.load_state_dict(state)
        path = export_timm(encoder, folder / "target_encoder_timm")
        logger.info(f"exported the target encoder: {folder / 'target_encoder.pt'}, {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastjepa-train", description="I-JEPA pretraining (single process, DDP, FSDP2).")
    p.add_argument("--config", required=True, help="YAML config (official I-JEPA keys + fastjepa/train sections)")
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
    try:
        cfg = fj_config.load(args.config, overrides=args.overrides)
    except (fj_config.ConfigError, FileNotFoundError) as e:
        print(f"fastjepa-train: config error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg, resume=args.resume, official_checkpoint=args.official_checkpoint)
    except (SetupError, fj_config.ConfigError) as e:
        print(f"fastjepa-train: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"fastjepa-train: {e}", file=sys.stderr)
        return 3
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
