"""Variable-length context (fixed mode, opt-in): every image keeps its whole context block instead of the batch
minimum the official collator cuts every context list to.

Context tokens of all images are packed into one ``[T, D]`` sequence (T = the sum of the context lengths) and
delimited by cumulative lengths; attention runs per sequence through ``varlen_attention`` (flash-attn's varlen
kernel, FlexAttention with a document mask, or padded SDPA), the token-wise parts (LayerNorm, MLP, projections)
on the packed tokens, so no FLOP is spent on padding. The predictor packs, for every target block m and image,
``[that image's context; block m's mask tokens]`` (the official layout, without a common context length).

Loss weighting: unchanged. Target blocks keep one size per batch, so the predictions are still
``[M*nenc*B, Kt, D]`` and the loss is the smooth-L1 mean over every predicted element: every image and target
block weighs the same as in the official loss; an image's context length changes what its predictor sees, never
its weight.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fastjepa.modules.attention_backends import varlen_positions


@dataclass
class PackedContext:
    """Context blocks of a batch, packed: sequence ``e*B + b`` is context block e of image b."""

    index: torch.Tensor  # [T] int64: patch index b*N + n of every packed token, in sequence order
    cu_seqlens: torch.Tensor  # [nenc*B + 1] int64 cumulative lengths
    max_seqlen: int
    batch: int
    num_patches: int

    @property
    def num_context_blocks(self) -> int:
        return (len(self.cu_seqlens) - 1) // self.batch


def pack_padded(masks_enc, num_patches: int) -> PackedContext:
    """From the collator's untruncated context lists (``truncate_context=False``): nenc ``[B, K]`` int64 tensors,
    each row the image's context indices in row-major order followed by -1 padding."""
    idx = torch.stack(list(masks_enc))  # [nenc, B, K]
    valid = idx >= 0
    lengths = valid.sum(-1).reshape(-1)
    batch = idx.shape[1]
    image = torch.arange(batch, device=idx.device).view(1, batch, 1).expand_as(idx)
    index = (image * num_patches + idx)[valid]  # row-major over (e, b, k): sequence e*B + b, in order
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))
    return PackedContext(index, cu_seqlens, idx.shape[-1], batch, num_patches)


def pack_context(context_tokens, device=None) -> PackedContext:
    """From the collator's untruncated context (``MultiBlockMasks.context_tokens``, bool ``[nenc, B, N]``)."""
    tokens = torch.as_tensor(np.asarray(context_tokens), dtype=torch.bool, device=device)
    if tokens.dim() != 3:
        raise ValueError(f"pack_context: context_tokens must be bool [nenc, B, N], got shape {tuple(tokens.shape)}")
    _, batch, num_patches = tokens.shape
    lengths = tokens.sum(-1).reshape(-1)
    if int(lengths.min()) < 1:
        raise ValueError("pack_context: a context block has no token; the collator keeps more than min_keep")
    e_b_n = tokens.nonzero()  # row-major: sequence by sequence, ascending patch index within each
    index = e_b_n[:, 1] * num_patches + e_b_n[:, 2]
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))
    return PackedContext(index, cu_seqlens, int(lengths.max()), batch, num_patches)


def encoder_forward_varlen(encoder, images: torch.Tensor, packed: PackedContext):
    """Context encoder on packed context tokens: ``[B, C, H, W]`` -> ``[T, D]``."""
    x = encoder.patch_embed(images)
    batch, num_patches, dim = x.shape
    if (batch, num_patches) != (packed.batch, packed.num_patches):
        raise ValueError(f"encoder_forward_varlen: images give {batch} x {num_patches} patches, the packed context "
                         f"was built for {packed.batch} x {packed.num_patches}")
    x = (x + encoder.pos_embed).reshape(-1, dim)[packed.index]
    for blk in encoder.blocks:
        x = blk(x, cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen)
    return encoder.norm(x)


def predictor_forward_varlen(predictor, z: torch.Tensor, packed: PackedContext, masks_pred) -> torch.Tensor:
    """Predictor on packed contexts: ``z`` ``[T, D]`` -> ``[M*nenc*B, Kt, D]`` in the official row order."""
    masks_pred = list(masks_pred) if isinstance(masks_pred, (list, tuple)) else [masks_pred]
    num_blocks, tgt_len = len(masks_pred), masks_pred[0].shape[1]
    num_seqs, batch, total = len(packed.cu_seqlens) - 1, packed.batch, z.shape[0]
    dim = predictor.mask_token.shape[-1]
    pos = predictor.predictor_pos_embed.reshape(-1, dim)
    ctx = predictor.predictor_embed(z) + pos[packed.index % packed.num_patches]
    tgt = predictor.mask_token.reshape(1, dim) + pos[torch.stack(masks_pred).reshape(-1)]  # rows (m, b, k)

    # Sequence s = m*nenc*B + e*B + b: context (e, b) then the mask tokens of block m for image b.
    ctx_len = packed.cu_seqlens.diff()
    cu_seqlens = F.pad((ctx_len.repeat(num_blocks) + tgt_len).cumsum(0), (1, 0))
    seq, pos_in = varlen_positions(cu_seqlens, num_blocks * (total + num_seqs * tgt_len))
    block, ctx_seq = seq // num_seqs, seq % num_seqs
    is_ctx = pos_in < ctx_len[ctx_seq]
    src = torch.where(is_ctx, packed.cu_seqlens[ctx_seq] + pos_in,
                      total + (block * batch + ctx_seq % batch) * tgt_len + pos_in - ctx_len[ctx_seq])
    h = torch.cat([ctx, tgt.to(ctx.dtype)])[src]
    for blk in predictor.predictor_blocks:
        h = blk(h, cu_seqlens=cu_seqlens, max_seqlen=packed.max_seqlen + tgt_len)
    h = h[~is_ctx].reshape(num_blocks * num_seqs, tgt_len, dim)
    return predictor.predictor_proj(predictor.predictor_norm(h))
