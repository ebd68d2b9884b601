"""Masked token gather: ``tokens[b, idx[m, b, k]] (+ pos_embed[idx[m, b, k]])`` for every mask m.

The I-JEPA context path gathers the context-block tokens after patch embedding; the official ``apply_masks``
builds a ``[B, K, D]`` int64 index (8 bytes per gathered element) to call ``torch.gather``. The fused op reads the
``[M, B, K]`` indices once per row, adds the positional embedding in the same pass, and its backward writes every
element of the tokens' gradient exactly once in one kernel (no zero-fill, no atomics, no index map): each program
finds, for its tile of tokens, the slots of each mask that gathered them by comparing against the mask's row.
"""

import torch

from fastjepa.kernels._utils import (
    cdiv,
    mask_index,
    next_power_of_2,
    op_or_launcher,
    row_blocks,
    tl,
    triton,
    use_triton,
)

OP = "masked_gather"


def _check(tokens: torch.Tensor, masks, pos_embed: torch.Tensor | None) -> torch.Tensor:
    """The ``[M, B, K]`` index, after checking tokens, masks and pos_embed against each other (both paths)."""
    if tokens.dim() != 3:
        raise ValueError(f"{OP}: tokens must be [B, N, D], got shape {tuple(tokens.shape)}")
    batch, num_tokens, dim = tokens.shape
    if pos_embed is not None and tuple(pos_embed.shape) not in ((num_tokens, dim), (1, num_tokens, dim)):
        raise ValueError(f"{OP}: pos_embed has shape {tuple(pos_embed.shape)}; expected [N, D] or [1, N, D] = "
                         f"[1, {num_tokens}, {dim}] for tokens of shape {tuple(tokens.shape)}")
    return mask_index(masks, batch, num_tokens, OP)


