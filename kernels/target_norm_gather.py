"""Targets of I-JEPA: parameter-free LayerNorm of the target encoder's output, gathered at each target block.

The official code normalises all N tokens, gathers with ``apply_masks`` and copies the result once per context
block (``repeat_interleave_batch``); only the gathered tokens are ever used.
"""

import torch
import torch.nn.functional as F

from fastjepa.kernels.masked_gather import as_mask_list, masked_gather_ref


def repeat_interleave_batch(x: torch.Tensor, batch_size: int, repeat: int) -> torch.Tensor:
    """``[G*B, ...]`` -> ``[G*repeat*B, ...]``: each group of B rows repeated ``repeat`` times in place
    (the official ordering that pairs predictions of every context block with their targets)."""
    if repeat == 1:
        return x
    groups = x.reshape(-1, batch_size, *x.shape[1:])
    return groups.unsqueeze(1).expand(-1, repeat, *groups.shape[1:]).reshape(-1, *x.shape[1:])


def target_norm_gather_ref(h: torch.Tensor, masks_pred, num_context_blocks: int = 1, eps: float = 1e-5):
    """Reference: ``[B, N, D]`` target-encoder output -> ``[M*nenc*B, K, D]`` normalised targets."""
    h = F.layer_norm(h, (h.shape[-1],), eps=eps)
    out = masked_gather_ref(h, as_mask_list(masks_pred))
    return repeat_interleave_batch(out, h.shape[0], num_context_blocks)


def target_norm_gather(h: torch.Tensor, masks_pred, num_context_blocks: int = 1, eps: float = 1e-5):
    """Normalised (no affine) target features at every target block, in the order of the predictor's outputs.

    Args:
        h: ``[B, N, D]`` target-encoder output (after its final norm); no gradient flows to it.
        masks_pred: a list of M ``[B, K]`` int64 index tensors (the target blocks).
        num_context_blocks: nenc; each target block's rows are repeated that many times, as the official code does.
    Returns:
        ``[M*nenc*B, K, D]`` in ``h``'s dtype.
    """
    return target_norm_gather_ref(h, masks_pred, num_context_blocks, eps)
