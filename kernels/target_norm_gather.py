"""Targets of I-JEPA: parameter-free LayerNorm of the target encoder's output, gathered at each target block.

The official code normalises all N tokens, gathers with ``apply_masks`` and copies the result once per context
block (``repeat_interleave_batch``); only the gathered tokens are ever used. The fused op normalises only the
gathered rows and writes each one straight to its nenc places in the predictor's output order. The fused loss
``target_norm_smooth_l1`` goes further: the targets never reach memory, the forward writes one partial sum per
program and the backward recomputes them to write the predictions' gradient.
"""

import torch
import torch.nn.functional as F

from fastjepa.kernels._utils import (
    cdiv,
    get_backend,
    interpreting,
    mask_index,
    op_or_launcher,
    repeat_interleave_batch,
    row_blocks,
    tl,
    triton,
    use_triton,
)
from fastjepa.kernels.masked_gather import _gather_ref


def _check(h: torch.Tensor, masks_pred, num_context_blocks: int, op: str, norm=None) -> torch.Tensor:
    """The ``[M, B, K]`` target index, after checking h, the masks, nenc and the final norm (both paths)."""
    if h.dim() != 3:
        raise ValueError(f"{op}: h must be the [B, N, D] target-encoder output, got shape {tuple(h.shape)}")
    if norm is not None and (len(norm) != 3 or any(p.shape != (h.shape[2],) for p in norm[:2])):
        raise ValueError(f"{op}: norm must be (weight, bias, eps) of the encoder's final LayerNorm, weight and bias "
                         f"of shape [{h.shape[2]}] (the width of h)")
    if num_context_blocks < 1:
        raise ValueError(f"{op}: num_context_blocks={num_context_blocks!r}; pass the number of context blocks "
                         "(>= 1, len(masks_enc))")
    return mask_index(masks_pred, h.shape[0], h.shape[1], op, "masks_pred")


def _check_pred(pred: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, num_context_blocks: int, op: str) -> None:
    expected = (idx.shape[0] * num_context_blocks * idx.shape[1], idx.shape[2], h.shape[2])
    if tuple(pred.shape) != expected:
        raise ValueError(f"{op}: pred has shape {tuple(pred.shape)}; expected [M*nenc*B, K, D] = {expected} for "
                         f"{idx.shape[0]} target masks, nenc={num_context_blocks} and h of shape {tuple(h.shape)}")


def _targets_ref(h: torch.Tensor, idx: torch.Tensor, num_context_blocks: int, eps: float, norm=None) -> torch.Tensor:
    if norm is not None:  # the encoder's final LayerNorm, over every token as the official forward runs it
        h = F.layer_norm(h, (h.shape[-1],), *norm)
    h = F.layer_norm(h, (h.shape[-1],), eps=eps)
    return repeat_interleave_batch(_gather_ref(h, idx, None), h.shape[0], num_context_blocks)


def target_norm_gather_ref(h: torch.Tensor, masks_pred, num_context_blocks: int = 1, eps: float = 1e-5, norm=None):
    """Reference: ``[B, N, D]`` target-encoder output -> ``[M*nenc*B, K, D]`` normalised targets."""
    idx = _check(h, masks_pred, num_context_blocks, "target_norm_gather", norm)
    return _targets_ref(h, idx, num_context_blocks, eps, norm)


def target_norm_smooth_l1_ref(pred, h, masks_pred, num_context_blocks: int = 1, eps: float = 1e-5, norm=None):
    """Reference: the official loss, ``smooth_l1_loss(pred, targets)`` (beta 1, mean), targets from ``h``."""
    idx = _check(h, masks_pred, num_context_blocks, "target_norm_smooth_l1", norm)
    _check_pred(pred, h, idx, num_context_blocks, "target_norm_smooth_l1")
    return F.smooth_l1_loss(pred, _targets_ref(h, idx, num_context_blocks, eps, norm))


