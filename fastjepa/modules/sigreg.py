"""SIGReg, LeJEPA's regulariser (Balestriero & LeCun, 2025): pushes a batch of embeddings towards an isotropic
Gaussian, which rules out collapse (a collapsed or low-rank embedding is far from N(0, I) along most directions).

The sliced Epps–Pulley statistic, as LeJEPA defines it: project the ``N`` embeddings on ``slices`` random unit
directions; along each, compare the empirical characteristic function ``(mean cos(t x), mean sin(t x))`` with the
standard normal's ``(exp(-t²/2), 0)`` on ``points`` values of ``t`` in ``[0, t_max]``; integrate the squared
difference with the Gaussian weight ``exp(-t²/2)`` by the trapezoid rule (doubled: the difference is even in t, so
``[0, t_max]`` stands for ``[-t_max, t_max]``); multiply by ``N``; average over the slices.

The directions are a new draw every step from a seed every rank derives from the step, so all ranks project on
the same directions without communicating. Across processes only the per-slice sums of cos and sin (and the
sample count) are all-reduced, through an all-reduce whose gradient is all-reduced too: every rank computes the
global statistic, and the gradients the data-parallel average produces equal one process's over the whole batch
(``tests/test_sigreg.py``).

Cost: ``O(N × D × slices)`` for the projections plus ``O(N × slices × points)`` cos/sin; pooled per image (the
default in ``fastjepa.ijepa``) that is far under 1% of a ViT step; per token it holds ``N × slices × points``
floats three times for the backward, so lower ``slices`` or the batch there.
"""

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """A sum over ranks whose backward sums the gradients over ranks. (torch.distributed.nn's is deprecated and
    functional collectives get an autograd formula only in recent torch: this states the rule the gradients need.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable sum of ``x`` over the ranks of ``group`` (``x`` itself outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    return _AllReduceSum.apply(x, group)


class SIGReg(nn.Module):
    """``SIGReg(slices, points, t_max)(x, seed)``: the sliced Epps–Pulley statistic of the rows of ``x [N, D]``
    against N(0, I); a scalar, differentiable in ``x``. ``seed`` picks the directions (the same on every rank);
    ``group``: the data-parallel process group the batch is split over (default: all ranks)."""

    def __init__(self, slices: int = 1024, points: int = 17, t_max: float = 3.0):
        super().__init__()
        if slices < 1 or points < 2 or not t_max > 0:
            raise ValueError(f"SIGReg needs slices >= 1, points >= 2 and t_max > 0, got {slices}, {points}, {t_max}")
        self.slices = slices
        t = torch.linspace(0, t_max, points, dtype=torch.float64)
        gauss = torch.exp(-t.square() / 2)  # the standard normal's characteristic function, and the weight
        trapezoid = torch.full_like(t, t_max / (points - 1))
        trapezoid[1:-1] *= 2  # interior points: doubled for the mirrored half of the integral
        # derived from the three settings, so kept out of state dicts (checkpoints and official weights unchanged)
        self.register_buffer("t", t.float(), persistent=False)
        self.register_buffer("gauss", gauss.float(), persistent=False)
        self.register_buffer("weights", (trapezoid * gauss).float(), persistent=False)

    def directions(self, dim: int, seed: int, device: torch.device) -> torch.Tensor:
        """``[dim, slices]`` unit columns, Gaussian draws from ``seed`` on ``device``."""
        generator = torch.Generator(device=device).manual_seed(seed)
        a = torch.randn(dim, self.slices, generator=generator, device=device)
        return a / a.norm(dim=0, keepdim=True)

    def forward(self, x: torch.Tensor, seed: int, group=None) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"SIGReg takes embeddings [N, D], got shape {tuple(x.shape)}")
        proj = x.float() @ self.directions(x.shape[1], seed, x.device)  # fp32: cos/sin of bf16 arguments are coarse
        xt = proj.unsqueeze(-1) * self.t  # [N, slices, points]
        count = torch.full((1,), x.shape[0], dtype=torch.float32, device=x.device)
        sums = all_reduce_sum(torch.cat([xt.cos().sum(0).flatten(), xt.sin().sum(0).flatten(), count]), group)
        n = sums[-1]
        cos_mean, sin_mean = (sums[:-1] / n).view(2, self.slices, -1)
        err = (cos_mean - self.gauss).square() + sin_mean.square()
        return (err @ self.weights * n).mean()

    def extra_repr(self) -> str:
        return f"slices={self.slices}, points={self.t.numel()}, t_max={self.t[-1].item():g}"
