"""The predictor's input sequence: embedded context (+ its positional embedding), repeated once per target block,
followed by the mask token + positional embedding at every target index of that block."""

import torch

from fastjepa.kernels.masked_gather import as_mask_list, masked_gather_ref
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
    return predictor_tokens_ref(x, masks_enc, masks_pred, mask_token, pos_embed)
