"""The official I-JEPA schedules as pure functions of the iteration.

The official code keeps stateful schedulers and steps them *before* each forward, so iteration ``i`` (0-based,
counted from the start of training) trains with the value after ``i + 1`` steps; the EMA momentum comes from a
generator consumed after each optimizer step, so iteration ``i`` uses its ``i``-th value. Writing them as
functions of ``i`` makes resuming exact without replaying the schedulers.
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedules:
    start_lr: float
    ref_lr: float
    final_lr: float
    warmup_steps: int
    ref_wd: float
    final_wd: float
    ema: tuple[float, float]
    total_steps: int  # int(ipe_scale * epochs * ipe): the horizon of the lr and weight-decay cosines
    momentum_horizon: float  # ipe * epochs * ipe_scale, unrounded, as the official momentum generator uses it

    def lr(self, i: int) -> float:
        step = i + 1
        if step < self.warmup_steps:
            return self.start_lr + step / max(1, self.warmup_steps) * (self.ref_lr - self.start_lr)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cosine = self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.final_lr, cosine)

    def weight_decay(self, i: int) -> float:
        progress = (i + 1) / self.total_steps
        wd = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.final_wd, wd) if self.final_wd <= self.ref_wd else min(self.final_wd, wd)

    def momentum(self, i: int) -> float:
        return self.ema[0] + i * (self.ema[1] - self.ema[0]) / self.momentum_horizon

    def apply(self, optimizer: torch.optim.Optimizer, i: int) -> tuple[float, float]:
        """Set iteration ``i``'s lr on every group and weight decay on the groups that are not excluded."""
        lr, wd = self.lr(i), self.weight_decay(i)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if not group.get("WD_exclude", False):
                group["weight_decay"] = wd
        return lr, wd


def build(optimization, iterations_per_epoch: int) -> Schedules:
    """Schedules for an ``optimization`` config section (official keys) and the loader's batches per epoch."""
    if iterations_per_epoch < 1:
        raise ValueError(f"iterations_per_epoch must be >= 1, got {iterations_per_epoch}: is the dataset empty?")
    o = optimization
    total = int(o.ipe_scale * o.epochs * iterations_per_epoch)
    if total < 1:
        raise ValueError(f"optimization.epochs={o.epochs} x ipe_scale={o.ipe_scale} gives no training step")
    return Schedules(
        start_lr=float(o.start_lr), ref_lr=float(o.lr), final_lr=float(o.final_lr),
        warmup_steps=int(o.warmup * iterations_per_epoch),
        ref_wd=float(o.weight_decay), final_wd=float(o.final_weight_decay),
        ema=(float(o.ema[0]), float(o.ema[1])), total_steps=total,
        momentum_horizon=iterations_per_epoch * o.epochs * o.ipe_scale,
    )
