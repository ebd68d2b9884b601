"""Masked token gather: ``tokens[b, idx[b, k]] (+ pos_embed[idx[b, k]])`` for each mask of a list.

The I-JEPA context path gathers the context-block tokens after patch embedding; the official ``apply_masks``
builds a ``[B, K, D]`` int64 index (8 bytes per gathered element) to call ``torch.gather``.
"""

import torch


def as_mask_list(masks) -> list[torch.Tensor]:
    """The official code passes either one ``[B, K]`` index tensor or a list of them."""
    return list(masks) if isinstance(masks, (list, tuple)) else [masks]


def masked_gather_ref(tokens: torch.Tensor, masks, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: ``[B, N, D]`` tokens, a list of M ``[B, K]`` index tensors -> ``[M*B, K, D]`` (mask-major)."""
    masks = as_mask_list(masks)
    idx = torch.cat(masks, dim=0)  # [M*B, K]
    src = tokens.repeat(len(masks), 1, 1) if len(masks) > 1 else tokens
    out = torch.gather(src, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    if pos_embed is not None:
        out = out + pos_embed.reshape(-1, tokens.shape[-1])[idx]
    return out


def masked_gather(tokens: torch.Tensor, masks, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """Gather the tokens named by each mask, optionally adding the positional embedding at those positions.

    Args:
        tokens: ``[B, N, D]``.
        masks: one ``[B, K]`` int64 index tensor or a list of M of them (the official mask format).
        pos_embed: optional ``[N, D]`` (or ``[1, N, D]``) added at the gathered positions.
    Returns:
        ``[M*B, K, D]``, masks concatenated on the batch dimension (the order of the official ``apply_masks``).
    Backward scatter-adds into the gradient of ``tokens`` (and of ``pos_embed`` when it requires grad).
    """
    return masked_gather_ref(tokens, masks, pos_embed)
