"""One I-JEPA training step on the device, and the model preparation that makes it fast: the same code for the
trainer and for the step benchmark (``bench/bench_step.py``), so the benchmark times exactly the trainer's step.

``prepare_model`` applies, in order: the bf16 target replica (the EMA pass writes it; the target forward reads 2
bytes per weight and nothing re-casts; its matmuls in FP8 with ``fastjepa.fp8: target``), torchao's FP8 training
layers in the context encoder and the predictor (``fastjepa.fp8: all``), ``auto``
attention and ``auto`` block implementations resolved by timing at each call site's shapes (rank 0's choice on
every rank, logged once), then activation checkpointing, ``torch.compile`` of
every block (by default on CUDA) and DDP/FSDP2.
``Stepper`` runs forward, backward, clipping, fused AdamW and the EMA without a host synchronisation: the loss,
the gradient norm and the non-finite flag stay on the device.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastjepa.choices import SHARDED_STRATEGIES, UPDATE_IMPLS
from fastjepa.ijepa import IJEPA
from fastjepa.kernels import adamw_ema_step, ema_update
from fastjepa.kernels.ema import _local
from fastjepa.mask_batch import Masks
from fastjepa.modules.fp8 import to_float8_training
from fastjepa.optim import build_optimizer
from fastjepa.parallel import DistEnv, agree_on_choices, parallelize, resolve_attention, resolve_block_impl
from fastjepa.schedules import Schedules
from fastjepa.spec import ModelSpec, StepOptions
from fastjepa.timing import describe, fastest

logger = logging.getLogger("fastjepa")


@dataclass
class StepOutput:
    """One step's results, still on the device."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    bad: torch.Tensor  # non-finite loss or gradient: the update was skipped
    terms: tuple[torch.Tensor, torch.Tensor] | None = None  # with SIGReg: (I-JEPA loss, SIGReg statistic)


def prepare_model(spec: ModelSpec, options: StepOptions, env: DistEnv, strategy: str, model: IJEPA,
                  compile_backend: str = "inductor") -> tuple[torch.nn.Module, bool]:
    """Move, prepare and wrap ``model`` for training as the options ask; returns (the module whose forward gives
    the loss, whether the step runs in bf16). ``model`` stays the handle for the EMA and checkpoints."""
    model.to(env.device)
    bf16 = options.bf16 and env.device.type == "cuda"
    fp8 = options.fp8
    if (bf16 or fp8 != "none") and not model.online_target:  # an online target reads the encoder itself
        model.enable_target_replica(torch.bfloat16, fp8=fp8 != "none")
    if fp8 == "all":
        converted = to_float8_training(model.encoder) + to_float8_training(model.predictor)
        if env.is_main:
            logger.info(f"fastjepa.fp8=all: {converted} Linear layers of the encoder and predictor train in FP8 "
                        "(torchao.float8, row-wise)")
    dtype = torch.bfloat16 if bf16 else torch.float32
    compile_blocks = options.compile if options.compile is not None else env.device.type == "cuda"
    backend = compile_backend if compile_blocks else None
    choices = {"attention": resolve_attention(model, spec, dtype),
               "block_impl": resolve_block_impl(model, spec, options.block_impl, dtype, backend)}
    log_choices(agree_on_choices(model, spec, choices), env)
    train_module = parallelize(model, env, strategy, bf16=bf16, compile=backend, shard_size=options.shard_size,
                               activation_checkpointing=options.activation_checkpointing)
    return train_module, bf16


def log_choices(choices: dict[str, dict[str, tuple]], env: DistEnv) -> None:
    """One line per timed choice (rank 0): what ``auto`` picked at each call site and the timings behind it."""
    if not env.is_main:
        return
    for setting, sites in choices.items():
        for site, (name, times) in sites.items():
            if times:
                logger.info(f"{setting} auto, {site}: {name} ({describe(times)})")