@triton.jit
def _gathered_layer_norm(h, idx, w, b, i_r, B, N, K, D, eps, norm_eps, HAS_NORM: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """The normalised rows ``h[b, idx[i_r, k]]`` of one tile (fp32), with the tile's offsets and mask; with
    HAS_NORM the encoder's final LayerNorm (weight w, bias b) first, on the gathered rows only."""
    i_b = i_r % B
    o_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    o_d = tl.arange(0, BLOCK_D)
    m_d = (o_d < D)[None, :]
    m = (o_k < K)[:, None] & m_d
    b_idx = tl.load(idx + i_r.to(tl.int64) * K + o_k, mask=o_k < K, other=0).to(tl.int64)
    b_h = tl.load(h + (i_b.to(tl.int64) * N + b_idx[:, None]) * D + o_d[None, :], mask=m, other=0).to(tl.float32)
    if HAS_NORM:
        b_mean = tl.sum(b_h, axis=1) / D
        b_c = tl.where(m_d, b_h - b_mean[:, None], 0.0)
        b_rstd = 1.0 / tl.sqrt(tl.sum(b_c * b_c, axis=1) / D + norm_eps)
        b_w = tl.load(w + o_d, mask=o_d < D, other=0).to(tl.float32)
        b_b = tl.load(b + o_d, mask=o_d < D, other=0).to(tl.float32)
        b_h = tl.where(m_d, b_c * b_rstd[:, None] * b_w[None, :] + b_b[None, :], 0.0)
    b_mean = tl.sum(b_h, axis=1) / D
    b_c = tl.where(m_d, b_h - b_mean[:, None], 0.0)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_c * b_c, axis=1) / D + eps)
    return b_c * b_rstd[:, None], o_k, o_d, m


