"""The trainer's pieces, over one small state object (torchtitan's shape): ``Trainer.setup`` builds a run,
``Trainer.stepper`` runs one optimisation step on the device (``fastjepa.step``), ``Trainer.record`` logs,
``Trainer.save`` checkpoints. ``fastjepa.train.run`` is the loop that calls them.

Setup checks everything that can be wrong with the config, the data and the checkpoint paths before any model is
built (``SetupError``). A step never synchronises with the host: its loss, gradient norm and non-finite flag stay
on the device until a log step reads a whole window of them at once.
"""

import logging
import os
import resource
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from fastjepa import schedules
from fastjepa.checkpoint import (
    CheckpointError,
    CheckpointManager,
    RunLock,
    rng_state,
    step_of,
)
from fastjepa.choices import SHARDED_STRATEGIES
from fastjepa.compat.ijepa import load_official
from fastjepa.data import Normalize, build_pretrain_loader, mean_std
from fastjepa.data.loader import BadDataError
from fastjepa.eval.online import OnlineProbe
from fastjepa.eval.rankme import rankme
from fastjepa.ijepa import IJEPA, build_ijepa
from fastjepa.kernels import set_backend
from fastjepa.kernels._utils import triton_unavailable
from fastjepa.mask_batch import Masks
from fastjepa.masks import MultiBlockMaskCollator
from fastjepa.metrics import (
    FlopModel,
    MetricsSink,
    StepAccumulator,
    device_memory_bytes,
    estimate_training_memory,
    peak_flops,
)
from fastjepa.modules.fp8 import fp8_unsupported, torchao_unavailable
from fastjepa.parallel import DistEnv, init_distributed, resolve_strategy
from fastjepa.resume import (
    TrainState,
    check_resume_compatible,
    names_one_checkpoint,
    recorded_settings,
    resolve_resume,
    resume_state,
)
from fastjepa.spec import ModelSpec, StepOptions
from fastjepa.step import StepOutput, Stepper

logger = logging.getLogger("fastjepa")


class SetupError(Exception):
    """A problem with the config, data or checkpoint paths, found before any model is built."""


class TrainingDiverged(RuntimeError):
    """``train.max_bad_steps`` consecutive steps had a non-finite loss or gradient."""


class StepOutOfMemory(RuntimeError):
    """A step ran out of device memory: what it was, and the settings that lower it."""


