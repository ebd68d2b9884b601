"""EMA of the target encoder: ``target <- m * target + (1 - m) * online`` over every parameter."""

import torch


@torch.no_grad()
def ema_update_ref(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float) -> None:
    """Reference: the official per-parameter loop."""
    for p_t, p_o in zip(target, online, strict=True):
        p_t.mul_(momentum).add_((1.0 - momentum) * p_o.detach())


@torch.no_grad()
def ema_update(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float) -> None:
    """In-place EMA of ``target`` towards ``online`` (lists of same-shaped tensors, e.g. FSDP2 local shards)."""
    if len(target) != len(online):
        raise ValueError(f"ema_update: {len(target)} target tensors but {len(online)} online tensors")
    torch._foreach_lerp_(target, [p.detach() for p in online], 1.0 - momentum)
