"""AdamW with the official I-JEPA parameter groups."""

import torch
from torch import nn


def param_groups(encoder: nn.Module, predictor: nn.Module) -> list[dict]:
    """The official four groups, in the official order, so optimizer state dicts are interchangeable with
    official checkpoints: weights of the encoder, of the predictor, then biases and 1-D parameters of each
    (weight decay 0, ``WD_exclude``). Frozen parameters (the sin-cos embeddings) are listed as the official
    code lists them; AdamW skips them since they never get a gradient."""

    def split(module: nn.Module, decayed: bool) -> list[nn.Parameter]:
        return [p for n, p in module.named_parameters() if (("bias" not in n) and p.ndim != 1) == decayed]

    return [
        {"params": split(encoder, True)},
        {"params": split(predictor, True)},
        {"params": split(encoder, False), "WD_exclude": True, "weight_decay": 0.0},
        {"params": split(predictor, False), "WD_exclude": True, "weight_decay": 0.0},
    ]


def build_optimizer(encoder: nn.Module, predictor: nn.Module) -> torch.optim.AdamW:
    """AdamW over the official groups, fused (one kernel for all parameters, on CUDA and CPU alike): it also skips
    a step with a non-finite gradient on the device (``found_inf``), without a host synchronisation.
    lr and weight decay are set before every step by ``fastjepa.schedules.Schedules.apply``."""
    return torch.optim.AdamW(param_groups(encoder, predictor), fused=True)