class StopSignal:
    """SIGTERM/SIGUSR1 (preemption notice) or SIGINT (Ctrl-C) -> save a checkpoint at the end of the step and exit.
    The first signal puts the previous handlers back, so a second one acts at once (SIGTERM ends the process,
    SIGINT raises KeyboardInterrupt) when the step would take too long."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def install(self) -> None:
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self.restore()
        logger.warning(f"signal {signal.Signals(signum).name}: checkpointing at the end of this step; send it again "
                       "to stop at once, without a checkpoint")


@dataclass
class Trainer:
    """A built run: its components and its ``TrainState``, complete once ``setup`` returns. Every rank holds one."""

    cfg: object
    env: DistEnv
    strategy: str
    loader: object
    sched: schedules.Schedules
    manager: CheckpointManager
    total_steps: int
    model: IJEPA
    stepper: Stepper
    flop_model: FlopModel
    state: TrainState
    sink: MetricsSink
    normalize: Normalize
    lock: RunLock | None
    rankme_images: torch.Tensor | None  # RankMe's fixed images, when train.rankme_every > 0
    online_probe: OnlineProbe | None  # the eval section's k-NN probe, when on
    stop: StopSignal = field(default_factory=StopSignal)
    last_eval_step: int = -1
    window: StepAccumulator = field(default_factory=StepAccumulator)

    @property
    def folder(self) -> Path:
        return Path(self.cfg.logging.folder)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.stepper.optimizer

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @classmethod
    def setup(cls, cfg, resume: str | None = None, official_checkpoint: str | None = None) -> "Trainer":
        """Processes, data, schedules, checkpoint paths, the folder's lock and a memory estimate (all checked
        first: ``SetupError``), then the model, its wrapping, the optimizer, the restored state, the run folder
        and its metrics sink."""
        try:
            env = init_distributed(cfg.train.dist_timeout_s, cfg.train.device)
            strategy = resolve_strategy(cfg.train.parallel, env.world_size)
        except ValueError as e:
            raise SetupError(str(e)) from e
        plan = plan_run(cfg, env, strategy, resume, official_checkpoint)
        model, official_opt, start_epoch = build_model(cfg, plan.spec, plan.official)
        stepper = Stepper.build(plan.spec, StepOptions.from_config(cfg), env, strategy, model, plan.sched)
        if official_opt is not None:
            if strategy in SHARDED_STRATEGIES:
                logger.warning("official optimizer state is not loaded under FSDP2 (weights are); AdamW restarts")
            else:
                stepper.optimizer.load_state_dict(official_opt)
        state = TrainState(step=start_epoch * len(plan.loader), epoch=start_epoch)
        plan.manager.remove_partial_saves()
        if plan.resume_from is not None:
            try:
                state = resume_state(plan.resume_from, not names_one_checkpoint(cfg, resume), plan.manager, model,
                                     stepper.optimizer, plan.loader)
            except CheckpointError as e:
                raise SetupError(str(e)) from e
        if env.is_main:
            Path(cfg.logging.folder).mkdir(parents=True, exist_ok=True)
            cfg.dump(Path(cfg.logging.folder) / "config.yaml")
        sink = MetricsSink(cfg.logging.folder, plan.total_steps, state.step, enabled=env.is_main,
                           progress={"auto": None, "bar": True, "lines": False}[cfg.train.progress])
        rankme = rankme_images(cfg, env, plan.spec) if cfg.train.rankme_every > 0 else None
        return cls(cfg, env, strategy, plan.loader, plan.sched, plan.manager, plan.total_steps, model, stepper,
                   FlopModel.from_model(model), state, sink, Normalize(*mean_std(cfg), env.device), plan.lock, rankme,
                   plan.online_probe)

    def start(self) -> None:
        """The signal handlers, and the run's first console line."""
        env = self.env
        self.stop.install()
        self.sink.message(f"training {self.total_steps} steps ({self.steps_per_epoch} per epoch) on "
                          f"{env.world_size} x {env.device.type}, parallel={self.strategy}, bf16={self.stepper.bf16}, "
                          f"from step {self.state.step}")

    def close(self) -> None:
        self.manager.wait()  # an asynchronous save still in flight is finished and committed
        self.stop.restore()
        self.sink.close()
        if self.lock is not None:
            self.lock.release()

    def save_blocker(self) -> str | None:
        """None when the current state may be checkpointed, else why not: the last step was not finite, or a
        weight is not finite (a host read: called at saves only)."""
        bad = int(self.stepper.consecutive_bad)
        if bad > 0:
            return f"the last {bad} step(s) had a non-finite loss or gradient"
        finite = torch.stack([torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
                              for p in self.model.parameters()]).all().float()
        if self.env.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return None if finite.item() == 1 else "some weights are not finite"

    def save(self, permanent: bool = False, background: bool = False) -> Path | None:
        """Checkpoint the current step (every rank calls it), unless the state is not healthy: a state reached
        through non-finite steps is never saved, so the newest checkpoint is always a healthy one. ``background``
        (with ``train.async_checkpoint``): written while training goes on, ``latest`` once complete."""
        problem = self.save_blocker()
        if problem is not None:
            logger.warning(f"not checkpointing step {self.state.step}: {problem}; the newest healthy checkpoint "
                           f"stays {self.manager.latest()}")
            return None
        s = self.state
        # Position of the next batch: an epoch just finished resumes at the start of the next one.
        epoch_done = s.batch_in_epoch >= self.steps_per_epoch
        next_epoch, next_batch = (s.epoch + 1, 0) if epoch_done else (s.epoch, s.batch_in_epoch)
        meta = {"epoch": next_epoch, "ipe": self.steps_per_epoch, **recorded_settings(self.cfg),
                "num_workers": self.cfg.data.num_workers, "loss": None if self.stepper.last_loss is None
                else float(self.stepper.last_loss)}
        path = self.manager.save(s.step, self.model, self.optimizer, {
            "step": s.step, "epoch": next_epoch, "batch_in_epoch": next_batch,
            "loader": self.loader.state_dict() if next_batch > 0 else None, "rng": rng_state(),
            "skipped_steps": s.skipped_steps,
        }, meta=meta, permanent=permanent, asynchronous=background and self.cfg.train.async_checkpoint)
        return path

    def end_epoch(self) -> None:
        """The epoch's skipped samples in the log and ``metrics.jsonl``; the share of bad samples over all ranks
        against data.max_bad_fraction."""
        loader = self.loader
        counts = torch.tensor([sum(loader.bad.values()), loader.seen], dtype=torch.float64)
        kinds = dict(loader.bad)
        if self.env.distributed:
            dist.all_reduce(counts)
            gathered = [None] * self.env.world_size
            dist.all_gather_object(gathered, kinds)
            kinds = dict(sum((Counter(k) for k in gathered), Counter()))
        bad, seen = int(counts[0]), int(counts[1])
        if bad:
            self.sink.message(f"epoch {self.state.epoch}: skipped {bad} bad samples of {seen} read ({kinds})")
        self.sink.log({"step": self.state.step, "kind": "data", "epoch": self.state.epoch, "bad": bad,
                       "seen": seen, "bad_kinds": kinds})
        if bad > self.cfg.data.max_bad_fraction * max(seen, 1):
            raise BadDataError("all", self.state.epoch, Counter(kinds), seen, self.cfg.data.max_bad_fraction)

    def epoch_batches(self):
        """This epoch's remaining batches as the loader hands them off, on the CPU: (uint8 images, the step's
        ``Masks``, its FLOPs, seconds spent waiting for the loader). Packing the masks and counting the FLOPs
        here needs no device read."""
        self.loader.set_epoch(self.state.epoch)
        batches = iter(self.loader)
        while self.state.batch_in_epoch < self.steps_per_epoch:
            tic = time.perf_counter()
            (images, _), masks = next(batches)
            waited = time.perf_counter() - tic
            yield images, masks, self.flop_model.masks_step(masks), waited

    def to_device(self, images: torch.Tensor, masks: Masks) -> tuple[torch.Tensor, Masks]:
        """One batch to the device, normalised there (asynchronous copies, constants already on the device)."""
        device = self.env.device
        return self.normalize(images.to(device, non_blocking=True)), masks.to(device, non_blocking=True)

    def record(self, out: StepOutput, images: int, flops: float, waited: float, lr: float, wd: float,
               momentum: float, rankme: float | None = None) -> dict | None:
        """Add a step to the logging window; on a log step (or one with a RankMe value), read the window (one host
        sync) and write a record."""
        self.window.add(out.loss, out.grad_norm, out.bad, images, flops, waited, out.terms)
        s, t = self.state, self.cfg.train
        if s.step % t.log_every and s.step != self.total_steps and rankme is None:
            return None
        losses = mean_over_ranks(torch.stack(self.window.losses).float(), self.env).tolist()
        norms = torch.stack(self.window.grad_norms).float().tolist()
        s.skipped_steps += int(torch.stack(self.window.bad).sum())
        elapsed = time.perf_counter() - self.window.t0
        step_time = elapsed / self.window.steps
        record = {
            "step": s.step, "epoch": s.epoch, "loss": losses[-1], "loss_avg": sum(losses) / len(losses),
            "lr": lr, "wd": wd, "momentum": momentum, "grad_norm": norms[-1],
            "img_per_s": self.window.images * self.env.world_size / elapsed, "step_time_s": step_time,
            "data_time_s": self.window.data_seconds / self.window.steps,
            "peak_mem_mb": peak_memory_mb(self.env.device), "skipped_steps": s.skipped_steps,
            "eta_s": step_time * (self.total_steps - s.step),
        }
        peak = self.cfg.train.peak_tflops * 1e12 or peak_flops(self.env.device)
        if peak:
            record["mfu"] = self.window.flops / elapsed / peak
        if self.window.terms is not None:  # SIGReg: the loss's two terms (the I-JEPA one averaged over ranks)
            record["loss_ijepa"], record["sigreg"] = mean_over_ranks(torch.stack(self.window.terms).float(),
                                                                     self.env).tolist()
        if rankme is not None:
            record["rankme"] = rankme
        record["losses"] = dict(zip(range(s.step - len(losses) + 1, s.step + 1), losses, strict=True))
        self.sink.log({k: v for k, v in record.items() if k != "losses"})
        self.window.reset()
        return record

    def check_divergence(self) -> None:
        """Stop when ``train.max_bad_steps`` steps in a row were non-finite (a host read: call at log steps)."""
        t = self.cfg.train
        if int(self.stepper.consecutive_bad) >= t.max_bad_steps:
            latest = self.manager.latest()
            kept = (f"The last good checkpoint is kept: {latest}." if latest is not None else
                    "No checkpoint was written before it diverged: a rerun starts from step 0.")
            raise TrainingDiverged(
                f"{t.max_bad_steps} consecutive steps had a non-finite loss or gradient (last at step "
                f"{self.state.step}); stopping. {kept} Lower optimization.lr, check the data, or raise "
                "train.max_bad_steps.")

    def out_of_memory(self, error: BaseException) -> StepOutOfMemory:
        """The error a run ends with when step ``state.step + 1`` ran out of device memory (no save after it: the
        last checkpoint stays the latest)."""
        device, t = self.env.device, self.cfg.train
        peak = (f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB of "
                f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB"
                if device.type == "cuda" else "peak not known off a GPU")
        lower = ([] if t.activation_checkpointing else ["set train.activation_checkpointing=true (recomputes each "
                                                        "block's activations: much less memory, ~30% more time)"])
        lower.append(f"lower data.batch_size (now {self.cfg.data.batch_size} per rank)")
        return StepOutOfMemory(
            f"step {self.state.step + 1} ran out of device memory on {device} ({peak}; "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}). To fit: "
            f"{'; or '.join(lower)}. The last checkpoint is kept: {self.manager.latest() or '(none yet)'}")

    def stop_requested(self, log_step: bool) -> bool:
        """A preemption signal arrived (under torchrun: at any rank, agreed on at log steps, all or none)."""
        if self.env.distributed:
            if not log_step:
                return False
            flag = torch.tensor([float(self.stop.received is not None)], device=self.env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 and self.stop.received is None:
                self.stop.received = signal.SIGTERM
        return self.stop.received is not None

    @torch.no_grad()
    def online_eval(self) -> None:
        """The ``eval`` section's k-NN probe of the target encoder, logged (``kind: eval``) and shown."""
        result = self.online_probe(self.model.target_forward_encoder, self.env.device,
                                   torch.bfloat16 if self.stepper.bf16 else None)
        self.sink.log({"step": self.state.step, "kind": "eval", "epoch": self.state.epoch, **result})
        self.last_eval_step = self.state.step
        self.sink.message(f"epoch {self.state.epoch}: online k-NN top-1 {result['knn_top1']:.4f} (eval.data="
                          f"{self.cfg.eval.data}, {result['eval_seconds']:.1f} s)")

    def rankme(self) -> float:
        """RankMe of the target encoder's average-pooled embeddings of the fixed images."""
        batch, feats = self.cfg.data.batch_size, []
        for i in range(0, len(self.rankme_images), batch):
            images = self.normalize(self.rankme_images[i:i + batch].to(self.env.device))
            with torch.autocast(**self.stepper.autocast):
                feats.append(self.model.target_forward_encoder(images).float().mean(1))
        return rankme(torch.cat(feats))


@dataclass
class RunPlan:
    """What ``plan_run`` checked and built before any model exists."""

    loader: object
    sched: schedules.Schedules
    total_steps: int
    manager: CheckpointManager
    lock: RunLock | None
    resume_from: Path | None
    official: Path | None
    online_probe: OnlineProbe | None
    spec: ModelSpec  # the run's models and masks, derived from the config once


def plan_run(cfg, env: DistEnv, strategy: str, resume: str | None, official_checkpoint: str | None) -> RunPlan:
    """Everything that can be wrong before a model is built, as ``SetupError`` naming the key or path and the fix:
    paths, a writable and unlocked run folder, the data, the checkpoint to resume (verified; its batch size), the
    official checkpoint, and whether the run fits in memory."""
    lock = None
    spec = ModelSpec.from_config(cfg)
    created = absent_folders(Path(cfg.logging.folder)) if cfg.logging.folder else []
    try:
        cfg.require_paths(("logging.folder", "data.root_path") if cfg.data.source == "imagefolder"
                          else ("logging.folder",))
        check_writable(Path(cfg.logging.folder))
        lock = lock_folder(cfg, env)
        loader = build_data(cfg, env, spec)
        sched = schedules.build(cfg.optimization, len(loader))
        manager = CheckpointManager(cfg.logging.folder, keep_last=cfg.train.keep_last)
        resume_from = resolve_resume(cfg, manager, resume)
        official = official_checkpoint_path(cfg, official_checkpoint) if resume_from is None else None
        check_resume_compatible(cfg, resume_from)
        online_probe = OnlineProbe.from_config(cfg)
        check_precision(cfg, env)
        check_memory(cfg, env, strategy, spec)
    except (ValueError, OSError, CheckpointError, SetupError) as e:
        if lock is not None:
            lock.release()
        remove_if_unused(created)
        if isinstance(e, SetupError):
            raise
        raise SetupError(str(e)) from e
    manager.start_timeline(-1 if resume_from is None else step_of(resume_from), keep=resume_from)
    total_steps = int(cfg.optimization.epochs * len(loader))
    if cfg.train.max_steps > 0:
        total_steps = min(total_steps, cfg.train.max_steps)
    return RunPlan(loader, sched, total_steps, manager, lock, resume_from, official, online_probe, spec)


def absent_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    folder = folder.absolute()
    return [f for f in (folder, *folder.parents) if not f.exists()]


def remove_if_unused(folders: list[Path]) -> None:
    """A refused run leaves nothing behind: the folders it created, deepest first, while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another run's files) or already gone
            return


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SetupError(f"logging.folder={folder} is not writable ({e.strerror or e}); checkpoints and metrics go "
                         "there: pick a writable folder or fix its permissions") from e


def lock_folder(cfg, env: DistEnv) -> RunLock | None:
    """Rank 0 locks the run folder; every rank learns whether it could (a second run on a folder stops)."""
    lock, problem = None, ""
    if env.is_main:
        lock = RunLock(cfg.logging.folder, stale_after_s=max(900.0, 2 * cfg.train.dist_timeout_s))
        try:
            lock.acquire()
        except CheckpointError as e:
            lock, problem = None, str(e)
    if env.distributed:
        failed = torch.tensor([float(bool(problem))])
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        problem = problem or ("rank 0 could not lock logging.folder (see its error)" if failed.item() else "")
    if problem:
        raise CheckpointError(problem)
    return lock


def check_precision(cfg, env: DistEnv) -> None:
    """FP8 needs a GPU with FP8 tensor cores (and torchao to train in it); fastjepa's fused blocks and update need
    triton on a GPU."""
    fp8 = cfg.fastjepa.fp8
    problem = None if fp8 == "none" else fp8_unsupported(env.device) or (fp8 == "all" and torchao_unavailable())
    if problem:
        raise SetupError(f"fastjepa.fp8={fp8}: {problem}; set fastjepa.fp8=none here")
    for key, value, instead in (("block_impl", cfg.fastjepa.block_impl, "compile"),
                                ("update_impl", cfg.fastjepa.update_impl, "separate")):
        problem = triton_unavailable(env.device, cfg.fastjepa.kernel_backend) if value == "fused" else None
        if problem:
            raise SetupError(f"fastjepa.{key}=fused: {problem}; set fastjepa.{key}=auto (or {instead})")


def check_memory(cfg, env: DistEnv, strategy: str, spec: ModelSpec) -> None:
    """Refuse a run whose estimated memory is above what the device has; warn above 80% of it."""
    if not cfg.train.memory_check:
        return
    bf16 = bool(cfg.meta.use_bfloat16) and env.device.type == "cuda"
    shards = {"fsdp": env.world_size, "hsdp": cfg.train.shard_size or env.local_world_size}.get(strategy, 1)
    need = estimate_training_memory(spec, shards, bf16, cfg.train.activation_checkpointing,
                                    cfg.fastjepa.target_encoder == "online")
    have = device_memory_bytes(env.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    detail = (f"about {need['total'] / 2**30:.1f} GiB per rank (weights, gradients and AdamW "
              f"{need['weights_and_optimizer'] / 2**30:.1f} GiB, activations {need['activations'] / 2**30:.1f} GiB) "
              f"for {cfg.meta.model_name} at data.batch_size={cfg.data.batch_size}, and {env.device.type} has "
              f"{have / 2**30:.1f} GiB")
    if need["total"] > have:
        raise SetupError(f"this run needs {detail}: lower data.batch_size, set train.activation_checkpointing=true, "
                         "use more GPUs (FSDP2 shards the weights) or a smaller model; train.memory_check=false "
                         "skips this estimate")
    if need["total"] > 0.8 * have:
        logger.warning(f"this run may run out of memory: it needs {detail}")


def build_data(cfg, env: DistEnv, spec: ModelSpec):
    collator = MultiBlockMaskCollator.from_spec(spec, seed=cfg.fastjepa.seed, rank=env.rank)
    loader = build_pretrain_loader(cfg, rank=env.rank, world_size=env.world_size, collator=collator)
    if len(loader) < 1:
        raise SetupError(f"the data source gives no full batch of data.batch_size={cfg.data.batch_size} per rank "
                         f"on {env.world_size} rank(s); lower data.batch_size or add data")
    return loader


def build_model(cfg, spec: ModelSpec, official: Path | None) -> tuple[IJEPA, dict | None, int]:
    """(model, official optimizer state or None, epoch to start at): an official checkpoint's, or a new model
    with the same initialisation on every rank (FSDP2 keeps each rank's slice of its own full tensors)."""
    set_backend(cfg.fastjepa.kernel_backend)
    torch.manual_seed(cfg.fastjepa.seed)
    if official is None:
        return build_ijepa(spec), None, 0
    loaded = load_official(official, cfg)
    logger.info(f"loaded official checkpoint {official} (epoch {loaded.epoch})")
    return loaded.model, loaded.optimizer_state, loaded.epoch


def official_checkpoint_path(cfg, given: str | None) -> Path | None:
    """``--official-checkpoint``, else the official ``meta.load_checkpoint`` (``meta.read_checkpoint`` or
    ``<logging.write_tag>-latest.pth.tar`` inside ``logging.folder``), else None."""
    if given is None and not cfg.meta.load_checkpoint:
        return None
    if given is not None:
        path, what = Path(given), "--official-checkpoint"
    else:
        path = Path(cfg.logging.folder) / (cfg.meta.read_checkpoint or f"{cfg.logging.write_tag}-latest.pth.tar")
        what = "meta.load_checkpoint=true"
    if not path.is_file():
        raise FileNotFoundError(f"{what}: official checkpoint {path} not found; pass the .pth.tar file (or set "
                                "meta.read_checkpoint to its name inside logging.folder)")
    return path


def rankme_images(cfg, env: DistEnv, spec: ModelSpec) -> torch.Tensor:
    """A fixed set of this rank's ``train.rankme_samples`` images (the first of epoch 0, from a loader of its
    own) for RankMe."""
    count = cfg.train.rankme_samples
    loader = build_data(cfg, env, spec)  # its masks go unused
    loader.set_epoch(0)
    images = []
    for (x, _), _ in loader:
        images.append(x)
        if sum(len(i) for i in images) >= count:
            break
    return torch.cat(images)[:count]


def mean_over_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= env.world_size
    return values


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
