"""Shared-context attention for the I-JEPA predictor.

One sequence per (image, context block): ``[context (Lc); targets of block 1 (Lt); ...; block M (Lt)]``. Context
queries attend to the context only; the queries of target block m attend to the context and to block m. The
official predictor instead repeats the context once per target block (M sequences of ``Lc + Lt`` tokens); here
the context is computed once, and per image the predictor does ``Lc + M*Lt`` token-work instead of
``M*(Lc + Lt)``.

The Triton kernels follow FlashAttention-2: the forward keeps an online softmax and stores the log-sum-exp; the
backward recomputes probabilities tile by tile, one kernel for dQ (it also computes ``delta = rowsum(dO*O)``) and
one for dK/dV. Programs never straddle a segment boundary: each query (or key) tile belongs to the context or to
one target block, so the block structure becomes loop bounds instead of a mask over the full ``L x L`` matrix.
"""

import functools

import torch

from fastjepa.choices import BLOCK_ATTENTION_BACKENDS
from fastjepa.kernels._utils import (
    cdiv,
    compiled_flex_attention,
    interpreting,
    next_power_of_2,
    op_or_launcher,
    require_triton,
    tl,
    triton,
    use_triton,
)

_LOG2E = 1.4426950408889634


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int, num_target_blocks: int) -> int:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"block_attention: q, k, v must share one [B, L, H, D] shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}. Reshape the qkv projection to [B, L, 3, H, D] and pass its three slices."
        )
    seq_len = q.shape[1]
    targets = seq_len - context_len
    if context_len < 1 or num_target_blocks < 1 or targets % num_target_blocks or targets <= 0:
        raise ValueError(
            f"block_attention: sequence length {seq_len} is not context_len ({context_len}) + num_target_blocks "
            f"({num_target_blocks}) x "
            "an equal, positive target length. Build the sequence as [context; block 1; ...; block M] with every "
            "target block cut to the same length (the collator does)."
        )
    return (seq_len - context_len) // num_target_blocks


def block_attention_mask(context_len: int, target_len: int, num_target_blocks: int, device=None) -> torch.Tensor:
    """``[L, L]`` bool, True where query i may attend to key j."""
    pos = torch.arange(context_len + num_target_blocks * target_len, device=device)
    seg = torch.where(pos < context_len, 0, (pos - context_len).div(target_len, rounding_mode="floor") + 1)
    return (pos[None, :] < context_len) | (seg[:, None] == seg[None, :])


def block_attention_ref(q, k, v, context_len: int, num_target_blocks: int, scale: float | None = None) -> torch.Tensor:
    """Reference: dense masked attention, softmax in fp32 (fp64 for fp64 inputs). ``[B, L, H, D]`` in and out."""
    target_len = _check(q, k, v, context_len, num_target_blocks)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = block_attention_mask(context_len, target_len, num_target_blocks, q.device)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("blhd,bmhd->bhlm", q.to(acc), k.to(acc)) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhlm,bmhd->blhd", probs, v.to(acc)).to(q.dtype)


