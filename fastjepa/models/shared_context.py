"""Faster predictor forwards over the weights of ``VisionTransformerPredictor`` (same parameters, same state dict).

Two layouts, both returning ``[M*nenc*B, Kt, D]`` in the official order (target block major):

- ``repeat`` (the official method): the context is repeated once per target block, M sequences of
  ``Kc + Kt`` tokens per image, full attention. Identical results to ``predictor.forward``; the last block
  computes queries, the MLP and the final norm/projection only for the target tokens, the only ones read out.
- ``shared`` (opt-in, changes the method): one sequence per (image, context block),
  ``[context; targets of block 1; ...; block M]``. Context tokens attend to the context only; the mask tokens of
  block m attend to the context and to block m (``fastjepa.kernels.block_attention``). The context is computed
  once instead of M times: per image ``Kc + M*Kt`` tokens instead of ``M*(Kc + Kt)``. With one predictor block
  both layouts give the same predictions; deeper, the official context tokens also see block m's mask tokens,
  which here they do not. The loss is unchanged (smooth-L1, mean over every predicted target element).

``set_predictor_layout(predictor, layout)`` switches a predictor in place, keeping its parameters and names.
"""

import functools

import torch
import torch.nn.functional as F

from fastjepa.kernels import predictor_tokens
from fastjepa.kernels.block_attention import block_attention
from fastjepa.kernels.masked_gather import as_mask_list
from fastjepa.modules.attention_backends import attention

LAYOUTS = ("official", "repeat", "shared")


def _last_block_targets(blk, x: torch.Tensor, num_context: int) -> torch.Tensor:
    """One ViT block that reads every token but returns only the updated tokens after ``num_context``."""
    attn = blk.attn
    batch, seq_len, dim = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    h = blk.norm1(x)
    w_q, w_kv = attn.qkv.weight.split([dim, 2 * dim])
    b_q, b_kv = attn.qkv.bias.split([dim, 2 * dim]) if attn.qkv.bias is not None else (None, None)
    q = F.linear(h[:, num_context:], w_q, b_q).reshape(batch, -1, heads, head_dim).transpose(1, 2)
    k, v = F.linear(h, w_kv, b_kv).reshape(batch, seq_len, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    out = attention(q, k, v, attn.scale, attn.backend).transpose(1, 2).reshape(batch, -1, dim)
    x = x[:, num_context:] + attn.proj(out)
    return x + blk.mlp(blk.norm2(x))


def _shared_block(blk, x: torch.Tensor, num_context: int, num_blocks: int, provider: str) -> torch.Tensor:
    attn = blk.attn
    batch, seq_len, dim = x.shape
    qkv = attn.qkv(blk.norm1(x)).reshape(batch, seq_len, 3, attn.num_heads, attn.head_dim)
    out = block_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], num_context, num_blocks, attn.scale, provider)
    x = x + attn.proj(out.reshape(batch, seq_len, dim))
    return x + blk.mlp(blk.norm2(x))


def shared_context_tokens(predictor, x: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
    """``[nenc*B, Kc + M*Kt, Dp]``: embedded context (+ pos) then the mask tokens (+ pos) of every target block."""
    masks_enc, masks_pred = as_mask_list(masks_enc), as_mask_list(masks_pred)
    dim = predictor.mask_token.shape[-1]
    pos = predictor.predictor_pos_embed.reshape(-1, dim)
    ctx = predictor.predictor_embed(x) + pos[torch.cat(masks_enc)]
    tgt = predictor.mask_token.reshape(1, 1, dim) + pos[torch.cat(masks_pred, dim=1)]  # [B, M*Kt, Dp]
    return torch.cat([ctx, tgt.repeat(len(masks_enc), 1, 1).to(ctx.dtype)], dim=1)


@functools.cache
def _compiled(fn, backend: str):
    return torch.compile(fn, backend=backend)


def predictor_forward(predictor, x: torch.Tensor, masks_enc, masks_pred, layout: str = "repeat",
                      provider: str = "auto", compile_backend: str | None = None) -> torch.Tensor:
    """Predictor forward in the given layout (see the module docstring).

    Args:
        predictor: a ``VisionTransformerPredictor`` (its weights are used as they are).
        x: ``[nenc*B, Kc, D]`` context-encoder output; masks as the collator returns them.
        layout: "repeat" (official method), "shared" (context computed once), or "official" (the predictor's own
            forward, for comparisons).
        provider: block-attention provider for "shared" ("auto", "triton", "flex", "ref").
        compile_backend: ``torch.compile`` backend for the blocks this function runs itself (every block in
            "shared", the last one in "repeat"; the others are the predictor's own modules, compiled or not).
    Returns:
        ``[M*nenc*B, Kt, D]``, rows ordered as the official predictor's.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown predictor layout {layout!r}; choose one of {LAYOUTS}")
    if layout == "official":
        return predictor.forward_official(x, masks_enc, masks_pred)
    masks_enc, masks_pred = as_mask_list(masks_enc), as_mask_list(masks_pred)
    num_context, num_blocks = x.shape[1], len(masks_pred)
    *blocks, last = predictor.predictor_blocks
    last_block = _last_block_targets if compile_backend is None else _compiled(_last_block_targets, compile_backend)
    shared_block = _shared_block if compile_backend is None else _compiled(_shared_block, compile_backend)
    if layout == "repeat":
        h = predictor_tokens(predictor.predictor_embed(x), masks_enc, masks_pred, predictor.mask_token,
                             predictor.predictor_pos_embed)
        for blk in blocks:
            h = blk(h)
        h = last_block(last, h, num_context)
        return predictor.predictor_proj(predictor.predictor_norm(h))
    h = shared_context_tokens(predictor, x, masks_enc, masks_pred)
    for blk in predictor.predictor_blocks:
        h = shared_block(blk, h, num_context, num_blocks, provider)
    rows, _, dim = h.shape
    tgt_len = masks_pred[0].shape[1]
    h = h[:, num_context:].reshape(rows, num_blocks, tgt_len, dim).transpose(0, 1).reshape(-1, tgt_len, dim)
    return predictor.predictor_proj(predictor.predictor_norm(h))


def set_predictor_layout(predictor, layout: str, provider: str = "auto", compile_backend: str | None = None):
    """Make ``predictor(x, masks_enc, masks_pred)`` run in ``layout``; parameters and state-dict names unchanged.
    Returns the predictor."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown predictor layout {layout!r}; choose one of {LAYOUTS}")
    predictor.layout = layout
    predictor.block_attention_provider = provider
    predictor.compile_backend = compile_backend
    return predictor