@triton.jit
def _target_norm_gather_fwd_kernel(h, idx, w, b, out, B, N, K, D, NENC, eps, norm_eps, HAS_NORM: tl.constexpr,
                                   BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    i_r = tl.program_id(1)  # m * B + b
    b_y, o_k, o_d, m = _gathered_layer_norm(h, idx, w, b, i_r, B, N, K, D, eps, norm_eps, HAS_NORM, BLOCK_K, BLOCK_D)
    b_y = b_y.to(out.dtype.element_ty)
    i_m, i_b = i_r // B, i_r % B
    for i_j in range(NENC):
        i_o = ((i_m * NENC + i_j) * B + i_b).to(tl.int64)
        tl.store(out + (i_o * K + o_k[:, None]) * D + o_d[None, :], b_y, mask=m)


@triton.jit
def _target_norm_smooth_l1_kernel(pred, h, idx, w, b, partial, dpred, dloss, B, N, K, D, NENC, eps, norm_eps, scale,
                                  HAS_NORM: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_K: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
    # Forward: one fp32 partial sum of the elementwise loss per program (summed on the host side in fixed
    # order, so the loss is deterministic). Backward: d loss / d pred = clamp(pred - target, -1, 1) * scale * dloss.
    i_r = tl.program_id(1)
    b_y, o_k, o_d, m = _gathered_layer_norm(h, idx, w, b, i_r, B, N, K, D, eps, norm_eps, HAS_NORM, BLOCK_K, BLOCK_D)
    i_m, i_b = i_r // B, i_r % B
    if BACKWARD:
        b_g = tl.load(dloss).to(tl.float32) * scale
    else:
        b_acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for i_j in range(NENC):
        i_o = ((i_m * NENC + i_j) * B + i_b).to(tl.int64)
        o_p = (i_o * K + o_k[:, None]) * D + o_d[None, :]
        b_d = tl.load(pred + o_p, mask=m, other=0).to(tl.float32) - b_y
        if BACKWARD:
            b_dp = tl.minimum(tl.maximum(b_d, -1.0), 1.0) * b_g
            tl.store(dpred + o_p, b_dp.to(dpred.dtype.element_ty), mask=m)
        else:
            b_ad = tl.abs(b_d)
            b_acc += tl.where(m, tl.where(b_ad < 1.0, 0.5 * b_d * b_d, b_ad - 0.5), 0.0)
    if not BACKWARD:
        tl.store(partial + i_r * tl.num_programs(0) + tl.program_id(0), tl.sum(tl.sum(b_acc, axis=1), axis=0))


# sm_90 compile check of every kernel (tests/kernels/test_compile.py), ViT-H-like block sizes.
_SMOOTH_L1_SIGNATURE = {"pred": "*bf16", "h": "*bf16", "idx": "*i64", "w": "*fp32", "b": "*fp32", "partial": "*fp32",
                        "dpred": "*bf16", "dloss": "*bf16", "B": "i32", "N": "i32", "K": "i32", "D": "i32",
                        "NENC": "i32", "eps": "fp32", "norm_eps": "fp32", "scale": "fp32"}
COMPILE_SPECS = {
    "target_norm_gather_fwd": (
        _target_norm_gather_fwd_kernel,
        {"h": "*bf16", "idx": "*i64", "w": "*fp32", "b": "*fp32", "out": "*bf16", "B": "i32", "N": "i32", "K": "i32",
         "D": "i32", "NENC": "i32", "eps": "fp32", "norm_eps": "fp32"},
        {"HAS_NORM": True, "BLOCK_K": 4, "BLOCK_D": 2048}),
    "target_norm_smooth_l1_fwd": (_target_norm_smooth_l1_kernel, _SMOOTH_L1_SIGNATURE,
                                  {"HAS_NORM": True, "BACKWARD": False, "BLOCK_K": 4, "BLOCK_D": 2048}),
    "target_norm_smooth_l1_bwd": (_target_norm_smooth_l1_kernel, _SMOOTH_L1_SIGNATURE,
                                  {"HAS_NORM": False, "BACKWARD": True, "BLOCK_K": 4, "BLOCK_D": 2048}),
}


def target_norm_gather_fwd(h, idx, num_context_blocks: int = 1, eps: float = 1e-5, dtype=None, norm_weight=None,
                           norm_bias=None, norm_eps: float = 0.0, out=None):
    """``[B, N, D]`` h, checked ``[M, B, K]`` indices -> ``[M*nenc*B, K, D]`` normalised targets in ``dtype``
    (h's by default); with ``norm_weight`` the encoder's final LayerNorm first (bias ``norm_bias``, ``norm_eps``)."""
    h = h.contiguous()
    batch, num_tokens, dim = h.shape
    num_masks, _, k = idx.shape
    if out is None:
        out = torch.empty(num_masks * num_context_blocks * batch, k, dim, dtype=dtype or h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    block_k, block_d = row_blocks(k, dim)
    has_norm = norm_weight is not None
    _target_norm_gather_fwd_kernel[(cdiv(k, block_k), num_masks * batch)](
        h, idx, norm_weight if has_norm else h, norm_bias if has_norm else h, out, batch, num_tokens, k, dim,
        num_context_blocks, eps, norm_eps, HAS_NORM=has_norm, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )
    return out


def _smooth_l1_launch(pred, h, idx, num_context_blocks, eps, norm, dloss=None, dpred=None):
    batch, num_tokens, dim = h.shape
    num_masks, _, k = idx.shape
    block_k, block_d = row_blocks(k, dim)
    grid = (cdiv(k, block_k), num_masks * batch)
    partial = torch.empty(grid[1], grid[0], dtype=torch.float32, device=h.device)
    weight, bias, norm_eps = norm
    _target_norm_smooth_l1_kernel[grid](
        pred, h, idx, h if weight is None else weight, h if bias is None else bias, partial,
        pred if dpred is None else dpred, partial if dloss is None else dloss, batch, num_tokens, k, dim,
        num_context_blocks, eps, norm_eps, 1.0 / pred.numel(), HAS_NORM=weight is not None,
        BACKWARD=dpred is not None, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )
    return partial


def target_norm_smooth_l1_partial(pred, h, idx, num_context_blocks: int, eps: float, norm_weight=None,
                                  norm_bias=None, norm_eps: float = 0.0) -> torch.Tensor:
    """``[M*B, tiles]`` fp32 partial sums of the elementwise smooth-L1 loss."""
    return _smooth_l1_launch(pred, h, idx, num_context_blocks, eps, (norm_weight, norm_bias, norm_eps))


def target_norm_smooth_l1_grad(pred, h, idx, dloss, num_context_blocks: int, eps: float, norm_weight=None,
                               norm_bias=None, norm_eps: float = 0.0) -> torch.Tensor:
    """d loss / d pred for the mean-reduced loss scaled by ``dloss`` (a 0-dim tensor: no host sync)."""
    dpred = torch.empty_like(pred)
    _smooth_l1_launch(pred, h, idx, num_context_blocks, eps, (norm_weight, norm_bias, norm_eps),
                      dloss=dloss.contiguous(), dpred=dpred)
    return dpred


@torch.library.custom_op("fastjepa::target_norm_gather", mutates_args=())
def _target_norm_gather_op(h: torch.Tensor, idx: torch.Tensor, num_context_blocks: int, eps: float,
                           dtype: torch.dtype, norm_weight: torch.Tensor | None = None,
                           norm_bias: torch.Tensor | None = None, norm_eps: float = 0.0) -> torch.Tensor:
    return target_norm_gather_fwd(h, idx, num_context_blocks, eps, dtype, norm_weight, norm_bias, norm_eps)


@_target_norm_gather_op.register_fake
def _(h, idx, num_context_blocks, eps, dtype, norm_weight=None, norm_bias=None, norm_eps=0.0):
    return h.new_empty((idx.shape[0] * num_context_blocks * idx.shape[1], idx.shape[2], h.shape[2]), dtype=dtype)


@torch.library.custom_op("fastjepa::target_norm_smooth_l1_partial", mutates_args=())
def _partial_op(pred: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, num_context_blocks: int, eps: float,
                norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
                norm_eps: float = 0.0) -> torch.Tensor:
    return target_norm_smooth_l1_partial(pred, h, idx, num_context_blocks, eps, norm_weight, norm_bias, norm_eps)


@_partial_op.register_fake
def _(pred, h, idx, num_context_blocks, eps, norm_weight=None, norm_bias=None, norm_eps=0.0):
    block_k, _ = row_blocks(idx.shape[2], h.shape[2])
    return h.new_empty((idx.shape[0] * idx.shape[1], cdiv(idx.shape[2], block_k)), dtype=torch.float32)


@torch.library.custom_op("fastjepa::target_norm_smooth_l1_grad", mutates_args=())
def _grad_op(pred: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, dloss: torch.Tensor, num_context_blocks: int,
             eps: float, norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
             norm_eps: float = 0.0) -> torch.Tensor:
    return target_norm_smooth_l1_grad(pred, h, idx, dloss, num_context_blocks, eps, norm_weight, norm_bias, norm_eps)


@_grad_op.register_fake
def _(pred, h, idx, dloss, num_context_blocks, eps, norm_weight=None, norm_bias=None, norm_eps=0.0):
    return torch.empty_like(pred)


class TargetNormSmoothL1Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, h, idx, num_context_blocks, eps, loss_dtype, norm_weight, norm_bias, norm_eps):
        pred, h = pred.contiguous(), h.contiguous()
        ctx.save_for_backward(pred, h, idx, norm_weight, norm_bias)
        ctx.num_context_blocks, ctx.eps, ctx.norm_eps = num_context_blocks, eps, norm_eps
        partial = op_or_launcher(_partial_op, target_norm_smooth_l1_partial)(pred, h, idx, num_context_blocks, eps,
                                                                             norm_weight, norm_bias, norm_eps)
        return (partial.sum() / pred.numel()).to(loss_dtype)

    @staticmethod
    def backward(ctx, dloss):
        pred, h, idx, weight, bias = ctx.saved_tensors
        grad = op_or_launcher(_grad_op, target_norm_smooth_l1_grad)
        dpred = grad(pred, h, idx, dloss, ctx.num_context_blocks, ctx.eps, weight, bias, ctx.norm_eps)
        return (dpred,) + (None,) * 8


def _measured_path(h: torch.Tensor, norm):
    """(h, norm) for the fused ops: under ``auto`` on a GPU the final norm runs as its own op first and the kernel
    measured without it (``MEASURED_WINNERS``) runs as measured; the kernel with the norm inside is not measured on a
    GPU yet and runs under the ``triton`` backend and the interpreter."""
    if norm is None or interpreting() or get_backend() == "triton" or not h.is_cuda:
        return h, norm
    return F.layer_norm(h, (h.shape[-1],), *norm), None


def target_norm_gather(h: torch.Tensor, masks_pred, num_context_blocks: int = 1, eps: float = 1e-5,
                       norm: tuple[torch.Tensor, torch.Tensor, float] | None = None):
    """Normalised (no affine) target features at every target block, in the order of the predictor's outputs.

    Args:
        h: ``[B, N, D]`` target-encoder output (after its final norm, or before it with ``norm``); no gradient
            flows to it on the fused path (with grad enabled and ``h.requires_grad`` the reference runs, so
            autograd stays exact).
        masks_pred: the M target blocks: ``[M, B, K]`` int64 indices.
        num_context_blocks: nenc; each target block's rows are repeated that many times, as the official code does.
        norm: ``(weight, bias, eps)`` of the encoder's final LayerNorm, applied first: fused, only the gathered rows
            are normalised twice (the official forward normalises all N tokens and then discards most).
    Returns:
        ``[M*nenc*B, K, D]`` in ``h``'s dtype (statistics in fp32); fp32 under CUDA autocast, as the reference.
    """
    idx = _check(h, masks_pred, num_context_blocks, "target_norm_gather", norm)
    grad = torch.is_grad_enabled() and h.requires_grad
    if not use_triton(h, idx, op="target_norm_gather", size=h.numel()) or grad:
        return _targets_ref(h, idx, num_context_blocks, eps, norm)
    # CUDA autocast runs F.layer_norm in fp32, so the reference's targets are fp32 there: keep that dtype.
    dtype = torch.float32 if h.is_cuda and torch.is_autocast_enabled("cuda") else h.dtype
    h, norm = _measured_path(h, norm)
    return op_or_launcher(_target_norm_gather_op, target_norm_gather_fwd)(h, idx, num_context_blocks, eps, dtype,
                                                                          *(norm or (None, None, 0.0)))


def target_norm_smooth_l1(pred: torch.Tensor, h: torch.Tensor, masks_pred, num_context_blocks: int = 1,
                          eps: float = 1e-5, norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
                          ) -> torch.Tensor:
    """The I-JEPA loss without materialising the targets: ``F.smooth_l1_loss(pred, target_norm_gather(h, ...))``.

    Args:
        pred: ``[M*nenc*B, K, D]`` predictor outputs; h: ``[B, N, D]`` target-encoder output (treated as constant);
        masks_pred: the M target blocks ``[M, B, K]``; num_context_blocks: nenc; norm: the
        encoder's final LayerNorm to apply first, as in ``target_norm_gather``.
    Returns:
        The mean smooth-L1 loss (beta 1), accumulated in fp32, in the promoted dtype of pred and h (fp32 under
        autocast, as the reference); NaN for K = 0, as the reference's mean over nothing.
    Backward writes the gradient w.r.t. ``pred`` only, recomputing the targets from ``h``.
    """
    idx = _check(h, masks_pred, num_context_blocks, "target_norm_smooth_l1", norm)
    _check_pred(pred, h, idx, num_context_blocks, "target_norm_smooth_l1")
    if not use_triton(pred, h, idx, op="target_norm_smooth_l1", size=h.numel()) or pred.numel() == 0:
        with torch.no_grad():
            targets = _targets_ref(h, idx, num_context_blocks, eps, norm)
        return F.smooth_l1_loss(pred, targets)
    # Autocast (CPU and CUDA) runs smooth_l1_loss in fp32: the reference's loss is fp32 there.
    autocast = torch.is_autocast_enabled(pred.device.type)
    loss_dtype = torch.float32 if autocast else torch.promote_types(pred.dtype, h.dtype)
    h, norm = _measured_path(h.detach(), norm)
    weight, bias, norm_eps = norm or (None, None, 0.0)
    return TargetNormSmoothL1Function.apply(pred, h.detach(), idx, num_context_blocks, eps, loss_dtype,
                                            None if weight is None else weight.detach(),
                                            None if bias is None else bias.detach(), norm_eps)