@triton.jit
def _segment(i_t, Lc, Lt, NT_C, NT_T, BLOCK: tl.constexpr):
    """Tile i_t -> (first row of the tile, end of its segment, start of its segment, is it a target tile)."""
    is_tgt = i_t >= NT_C
    r = i_t - NT_C
    seg = tl.where(is_tgt, r // NT_T, 0)
    seg_start = tl.where(is_tgt, Lc + seg * Lt, 0)
    seg_end = tl.where(is_tgt, seg_start + Lt, Lc)
    row0 = seg_start + tl.where(is_tgt, r % NT_T, i_t) * BLOCK
    return row0, seg_end, seg_start, is_tgt


@triton.jit
def _load_kv_tile(p_k, p_v, stride_kl, stride_vl, o_kv, m_kv, o_d, m_d):
    """The K and V rows ``o_kv`` of one (batch, head); masked rows and columns read as 0."""
    m = m_kv[:, None] & m_d[None, :]
    b_k = tl.load(p_k + o_kv[:, None] * stride_kl + o_d[None, :], mask=m, other=0.0)
    b_v = tl.load(p_v + o_kv[:, None] * stride_vl + o_d[None, :], mask=m, other=0.0)
    return b_k, b_v


@triton.jit
def _fwd_inner(acc, m_i, l_i, b_q, p_k, p_v, stride_kl, stride_vl, lo, hi, o_n, o_d, m_d, qk_scale,
               PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    for start in range(lo, hi, BLOCK_N):
        m_n = (start + o_n) < hi
        b_k, b_v = _load_kv_tile(p_k, p_v, stride_kl, stride_vl, start + o_n, m_n, o_d, m_d)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
        b_p = tl.exp2(b_s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(b_p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _block_attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    H, L, Lc, Lt, NT_C, NT_T, qk_scale, D,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    row0, q_end, seg_start, is_tgt = _segment(i_t, Lc, Lt, NT_C, NT_T, BLOCK_M)
    o_m = row0 + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < q_end, o_d < D

    p_q = Q + i_b * stride_qb + i_h * stride_qh
    p_k = K + i_b * stride_kb + i_h * stride_kh
    p_v = V + i_b * stride_vb + i_h * stride_vh
    b_q = tl.load(p_q + o_m[:, None] * stride_ql + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, b_q, p_k, p_v, stride_kl, stride_vl, 0, Lc, o_n, o_d, m_d,
                               qk_scale, PREC, BLOCK_N)
    # Context tiles get an empty range here: lo == hi == 0.
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, b_q, p_k, p_v, stride_kl, stride_vl, seg_start,
                               tl.where(is_tgt, q_end, seg_start), o_n, o_d, m_d, qk_scale, PREC, BLOCK_N)

    acc = acc / l_i[:, None]
    p_o = O + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_ol + o_d[None, :]
    tl.store(p_o, acc.to(O.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    # Log-sum-exp in base 2 (the scores above are scaled by log2(e)).
    tl.store(LSE + i_bh.to(tl.int64) * L + o_m, m_i + tl.log2(l_i), mask=m_m)


@triton.jit
def _dq_inner(acc, b_q, b_do, b_lse, b_delta, p_k, p_v, stride_kl, stride_vl, lo, hi, o_n, o_d, m_d, qk_scale,
              PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    for start in range(lo, hi, BLOCK_N):
        m_n = (start + o_n) < hi
        b_k, b_v = _load_kv_tile(p_k, p_v, stride_kl, stride_vl, start + o_n, m_n, o_d, m_d)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
        b_p = tl.where(m_n[None, :], tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        acc += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    return acc


@triton.jit
def _block_attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    H, L, Lc, Lt, NT_C, NT_T, qk_scale, sm_scale, D,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ for one query tile; also writes ``delta = rowsum(dO * O)``, which the dK/dV kernel reads afterwards.
    O, dO and dQ share the contiguous ``[B, L, H, D]`` strides ``stride_o*``."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    row0, q_end, seg_start, is_tgt = _segment(i_t, Lc, Lt, NT_C, NT_T, BLOCK_M)
    o_m = row0 + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < q_end, o_d < D
    m_md = m_m[:, None] & m_d[None, :]

    p_k = K + i_b * stride_kb + i_h * stride_kh
    p_v = V + i_b * stride_vb + i_h * stride_vh
    b_q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_ql + o_d[None, :], mask=m_md,
                  other=0.0)
    off_o = i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_ol + o_d[None, :]
    b_do = tl.load(DO + off_o, mask=m_md, other=0.0)
    b_o = tl.load(O + off_o, mask=m_md, other=0.0)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), axis=1)
    b_lse = tl.load(LSE + i_bh.to(tl.int64) * L + o_m, mask=m_m, other=0.0)
    tl.store(DELTA + i_bh.to(tl.int64) * L + o_m, b_delta, mask=m_m)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc = _dq_inner(acc, b_q, b_do, b_lse, b_delta, p_k, p_v, stride_kl, stride_vl, 0, Lc, o_n, o_d, m_d, qk_scale,
                    PREC, BLOCK_N)
    acc = _dq_inner(acc, b_q, b_do, b_lse, b_delta, p_k, p_v, stride_kl, stride_vl, seg_start,
                    tl.where(is_tgt, q_end, seg_start), o_n, o_d, m_d, qk_scale, PREC, BLOCK_N)
    tl.store(DQ + off_o, (acc * sm_scale).to(DQ.dtype.element_ty), mask=m_md)


@triton.jit
def _block_attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    H, L, Lc, Lt, NT_C, NT_T, qk_scale, sm_scale, D,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV for one key tile. Context keys are seen by every query of the sequence; the keys of target block m
    only by the queries of block m. dO, dK and dV share the contiguous strides ``stride_o*``."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    row0, k_end, seg_start, is_tgt = _segment(i_t, Lc, Lt, NT_C, NT_T, BLOCK_N)
    o_n = row0 + tl.arange(0, BLOCK_N)
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_n, m_d = o_n < k_end, o_d < D
    m_nd = m_n[:, None] & m_d[None, :]

    b_k = tl.load(K + i_b * stride_kb + i_h * stride_kh + o_n[:, None] * stride_kl + o_d[None, :], mask=m_nd,
                  other=0.0)
    b_v = tl.load(V + i_b * stride_vb + i_h * stride_vh + o_n[:, None] * stride_vl + o_d[None, :], mask=m_nd,
                  other=0.0)
    p_q = Q + i_b * stride_qb + i_h * stride_qh
    p_do = DO + i_b * stride_ob + i_h * stride_oh
    p_lse = LSE + i_bh.to(tl.int64) * L
    p_delta = DELTA + i_bh.to(tl.int64) * L

    lo = tl.where(is_tgt, seg_start, 0)
    hi = tl.where(is_tgt, k_end, L)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_M):
        m_m = (start + o_m) < hi
        m_md = m_m[:, None] & m_d[None, :]
        b_q = tl.load(p_q + (start + o_m)[:, None] * stride_ql + o_d[None, :], mask=m_md, other=0.0)
        b_do = tl.load(p_do + (start + o_m)[:, None] * stride_ol + o_d[None, :], mask=m_md, other=0.0)
        b_lse = tl.load(p_lse + start + o_m, mask=m_m, other=0.0)
        b_delta = tl.load(p_delta + start + o_m, mask=m_m, other=0.0)
        # Transposed scores [BLOCK_N, BLOCK_M]: dK and dV then come out without transposing P.
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale
        b_pt = tl.where(m_m[None, :], tl.exp2(b_st - b_lse[None, :]), 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)

    off = i_b * stride_ob + i_h * stride_oh + o_n[:, None] * stride_ol + o_d[None, :]
    tl.store(DK + off, (b_dk * sm_scale).to(DK.dtype.element_ty), mask=m_nd)
    tl.store(DV + off, b_dv.to(DV.dtype.element_ty), mask=m_nd)


def _config(head_dim: int, dtype: torch.dtype) -> dict:
    # Tiny tiles under the interpreter, where every program x loop iteration costs milliseconds.
    block = 16 if interpreting() else 64
    return dict(
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        PREC="ieee" if dtype == torch.float32 else None,  # fp32 exact (no TF32); fp16/bf16 tensor cores
    )


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    if t.stride(-1) != 1:
        raise ValueError(f"block_attention: the head dimension must be contiguous (stride 1); got {t.stride()}")
    return t.stride(0), t.stride(1), t.stride(2)


def block_attention_fwd(q, k, v, context_len: int, num_target_blocks: int,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: ``(out [B, L, H, D] contiguous, lse [B, H, L] fp32, base 2)``."""
    target_len = _check(q, k, v, context_len, num_target_blocks)
    if not (q.device == k.device == v.device) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError("block_attention: q, k, v must share one device and dtype")
    batch, seq_len, heads, head_dim = q.shape
    cfg = _config(head_dim, q.dtype)
    out = torch.empty(batch, seq_len, heads, head_dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads, seq_len, device=q.device, dtype=torch.float32)
    nt_c, nt_t = cdiv(context_len, cfg["BLOCK_M"]), cdiv(target_len, cfg["BLOCK_M"])
    grid = (nt_c + num_target_blocks * nt_t, batch * heads)
    _block_attn_fwd_kernel[grid](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        heads, seq_len, context_len, target_len, nt_c, nt_t, scale * _LOG2E, head_dim, **cfg,
    )
    return out, lse


def block_attention_bwd(do, q, k, v, out, lse, context_len: int, num_target_blocks: int, scale: float):
    """Triton backward: ``(dq, dk, dv)``, each ``[B, L, H, D]`` contiguous."""
    target_len = _check(q, k, v, context_len, num_target_blocks)
    batch, seq_len, heads, head_dim = q.shape
    cfg = _config(head_dim, q.dtype)
    do = do.contiguous()
    dq, dk, dv = (torch.empty(batch, seq_len, heads, head_dim, device=q.device, dtype=q.dtype) for _ in range(3))
    delta = torch.empty_like(lse)
    args = (heads, seq_len, context_len, target_len)
    nt_c, nt_t = cdiv(context_len, cfg["BLOCK_M"]), cdiv(target_len, cfg["BLOCK_M"])
    _block_attn_bwd_dq_kernel[(nt_c + num_target_blocks * nt_t, batch * heads)](
        q, k, v, out, do, dq, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(dq),
        *args, nt_c, nt_t, scale * _LOG2E, scale, head_dim, **cfg,
    )
    nt_c, nt_t = cdiv(context_len, cfg["BLOCK_N"]), cdiv(target_len, cfg["BLOCK_N"])
    _block_attn_bwd_dkdv_kernel[(nt_c + num_target_blocks * nt_t, batch * heads)](
        q, k, v, do, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(dk),
        *args, nt_c, nt_t, scale * _LOG2E, scale, head_dim, **cfg,
    )
    return dq, dk, dv


# torch.library ops, so torch.compile traces through the predictor block instead of breaking the graph here.
@torch.library.custom_op("fastjepa::block_attention_fwd", mutates_args=())
def _block_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int, num_target_blocks: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return block_attention_fwd(q, k, v, context_len, num_target_blocks, scale)


@_block_attention_fwd_op.register_fake
def _(q, k, v, context_len, num_target_blocks, scale):
    batch, seq_len, heads, head_dim = q.shape
    return q.new_empty(batch, seq_len, heads, head_dim), q.new_empty(batch, heads, seq_len, dtype=torch.float32)


@torch.library.custom_op("fastjepa::block_attention_bwd", mutates_args=())
def _block_attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    context_len: int, num_target_blocks: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return block_attention_bwd(do, q, k, v, out, lse, context_len, num_target_blocks, scale)


@_block_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, context_len, num_target_blocks, scale):
    return tuple(q.new_empty(q.shape) for _ in range(3))


class BlockAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, context_len: int, num_target_blocks: int, scale: float):
        fwd = op_or_launcher(_block_attention_fwd_op, block_attention_fwd)
        out, lse = fwd(q, k, v, context_len, num_target_blocks, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (context_len, num_target_blocks, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = op_or_launcher(_block_attention_bwd_op, block_attention_bwd)(do, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None


@functools.lru_cache(maxsize=64)
def _flex_block_mask(context_len: int, target_len: int, num_target_blocks: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        q_seg = torch.where(q_idx < context_len, 0, (q_idx - context_len) // target_len + 1)
        kv_seg = torch.where(kv_idx < context_len, 0, (kv_idx - context_len) // target_len + 1)
        return (kv_idx < context_len) | (q_seg == kv_seg)

    seq_len = context_len + num_target_blocks * target_len
    return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)


def block_attention_flex(q, k, v, context_len: int, num_target_blocks: int, scale: float | None = None) -> torch.Tensor:
    """The same attention through FlexAttention (compiled on GPU; eager, unfused, on CPU). ``[B, L, H, D]``."""
    from torch.nn.attention.flex_attention import flex_attention

    target_len = _check(q, k, v, context_len, num_target_blocks)
    block_mask = _flex_block_mask(context_len, target_len, num_target_blocks, str(q.device))
    fn = compiled_flex_attention() if q.is_cuda else flex_attention
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale)
    return out.transpose(1, 2)


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int, num_target_blocks: int,
    scale: float | None = None, backend: str = "auto",
) -> torch.Tensor:
    """Shared-context attention: context queries see the context; target block m's queries see context + block m.

    Args:
        q, k, v: ``[B, L, H, D]`` (any strides with a contiguous head dim, e.g. slices of a ``[B, L, 3, H, D]``
            qkv projection), ``L = context_len + num_target_blocks * Lt``, sequence laid out
            ``[context; block 1; ...]``.
        context_len: context tokens per sequence; num_target_blocks: target blocks M, each of ``Lt`` tokens.
        scale: softmax scale, default ``D ** -0.5``.
        backend: "triton" (fused, fwd+bwd), "flex" (FlexAttention), "reference" (dense masked, fp32 softmax), or
            "auto" (Triton on CUDA / under the interpreter unless the kernel backend is "reference", else the
            reference).
    Returns:
        ``[B, L, H, D]`` in q's dtype; softmax statistics in fp32. Backward recomputes the probabilities
        (FlashAttention-2) and returns dq, dk, dv in the input dtype.
    """
    if backend not in BLOCK_ATTENTION_BACKENDS:
        raise ValueError(f"block_attention: unknown backend {backend!r}; choose one of {BLOCK_ATTENTION_BACKENDS}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "auto":
        backend = "triton" if use_triton(q, k, v) else "reference"
    if backend == "reference":
        return block_attention_ref(q, k, v, context_len, num_target_blocks, scale)
    if backend == "flex":
        return block_attention_flex(q, k, v, context_len, num_target_blocks, scale)
    _check(q, k, v, context_len, num_target_blocks)
    require_triton("block_attention(backend='triton')")
    if not (q.is_cuda or interpreting()):
        raise ValueError(f"block_attention: backend 'triton' needs CUDA tensors (got {q.device.type}) or "
                         "TRITON_INTERPRET=1 set before import; use backend='auto' or 'reference' on CPU")
    return BlockAttentionFunction.apply(q, k, v, context_len, num_target_blocks, scale)


__all__ = [
    "block_attention",
    "block_attention_ref",
    "block_attention_flex",
    "block_attention_mask",
    "block_attention_fwd",
    "block_attention_bwd",
    "BlockAttentionFunction",
]