def masked_gather_ref(tokens: torch.Tensor, masks, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: ``[B, N, D]`` tokens, ``[M, B, K]`` indices -> ``[M*B, K, D]`` (mask-major)."""
    return _gather_ref(tokens, _check(tokens, masks, pos_embed), pos_embed)


def _gather_ref(tokens: torch.Tensor, idx: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.Tensor:
    num_masks, batch, k = idx.shape
    src = tokens.repeat(num_masks, 1, 1) if num_masks > 1 else tokens
    out = torch.gather(src, 1, idx.reshape(num_masks * batch, k, 1).expand(-1, -1, tokens.shape[-1]))
    if pos_embed is not None:
        out = (out + pos_embed.reshape(-1, tokens.shape[-1])[idx.reshape(num_masks * batch, k)]).to(tokens.dtype)
    return out


@triton.jit
def _masked_gather_fwd_kernel(x, idx, pos, out, B, N, K, D, HAS_POS: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    i_k, i_r = tl.program_id(0), tl.program_id(1)  # i_r = m * B + b: one output row
    i_b = i_r % B
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    o_d = tl.arange(0, BLOCK_D)
    m_k = o_k < K
    m = m_k[:, None] & (o_d < D)[None, :]
    b_idx = tl.load(idx + i_r.to(tl.int64) * K + o_k, mask=m_k, other=0).to(tl.int64)
    b_x = tl.load(x + (i_b.to(tl.int64) * N + b_idx[:, None]) * D + o_d[None, :], mask=m, other=0).to(tl.float32)
    if HAS_POS:
        b_x += tl.load(pos + b_idx[:, None] * D + o_d[None, :], mask=m, other=0).to(tl.float32)
    p_out = out + (i_r.to(tl.int64) * K + o_k[:, None]) * D + o_d[None, :]
    tl.store(p_out, b_x.to(out.dtype.element_ty), mask=m)


@triton.jit
def _masked_gather_bwd_kernel(dy, idx, dx, M, B, N, K, D, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    # Each program owns a tile of dx rows and sums over the masks, so every element of dx is written once. The slot
    # that gathered token n comes from comparing n with the mask's whole row (K indices, cached across programs).
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < N
    m_d = (o_d < D)[None, :]
    b_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i_m in range(M):
        i_r = (i_m * B + i_b).to(tl.int64)
        b_idx = tl.load(idx + i_r * K + o_k, mask=o_k < K, other=-1)
        b_eq = b_idx[None, :] == o_n[:, None]
        b_cnt = tl.sum(b_eq.to(tl.int32), axis=1)
        b_slot = tl.sum(tl.where(b_eq, o_k[None, :], 0), axis=1).to(tl.int64)
        m = (b_cnt == 1)[:, None] & m_d
        b_acc += tl.load(dy + (i_r * K + b_slot[:, None]) * D + o_d[None, :], mask=m, other=0).to(tl.float32)
        if tl.max(b_cnt, axis=0) > 1:
            # A token this mask gathers more than once (allowed, as in torch.gather): add every copy, slot by slot.
            for i_k in range(K):
                b_row = tl.load(dy + (i_r * K + i_k) * D + o_d, mask=o_d < D, other=0).to(tl.float32)
                m_k = (o_n == tl.load(idx + i_r * K + i_k)) & (b_cnt > 1)
                b_acc += tl.where(m_k[:, None], b_row[None, :], 0.0)
    p_dx = dx + (i_b.to(tl.int64) * N + o_n[:, None]) * D + o_d[None, :]
    tl.store(p_dx, b_acc.to(dx.dtype.element_ty), mask=m_n[:, None] & m_d)


# sm_90 compile check of every kernel (tests/kernels/test_compile.py): the signature a real launch specialises to,
# with ViT-H-like block sizes.
COMPILE_SPECS = {
    "masked_gather_fwd": (
        _masked_gather_fwd_kernel,
        {"x": "*bf16", "idx": "*i64", "pos": "*bf16", "out": "*bf16", "B": "i32", "N": "i32", "K": "i32", "D": "i32"},
        {"HAS_POS": True, "BLOCK_K": 4, "BLOCK_D": 2048}),
    "masked_gather_bwd": (
        _masked_gather_bwd_kernel,
        {"dy": "*bf16", "idx": "*i64", "dx": "*bf16", "M": "i32", "B": "i32", "N": "i32", "K": "i32", "D": "i32"},
        {"BLOCK_N": 4, "BLOCK_K": 128, "BLOCK_D": 2048}),
}


def masked_gather_fwd(tokens: torch.Tensor, idx: torch.Tensor, pos_embed: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N, D]`` tokens, checked ``[M, B, K]`` indices -> ``[M*B, K, D]`` in the tokens' dtype, the sum with pos
    taken in fp32 (written into ``out`` when given, which tests fill with NaN)."""
    batch, num_tokens, dim = tokens.shape
    num_masks, _, k = idx.shape
    tokens = tokens.contiguous()
    if pos_embed is not None:
        pos_embed = pos_embed.reshape(num_tokens, dim).contiguous()
    if out is None:
        out = torch.empty(num_masks * batch, k, dim, dtype=tokens.dtype, device=tokens.device)
    if out.numel() == 0:
        return out
    block_k, block_d = row_blocks(k, dim)
    _masked_gather_fwd_kernel[(cdiv(k, block_k), num_masks * batch)](
        tokens, idx, pos_embed if pos_embed is not None else tokens, out, batch, num_tokens, k, dim,
        HAS_POS=pos_embed is not None, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )
    return out


def masked_gather_bwd(grad_out: torch.Tensor, idx: torch.Tensor, num_tokens: int, dtype: torch.dtype,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``[M*B, K, D]`` output gradient, ``[M, B, K]`` indices -> ``[B, N, D]`` tokens gradient in ``dtype`` (zeros
    where nothing was gathered; repeated indices add up)."""
    grad_out = grad_out.contiguous()
    num_masks, batch, k = idx.shape
    dim = grad_out.shape[-1]
    dx = torch.empty(batch, num_tokens, dim, dtype=dtype, device=grad_out.device) if out is None else out
    block_n, block_d = row_blocks(num_tokens, dim)
    _masked_gather_bwd_kernel[(cdiv(num_tokens, block_n), batch)](
        grad_out, idx, dx, num_masks, batch, num_tokens, k, dim, BLOCK_N=block_n,
        BLOCK_K=next_power_of_2(k), BLOCK_D=block_d, num_warps=4,
    )
    return dx


@torch.library.custom_op("fastjepa::masked_gather_fwd", mutates_args=())
def _masked_gather_fwd_op(tokens: torch.Tensor, idx: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.Tensor:
    return masked_gather_fwd(tokens, idx, pos_embed)


@_masked_gather_fwd_op.register_fake
def _(tokens, idx, pos_embed):
    return tokens.new_empty((idx.shape[0] * idx.shape[1], idx.shape[2], tokens.shape[2]))


@torch.library.custom_op("fastjepa::masked_gather_bwd", mutates_args=())
def _masked_gather_bwd_op(grad_out: torch.Tensor, idx: torch.Tensor, num_tokens: int,
                          dtype: torch.dtype) -> torch.Tensor:
    return masked_gather_bwd(grad_out, idx, num_tokens, dtype)


@_masked_gather_bwd_op.register_fake
def _(grad_out, idx, num_tokens, dtype):
    return grad_out.new_empty((idx.shape[1], num_tokens, grad_out.shape[2]), dtype=dtype)


class MaskedGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, idx, pos_embed):
        ctx.num_tokens, ctx.tokens_dtype = tokens.shape[1], tokens.dtype
        ctx.pos_shape = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)
        ctx.save_for_backward(idx)
        return op_or_launcher(_masked_gather_fwd_op, masked_gather_fwd)(tokens, idx, pos_embed)

    @staticmethod
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        need_tokens, _, need_pos = ctx.needs_input_grad
        # The positional embedding's gradient is the tokens' gradient summed over the batch: accumulate it in fp32.
        dtype = torch.float32 if need_pos else ctx.tokens_dtype
        dx = op_or_launcher(_masked_gather_bwd_op, masked_gather_bwd)(grad_out, idx, ctx.num_tokens, dtype)
        grad_pos = None
        if need_pos:
            shape, dtype = ctx.pos_shape
            grad_pos = dx.sum(0).to(dtype).reshape(shape)
        return dx.to(ctx.tokens_dtype) if need_tokens else None, None, grad_pos


def masked_gather(tokens: torch.Tensor, masks, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """Gather the tokens named by each mask, optionally adding the positional embedding at those positions.

    Args:
        tokens: ``[B, N, D]``.
        masks: ``[M, B, K]`` int64 indices (``torch.stack`` of the official list of M ``[B, K]``); indices in
            ``[0, N)`` (others raise; a repeated index gathers the token twice and its
            gradients add up, as with ``torch.gather``).
        pos_embed: optional ``[N, D]`` (or ``[1, N, D]``) added at the gathered positions.
    Returns:
        ``[M*B, K, D]``, masks concatenated on the batch dimension (the order of the official ``apply_masks``), in
        the dtype of ``tokens`` (the activations' dtype: bf16 stays bf16 next to an fp32 ``pos_embed``).
    Backward scatter-adds into the gradient of ``tokens`` (and of ``pos_embed`` when it requires grad).
    """
    idx = _check(tokens, masks, pos_embed)
    if not use_triton(tokens, idx, *([pos_embed] if pos_embed is not None else []), op="masked_gather",
                      size=tokens.numel()):
        return _gather_ref(tokens, idx, pos_embed)
    return MaskedGatherFunction.apply(tokens, idx, pos_embed)