@dataclass
class Stepper:
    """Forward, backward, optional clipping, AdamW and the EMA of the target encoder, all on the device. A
    non-finite loss or gradient skips the update: fused AdamW reads the flag on the device (``found_inf``); an
    optimizer without it needs the flag on the host."""

    model: IJEPA
    train_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sched: Schedules
    bf16: bool
    autocast: dict
    clip_grad: float = 0.0
    update_impl: str = "separate"  # "fused": AdamW, the EMA and the replica in one pass (resolve_update_impl)
    consecutive_bad: torch.Tensor | None = None  # non-finite steps in a row, on the device
    last_loss: torch.Tensor | None = None  # on the device

    @classmethod
    def build(cls, spec: ModelSpec, options: StepOptions, env: DistEnv, strategy: str, model: IJEPA,
              sched: Schedules, compile_backend: str = "inductor") -> "Stepper":
        train_module, bf16 = prepare_model(spec, options, env, strategy, model, compile_backend)
        # FSDP2's mixed-precision policy casts the parameters itself; autocast would cast them again.
        sharded = strategy in SHARDED_STRATEGIES
        autocast = {"device_type": env.device.type, "dtype": torch.bfloat16, "enabled": bf16 and not sharded}
        optimizer = build_optimizer(model.encoder, model.predictor)
        choices = {"update_impl": {"parameters": resolve_update_impl(options.update_impl, optimizer, model)}}
        choices = agree_on_choices(model, spec, choices)
        log_choices(choices, env)
        stepper = cls(model, train_module, optimizer, sched, bf16, autocast, options.clip_grad,
                      choices["update_impl"]["parameters"][0])
        stepper.consecutive_bad = torch.zeros((), dtype=torch.int64, device=env.device)
        return stepper

    @property
    def fused(self) -> bool:
        return all(g.get("fused") for g in self.optimizer.param_groups)

    def __call__(self, images: torch.Tensor, masks: Masks, step: int,
                 mark: Callable[[str], None] | None = None) -> StepOutput:
        """Step ``step`` (0-based: its schedules' values) on a batch already on the device; ``mark`` (phase name)
        is called at the phase boundaries when a benchmark times them."""
        self.sched.apply(self.optimizer, step)
        with torch.autocast(**self.autocast):
            loss = self.train_module(images, masks, step=step)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = grad_norm_of(params)
        if self.clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad, grad_norm, foreach=True)
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        if mark is not None:
            mark("fwd_bwd")
        if self.fused:
            self.optimizer.found_inf, self.optimizer.grad_scale = bad.float(), None
        if self.fused or not bool(bad):
            self.update(self.sched.momentum(step), mark)
        self.optimizer.zero_grad(set_to_none=True)
        if mark is not None:
            mark("ema")
        self.consecutive_bad = (self.consecutive_bad + 1) * bad
        self.last_loss = loss.detach()
        return StepOutput(loss.detach(), grad_norm.detach(), bad, self.model.loss_terms)

    def update(self, momentum: float, mark: Callable[[str], None] | None = None) -> None:
        """AdamW, then the EMA of the target (and its replica): two passes, or one with ``update_impl`` fused."""
        if self.update_impl == "fused":
            target, online, copy = self.model.ema_pairs()
            adamw_ema_step(self.optimizer, target, online, momentum, copy, backend="triton")
            return
        self.optimizer.step()
        if mark is not None:
            mark("optimizer")
        self.model.update_target(momentum)


def _scratch_update(optimizer: torch.optim.Optimizer, model: IJEPA, budget: int):
    """Clones of the optimizer's first ``budget`` parameter elements (local shards under FSDP2), with random
    gradients, their groups' settings, and the EMA's targets and replica for the online ones among them: what the
    update candidates are timed on without touching the run's own state."""
    target, online, copy = model.ema_pairs()
    partner = {id(p): i for i, p in enumerate(online)}
    groups, pairs, used = [], ([], [], []), 0
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if used >= budget:
                break
            clone = _local(p).detach().clone().requires_grad_(p.requires_grad)
            if p.requires_grad:
                clone.grad = torch.randn_like(clone)
            params.append(clone)
            used += clone.numel()
            if id(p) in partner:
                i = partner[id(p)]
                pairs[0].append(_local(target[i]).detach().clone())
                pairs[1].append(clone)
                if copy is not None:
                    pairs[2].append(_local(copy[i]).detach().clone())
        if params:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    return torch.optim.AdamW(groups, fused=True), pairs[0], pairs[1], pairs[2] or None


def resolve_update_impl(impl: str, optimizer: torch.optim.Optimizer, model: IJEPA,
                        budget: int = 1 << 26) -> tuple[str, dict[str, float | str]]:
    """``fastjepa.update_impl`` made concrete, with the timings behind it: ``auto`` times the two-step update
    against the fused pass on clones of the run's first ``budget`` parameter elements, on its GPU; on CPU, with an
    online target (no EMA to fuse) and with FP8 targets (their EMA writes the e4m3 weights), it is ``separate``
    without timing."""
    if impl not in UPDATE_IMPLS:
        raise ValueError(f"fastjepa.update_impl={impl!r}: choose one of {UPDATE_IMPLS}")
    first = next(iter(model.encoder.parameters()))
    if impl != "auto" or _local(first).device.type != "cuda" or model.online_target or model.held_fp8_layers():
        return ("separate" if impl == "auto" else impl), {}
    scratch, target, online, copy = _scratch_update(optimizer, model, budget)

    def separate():
        scratch.step()
        ema_update(target, online, 0.996, copy=copy)

    best, times = fastest({"separate": separate,
                           "fused": lambda: adamw_ema_step(scratch, target, online, 0.996, copy, backend="triton")})
    return best or "separate", times


def grad_norm_of(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of all gradients in one fused reduction (foreach), left on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2: a partial norm over each rank's shard
        norm = norm.full_tensor()
    return norm
