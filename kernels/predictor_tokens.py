"""The predictor's input sequence: embedded context (+ its positional embedding), repeated once per target block,
followed by the mask token + positional embedding at every target index of that block.

The official predictor builds it from five tensors (pos gather, add, repeat, mask-token expand + add, cat); the
fused op reads each context row once, writes it to its M places, and writes every target slot from the mask
token and the positional embedding directly. Its backward sums the context gradient over the M repeats and
reduces the mask token's gradient in fp32 partial sums.
"""

import torch
import triton
import triton.language as tl

from fastjepa.kernels._switch import fused_enabled, op_or_launcher
from fastjepa.kernels.masked_gather import _row_blocks, as_mask_list, masked_gather_ref, stack_masks
from fastjepa.kernels.target_norm_gather import repeat_interleave_batch


def predictor_tokens_ref(
    x: torch.Tensor, masks_enc, masks_pred, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """Reference, following the official predictor step by step."""
    masks_enc, masks_pred = as_mask_list(masks_enc), as_mask_list(masks_pred)
    dim = x.shape[-1]
    pos = pos_embed.reshape(1, -1, dim)
    batch = x.shape[0] // len(masks_enc)
    ctx = x + masked_gather_ref(pos.expand(batch, -1, -1), masks_enc)
    tgt_pos = masked_gather_ref(pos.expand(batch, -1, -1), masks_pred)
    tgt = mask_token.reshape(1, 1, dim) + repeat_interleave_batch(tgt_pos, batch, len(masks_enc))
    return torch.cat([ctx.repeat(len(masks_pred), 1, 1), tgt], dim=1)


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


def predictor_tokens_fwd(x, idx_enc, idx_pred, mask_token, pos_embed, batch: int, out=None) -> torch.Tensor:
    """``[nenc*B, Kc, D]`` x, ``[nenc*B, Kc]`` / ``[M*B, Kt]`` indices -> ``[M*nenc*B, Kc+Kt, D]``."""
    rows_enc, kc = idx_enc.shape
    rows_pred, kt = idx_pred.shape
    dim = x.shape[-1]
    if tuple(x.shape) != (rows_enc, kc, dim):
        raise ValueError(f"predictor_tokens: x has shape {tuple(x.shape)}; expected [nenc*B, Kc, D] = "
                         f"[{rows_enc}, {kc}, D] from masks_enc")
    if mask_token.numel() != dim or pos_embed.numel() % dim:
        raise ValueError(f"predictor_tokens: mask_token ({tuple(mask_token.shape)}) and pos_embed "
                         f"({tuple(pos_embed.shape)}) must have D={dim} features")
    nenc, num_pred = rows_enc // batch, rows_pred // batch
    x, mask_token, pos_embed = x.contiguous(), mask_token.contiguous(), pos_embed.contiguous()
    if out is None:
        dtype = torch.promote_types(torch.promote_types(x.dtype, pos_embed.dtype), mask_token.dtype)
        out = torch.empty(num_pred * rows_enc, kc + kt, dim, dtype=dtype, device=x.device)
    block_k, block_d = _row_blocks(max(kc, kt), dim)
    _predictor_tokens_fwd_kernel[(triton.cdiv(max(kc, kt), block_k), rows_enc + rows_pred)](
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
    block_k, block_d = _row_blocks(max(kc, kt), dim)
    num_kc, num_kt = triton.cdiv(kc, block_k), triton.cdiv(kt, block_k)
    partial = torch.empty(rows_enc, num_kt, dim, dtype=torch.float32, device=grad_out.device)
    _predictor_tokens_bwd_kernel[(num_kc + num_kt, rows_enc)](
        grad_out, dx, partial, batch, nenc, rows // rows_enc, kc, kt, dim, num_kc,
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )
    return dx, partial.sum((0, 1))


@torch.library.custom_op("fastjepa::predictor_tokens_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, idx_enc: torch.Tensor, idx_pred: torch.Tensor, mask_token: torch.Tensor,
            pos_embed: torch.Tensor, batch: int) -> torch.Tensor:
    return predictor_tokens_fwd(x, idx_enc, idx_pred, mask_token, pos_embed, batch)


@_fwd_op.register_fake
def _(x, idx_enc, idx_pred, mask_token, pos_embed, batch):
    dtype = torch.promote_types(torch.promote_types(x.dtype, pos_embed.dtype), mask_token.dtype)
    rows = idx_pred.shape[0] // batch * idx_enc.shape[0]
    return x.new_empty((rows, idx_enc.shape[1] + idx_pred.shape[1], x.shape[-1]), dtype=dtype)


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
    def forward(ctx, x, idx_enc, idx_pred, mask_token, pos_embed, batch):
        ctx.batch, ctx.kc = batch, x.shape[1]
        ctx.meta = (x.dtype, mask_token.shape, mask_token.dtype, pos_embed.shape, pos_embed.dtype)
        ctx.save_for_backward(idx_enc, idx_pred)
        return op_or_launcher(_fwd_op, predictor_tokens_fwd)(x, idx_enc, idx_pred, mask_token, pos_embed, batch)

    @staticmethod
    def backward(ctx, grad_out):
        idx_enc, idx_pred = ctx.saved_tensors
        x_dtype, mt_shape, mt_dtype, pos_shape, pos_dtype = ctx.meta
        batch, kc = ctx.batch, ctx.kc
        nenc = idx_enc.shape[0] // batch
        need_x, _, _, need_mt, need_pos, _ = ctx.needs_input_grad
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
                dpos, None)


def predictor_tokens(
    x: torch.Tensor, masks_enc, masks_pred, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """Build the predictor's input.

    Args:
        x: ``[nenc*B, Kc, Dp]`` context tokens already mapped to the predictor width.
        masks_enc: list of nenc ``[B, Kc]`` context indices; masks_pred: list of M ``[B, Kt]`` target indices.
        mask_token: ``[Dp]`` (any shape with Dp elements); pos_embed: ``[N, Dp]`` (or ``[1, N, Dp]``).
    Returns:
        ``[M*nenc*B, Kc+Kt, Dp]``. Backward: the context gradient is summed over the M repeats; the mask token's
        gradient is summed over every target slot; the positional embedding's when it requires grad.
    """
    masks_enc, masks_pred = as_mask_list(masks_enc), as_mask_list(masks_pred)
    if not fused_enabled(x, mask_token, pos_embed, *masks_enc, *masks_pred):
        return predictor_tokens_ref(x, masks_enc, masks_pred, mask_token, pos_embed)
    batch = masks_enc[0].shape[0]
    num_tokens = pos_embed.numel() // x.shape[-1]
    idx_enc = stack_masks(masks_enc, batch, num_tokens, "masks_enc")
    idx_pred = stack_masks(masks_pred, batch, num_tokens, "masks_pred")
    return PredictorTokensFunction.apply(x, idx_enc, idx_pred, mask_token, pos_embed, batch)
