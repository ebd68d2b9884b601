"""The EMA of the target encoder's Linear weights writing their e4m3 copy and per-output-channel scales in the same
pass, for the FP8 target forward (``fastjepa.fp8: target``): the forward then reads 1 byte per weight and
quantises no weight itself.

One program per output row: the row's new fp32 target (``m * t + (1 - m) * o``), its bf16 copy when asked, its
absolute maximum and the row scale ``amax / 448``, then the row in e4m3: exactly ``quantize_rowwise`` (the FP8
forward's quantisation, defined here) of the new target. The row stays in registers between the EMA and the
quantisation, so the weights are read once. Rows up to 16K elements (ViT-g's fc2 has 6144).

No GPU timing has chosen the kernel yet: ``auto`` runs the reference (the EMA, then the quantisation, once per step)
on CUDA tensors, the kernel under the Triton interpreter or the ``triton`` backend. The interpreter casts to e4m3
wrongly at binade boundaries (31.9 -> 16), so CPU tests check the scales and the fp32 rows exactly and the e4m3
values through the scale; the GPU test checks them bit for bit.
"""

import torch

from fastjepa.kernels._utils import get_backend, interpreting, next_power_of_2, tl, triton, use_triton

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


@torch.no_grad()
def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, C]`` -> (e4m3 ``[R, C]``, fp32 ``[R, 1]`` scales) with ``w ~= q * scale`` row by row."""
    scale = w.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


@torch.no_grad()
def ema_update_fp8_ref(target, online, momentum: float, weight_e4m3, scale, copy=None) -> None:
    """Reference: the official EMA of each weight, its copy, then its row-wise quantisation into the buffers."""
    for i, (t, o) in enumerate(zip(target, online, strict=True)):
        t.mul_(momentum).add_((1.0 - momentum) * o.detach())
        if copy is not None:
            copy[i].copy_(t)
        q, s = quantize_rowwise(t)
        weight_e4m3[i].copy_(q)
        scale[i].copy_(s)


@triton.jit
def _ema_fp8_kernel(t, o, c, q, s, momentum, weight, D, HAS_COPY: tl.constexpr, BLOCK_D: tl.constexpr):
    # D: the row length (a weight's input features)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    off = row * D + cols
    b_t = momentum * tl.load(t + off, mask=m, other=0).to(tl.float32) + weight * tl.load(o + off, mask=m,
                                                                                             other=0).to(tl.float32)
    tl.store(t + off, b_t.to(t.dtype.element_ty), mask=m)
    if HAS_COPY:
        tl.store(c + off, b_t.to(c.dtype.element_ty), mask=m)
    b_t = b_t.to(t.dtype.element_ty).to(tl.float32)  # quantise the target as stored, as the reference does
    b_scale = tl.maximum(tl.max(tl.abs(b_t), axis=0), 1e-12) / 448.0
    b_q = tl.minimum(tl.maximum(tl.math.div_rn(b_t, b_scale), -448.0), 448.0)
    tl.store(q + off, b_q.to(q.dtype.element_ty), mask=m)
    tl.store(s + row, b_scale)


# sm_90 compile check (tests/kernels/test_compile.py): fp32 target and online, bf16 copy, ViT-H's fc2 row.
COMPILE_SPECS = {
    "ema_update_fp8": (
        _ema_fp8_kernel,
        {"t": "*fp32", "o": "*fp32", "c": "*bf16", "q": "*fp8e4nv", "s": "*fp32", "momentum": "fp32",
         "weight": "fp32", "D": "i32"},
        {"HAS_COPY": True, "BLOCK_D": 8192}),
}


def _check(target, online, weight_e4m3, scale, copy) -> None:
    lists = {"online": online, "weight_e4m3": weight_e4m3, "scale": scale, **({} if copy is None else {"copy": copy})}
    for name, other in lists.items():
        if len(other) != len(target):
            raise ValueError(f"ema_update_fp8: {len(target)} target weights but {len(other)} {name} tensors")
    for i, t in enumerate(target):
        rows = t.shape[0] if t.dim() == 2 else -1
        ok = (t.dim() == 2 and online[i].shape == t.shape and weight_e4m3[i].shape == t.shape
              and weight_e4m3[i].dtype == E4M3 and scale[i].shape == (rows, 1) and scale[i].dtype == torch.float32
              and (copy is None or copy[i].shape == t.shape))
        if not ok:
            raise ValueError(f"ema_update_fp8: weight {i} has target {tuple(t.shape)}, online {tuple(online[i].shape)}"
                             f", e4m3 {tuple(weight_e4m3[i].shape)} {weight_e4m3[i].dtype}, scale "
                             f"{tuple(scale[i].shape)} {scale[i].dtype}; each must be a [R, C] weight with an e4m3 "
                             "[R, C] copy and fp32 [R, 1] scales")


@torch.no_grad()
def ema_update_fp8(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float,
                   weight_e4m3: list[torch.Tensor], scale: list[torch.Tensor],
                   copy: list[torch.Tensor] | None = None) -> None:
    """``target <- momentum * target + (1 - momentum) * online`` for ``[R, C]`` weights, writing each new weight's
    e4m3 rows into ``weight_e4m3`` and their fp32 scales (``[R, 1]``) into ``scale`` (and ``copy``, e.g. bf16)."""
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"ema_update_fp8: momentum {momentum} is not in [0, 1]")
    _check(target, online, weight_e4m3, scale, copy)
    kernel = target and use_triton(target[0]) and (get_backend() == "triton" or interpreting())
    if not kernel or any(not t.is_contiguous() or t.shape[1] > 16384 for t in target):
        ema_update_fp8_ref(target, online, momentum, weight_e4m3, scale, copy)
        return
    for i, (t, o) in enumerate(zip(target, online, strict=True)):
        c = None if copy is None else copy[i]
        _ema_fp8_kernel[(t.shape[0],)](t, o.detach().contiguous(), t if c is None else c, weight_e4m3[i], scale[i],
                                       float(momentum), 1.0 - float(momentum), t.shape[1], HAS_COPY=c is not None,
                                       BLOCK_D=next_power_of_2(t.shape[1]), num_warps=8)
