"""EMA of a target model towards an online model with the fused multi-tensor kernel."""

import torch
from torch import nn

from fastjepa.kernels import ema_update


class EMAUpdater:
    """``target <- m * target + (1 - m) * online`` over every parameter, in one or a few launches.

    Args:
        target, online: modules with the same parameter names and shapes (plain or FSDP2-sharded alike).
        copy_to: optional module of the same structure (e.g. a bf16 replica of the target used for its
            forward): its parameters receive the new target values in the same pass.
    The parameter lists are collected once, so the kernel's device table is built once and reused every step.
    """

    def __init__(self, target: nn.Module, online: nn.Module, copy_to: nn.Module | None = None):
        target_params, online_params = dict(target.named_parameters()), dict(online.named_parameters())
        if target_params.keys() != online_params.keys():
            missing = sorted(target_params.keys() ^ online_params.keys())[:5]
            raise ValueError(f"EMAUpdater: target and online parameters differ, e.g. {missing}; pass two copies of "
                             "the same architecture")
        self.names = list(target_params)
        self.target = [target_params[n] for n in self.names]
        self.online = [online_params[n] for n in self.names]
        self.copy = None
        if copy_to is not None:
            copy_params = dict(copy_to.named_parameters())
            if copy_params.keys() != target_params.keys():
                raise ValueError("EMAUpdater: copy_to must have the target's parameter names (a replica of it)")
            self.copy = [copy_params[n] for n in self.names]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        ema_update(self.target, self.online, momentum, copy=self.copy)

    __call__ = update
