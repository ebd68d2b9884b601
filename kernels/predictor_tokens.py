"""The predictor's input sequence: embedded context (+ its positional embedding), repeated once per target block,
followed by the mask token + positional embedding at every target index of that block.

The official predictor builds it from five tensors (pos gather, add, repeat, mask-token expand + add, cat); the
fused op reads each context row once, writes it to its M places, and writes every target slot from the mask
token and the positional embedding directly. Its backward sums the context gradient over the M repeats and
reduces the mask token's gradient in fp32 partial sums.
"""

import torch

from fastjepa.kernels._utils import (
    cdiv,
    mask_index,
    op_or_launcher,
    repeat_interleave_batch,
    row_blocks,
    tl,
    triton,
    use_triton,
)
from fastjepa.kernels.masked_gather import _gather_ref

OP = "predictor_tokens"


def _check(x, masks_enc, masks_pred, mask_token, pos_embed) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[nenc, B, Kc]`` and ``[M, B, Kt]`` indices, after checking every input against the others."""
    if x.dim() != 3:
        raise ValueError(f"{OP}: x must be the [nenc*B, Kc, D] context, got shape {tuple(x.shape)}")
    dim = x.shape[-1]
    if mask_token.numel() != dim or pos_embed.dim() not in (2, 3) or pos_embed.shape[-1] != dim or (
            pos_embed.dim() == 3 and pos_embed.shape[0] != 1):
        raise ValueError(f"{OP}: mask_token {tuple(mask_token.shape)} must hold D={dim} values and pos_embed "
                         f"{tuple(pos_embed.shape)} must be [N, D] or [1, N, D] with D={dim}")
    num_tokens = pos_embed.shape[-2]
    batch = masks_enc.shape[1] if isinstance(masks_enc, torch.Tensor) and masks_enc.dim() == 3 else -1
    enc = mask_index(masks_enc, batch, num_tokens, OP, "masks_enc")
    if tuple(x.shape[:2]) != (enc.shape[0] * batch, enc.shape[2]):
        raise ValueError(f"{OP}: x has shape {tuple(x.shape)}; expected [nenc*B, Kc, D] = "
                         f"[{enc.shape[0] * batch}, {enc.shape[2]}, {dim}] from masks_enc {tuple(enc.shape)}")
    return enc, mask_index(masks_pred, batch, num_tokens, OP, "masks_pred")


def _tokens_ref(x, idx_enc, idx_pred, mask_token, pos_embed) -> torch.Tensor:
    nenc, batch, _ = idx_enc.shape
    dim = x.shape[-1]
    pos = pos_embed.reshape(1, -1, dim).expand(batch, -1, -1)
    ctx = (x + _gather_ref(pos, idx_enc, None)).to(x.dtype)
    tgt = mask_token.reshape(1, 1, dim) + repeat_interleave_batch(_gather_ref(pos, idx_pred, None), batch, nenc)
    return torch.cat([ctx.repeat(idx_pred.shape[0], 1, 1), tgt.to(x.dtype)], dim=1)


def predictor_tokens_ref(
    x: torch.Tensor, masks_enc, masks_pred, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """Reference, following the official predictor step by step."""
    return _tokens_ref(x, *_check(x, masks_enc, masks_pred, mask_token, pos_embed), mask_token, pos_embed)


@triton.jit
def _predictor_tokens_fwd_kernel(x, idx_enc, idx_pred, mask_token, pos, out, B, NENC, M, KC, KT, D,
                                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # Rows 0 .. NENC*B-1 of the grid are context rows q = j*B + b, the rest target rows r = m*B + b.
    i_k, i_q = tl.program_id(0), tl.program_id(1)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    o_d = tl.arange(0, BLOCK_D)
    m_d = (o_d < D)[None, :]
    L = KC + KT
    if i_q < NENC * B:
        m = (o_k < KC)[:, None] & m_d
        b_idx = tl.load(idx_enc + i_q.to(tl.int64) * KC + o_k, mask=o_k < KC, other=0).to(tl.int64)
        b_v = tl.load(x + (i_q.to(tl.int64) * KC + o_k[:, None]) * D + o_d[None, :], mask=m, other=0).to(tl.float32)
        b_v += tl.load(pos + b_idx[:, None] * D + o_d[None, :], mask=m, other=0).to(tl.float32)
        b_v = b_v.to(out.dtype.element_ty)
        for i_m in range(M):
            i_o = (i_m * NENC * B + i_q).to(tl.int64)
            tl.store(out + (i_o * L + o_k[:, None]) * D + o_d[None, :], b_v, mask=m)
    else:
        i_r = i_q - NENC * B
        i_m, i_b = i_r // B, i_r % B
        m = (o_k < KT)[:, None] & m_d
        b_idx = tl.load(idx_pred + i_r.to(tl.int64) * KT + o_k, mask=o_k < KT, other=0).to(tl.int64)
        b_v = tl.load(pos + b_idx[:, None] * D + o_d[None, :], mask=m, other=0).to(tl.float32)
        b_v += tl.load(mask_token + o_d, mask=o_d < D, other=0).to(tl.float32)[None, :]
        b_v = b_v.to(out.dtype.element_ty)
        for i_j in range(NENC):
            i_o = ((i_m * NENC + i_j) * B + i_b).to(tl.int64)
            tl.store(out + (i_o * L + KC + o_k[:, None]) * D + o_d[None, :], b_v, mask=m)


@triton.jit
def _predictor_tokens_bwd_kernel(dy, dx, partial, B, NENC, M, KC, KT, D, NUM_KC_TILES,
                                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (tile, q = j*B + b): the first NUM_KC_TILES tiles sum the context gradient over the M repeats into
    # dx[q]; the others sum the target slots of the M rows of q into one fp32 partial of the mask token's gradient.
    i_k, i_q = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, BLOCK_D)
    m_d = (o_d < D)[None, :]
    L = KC + KT
    is_ctx = i_k < NUM_KC_TILES
    o_k = tl.where(is_ctx, i_k, i_k - NUM_KC_TILES) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < tl.where(is_ctx, KC, KT)
    base = tl.where(is_ctx, 0, KC)
    m = m_k[:, None] & m_d
    b_acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for i_m in range(M):
        i_o = (i_m * NENC * B + i_q).to(tl.int64)
        b_acc += tl.load(dy + (i_o * L + base + o_k[:, None]) * D + o_d[None, :], mask=m, other=0).to(tl.float32)
    if is_ctx:
        tl.store(dx + (i_q.to(tl.int64) * KC + o_k[:, None]) * D + o_d[None, :], b_acc.to(dx.dtype.element_ty), mask=m)
    else:
        i_p = i_q.to(tl.int64) * (tl.num_programs(0) - NUM_KC_TILES) + i_k - NUM_KC_TILES
        tl.store(partial + i_p * D + o_d, tl.sum(b_acc, axis=0), mask=o_d < D)


# sm_90 compile check of every kernel (tests/kernels/test_compile.py), ViT-H predictor-like block sizes.
COMPILE_SPECS = {
    "predictor_tokens_fwd": (
        _predictor_tokens_fwd_kernel,
        {"x": "*bf16", "idx_enc": "*i64", "idx_pred": "*i64", "mask_token": "*fp32", "pos": "*fp32", "out": "*fp32",
         "B": "i32", "NENC": "i32", "M": "i32", "KC": "i32", "KT": "i32", "D": "i32"},
        {"BLOCK_K": 16, "BLOCK_D": 512}),
    "predictor_tokens_bwd": (
        _predictor_tokens_bwd_kernel,
        {"dy": "*fp32", "dx": "*bf16", "partial": "*fp32", "B": "i32", "NENC": "i32", "M": "i32", "KC": "i32",
         "KT": "i32", "D": "i32", "NUM_KC_TILES": "i32"},
        {"BLOCK_K": 16, "BLOCK_D": 512}),
}


def predictor_tokens_fwd(x, idx_enc, idx_pred, mask_token, pos_embed, out=None) -> torch.Tensor:
    """``[nenc*B, Kc, D]`` x, checked ``[nenc, B, Kc]`` / ``[M, B, Kt]`` indices -> ``[M*nenc*B, Kc+Kt, D]``."""
    nenc, batch, kc = idx_enc.shape
    num_pred, _, kt = idx_pred.shape
    rows_enc, rows_pred, dim = nenc * batch, num_pred * batch, x.shape[-1]
    x, mask_token, pos_embed = x.contiguous(), mask_token.contiguous(), pos_embed.contiguous()
    if out is None:
        out = torch.empty(num_pred * rows_enc, kc + kt, dim, dtype=x.dtype, device=x.device)
    block_k, block_d = row_blocks(max(kc, kt), dim)
    _predictor_tokens_fwd_kernel[(cdiv(max(kc, kt), block_k), rows_enc + rows_pred)](
        x, idx_enc, idx_pred, mask_token, pos_embed, out, batch, nenc, num_pred, kc, kt, dim,
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )
    return out


def predictor_tokens_bwd(grad_out, batch: int, nenc: int, kc: int, x_dtype, dx=None):
    """``[M*nenc*B, Kc+Kt, D]`` gradient -> (``[nenc*B, Kc, D]`` context gradient, ``[D]`` fp32 mask-token
    gradient)."""
    grad_out = grad_out.contiguous()
    rows, length, dim = grad_out.shape
    kt = length - kc
    rows_enc = nenc * batch
    if dx is None:
        dx = torch.empty(rows_enc, kc, dim, dtype=x_dtype, device=grad_out.device)
    block_k, block_d = row_blocks(max(kc, kt), dim)
    num_kc, num_kt = cdiv(kc, block_k), cdiv(kt, block_k)
    partial = torch.empty(rows_enc, num_kt, dim, dtype=torch.float32, device=grad_out.device)
    _predictor_tokens_bwd_kernel[(num_kc + num_kt, rows_enc)](
        grad_out, dx, partial, batch, nenc, rows // rows_enc, kc, kt, dim, num_kc,
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )
    return dx, partial.sum((0, 1))


@torch.library.custom_op("fastjepa::predictor_tokens_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, idx_enc: torch.Tensor, idx_pred: torch.Tensor, mask_token: torch.Tensor,
            pos_embed: torch.Tensor) -> torch.Tensor:
    return predictor_tokens_fwd(x, idx_enc, idx_pred, mask_token, pos_embed)


@_fwd_op.register_fake
def _(x, idx_enc, idx_pred, mask_token, pos_embed):
    rows = idx_pred.shape[0] * idx_enc.shape[0] * idx_enc.shape[1]
    return x.new_empty((rows, idx_enc.shape[2] + idx_pred.shape[2], x.shape[-1]))


@torch.library.custom_op("fastjepa::predictor_tokens_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, batch: int, nenc: int, kc: int,
            x_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return predictor_tokens_bwd(grad_out, batch, nenc, kc, x_dtype)


@_bwd_op.register_fake
def _(grad_out, batch, nenc, kc, x_dtype):
    dim = grad_out.shape[-1]
    return grad_out.new_empty((nenc * batch, kc, dim), dtype=x_dtype), grad_out.new_empty((dim,), dtype=torch.float32)


class PredictorTokensFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx_enc, idx_pred, mask_token, pos_embed):
        ctx.kc = x.shape[1]
        ctx.meta = (x.dtype, mask_token.shape, mask_token.dtype, pos_embed.shape, pos_embed.dtype)
        ctx.save_for_backward(idx_enc, idx_pred)
        return op_or_launcher(_fwd_op, predictor_tokens_fwd)(x, idx_enc, idx_pred, mask_token, pos_embed)

    @staticmethod
    def backward(ctx, grad_out):
        idx_enc, idx_pred = ctx.saved_tensors
        x_dtype, mt_shape, mt_dtype, pos_shape, pos_dtype = ctx.meta
        nenc, batch, kc = idx_enc.shape
        need_x, _, _, need_mt, need_pos = ctx.needs_input_grad
        bwd = op_or_launcher(_bwd_op, predictor_tokens_bwd)
        dx, dmt = bwd(grad_out, batch, nenc, kc, torch.float32 if need_pos else x_dtype)
        dpos = None
        if need_pos:
            # Rare (I-JEPA's predictor embedding is fixed): scatter-add both halves with plain index_add_.
            dim = grad_out.shape[-1]
            dpos = torch.zeros(pos_shape.numel() // dim, dim, dtype=torch.float32, device=grad_out.device)
            dpos.index_add_(0, idx_enc.reshape(-1).long(), dx.reshape(-1, dim))
            dtgt = grad_out[:, kc:].float().reshape(-1, nenc, batch, grad_out.shape[1] - kc, dim).sum(1)
            dpos.index_add_(0, idx_pred.reshape(-1).long(), dtgt.reshape(-1, dim))
            dpos = dpos.to(pos_dtype).reshape(pos_shape)
        return (dx.to(x_dtype) if need_x else None, None, None, dmt.to(mt_dtype).reshape(mt_shape) if need_mt else None,
                dpos)


def predictor_tokens(
    x: torch.Tensor, masks_enc, masks_pred, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """Build the predictor's input.

    Args:
        x: ``[nenc*B, Kc, Dp]`` context tokens already mapped to the predictor width.
        masks_enc: ``[nenc, B, Kc]`` context indices; masks_pred: ``[M, B, Kt]`` target indices.
        mask_token: ``[Dp]`` (any shape with Dp elements); pos_embed: ``[N, Dp]`` (or ``[1, N, Dp]``).
    Returns:
        ``[M*nenc*B, Kc+Kt, Dp]`` in x's dtype (the activations' dtype; sums taken in fp32). Backward: the context
        gradient is summed over the M repeats; the mask token's gradient is summed over every target slot; the
        positional embedding's when it requires grad.
    """
    idx_enc, idx_pred = _check(x, masks_enc, masks_pred, mask_token, pos_embed)
    if not use_triton(x, mask_token, pos_embed, idx_enc, idx_pred, op="predictor_tokens", size=x.numel()):
        return _tokens_ref(x, idx_enc, idx_pred, mask_token, pos_embed)
    return PredictorTokensFunction.apply(x, idx_enc, idx_pred, mask_token, pos_embed)
