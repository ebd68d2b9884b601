"""nn.Module drop-ins over the fused gather ops of ``fastjepa.kernels`` (each falls back to its PyTorch reference
off GPU or with the kernel backend ``reference``). Masks are stacked ``[M, B, K]`` index tensors (``Masks.enc`` /
``Masks.pred``); the modules check them as the functionals do."""

import torch
from torch import nn

from fastjepa.kernels import masked_gather, predictor_tokens, target_norm_gather
from fastjepa.kernels.target_norm_gather import target_norm_smooth_l1


class MaskedGather(nn.Module):
    """``tokens [B, N, D]``, masks (one or a list of M ``[B, K]``) -> ``[M*B, K, D]``, adding the optional
    positional embedding ``[N, D]`` at the gathered positions (the official ``apply_masks``, fused)."""

    def forward(self, tokens: torch.Tensor, masks, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        return masked_gather(tokens, masks, pos_embed)


class TargetNormGather(nn.Module):
    """I-JEPA targets: LayerNorm without affine of ``h [B, N, D]`` at the target blocks, rows repeated per context
    block -> ``[M*nenc*B, K, D]`` (normalises only the gathered tokens)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, h: torch.Tensor, masks_pred, num_context_blocks: int = 1) -> torch.Tensor:
        return target_norm_gather(h, masks_pred, num_context_blocks, self.eps)


class TargetNormSmoothL1Loss(nn.Module):
    """The I-JEPA loss ``smooth_l1(pred, targets)`` (beta 1, mean) with the targets computed on the fly from
    ``h``, never stored; gradient w.r.t. ``pred`` only."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, pred: torch.Tensor, h: torch.Tensor, masks_pred, num_context_blocks: int = 1) -> torch.Tensor:
        return target_norm_smooth_l1(pred, h, masks_pred, num_context_blocks, self.eps)


class PredictorTokens(nn.Module):
    """The predictor's input: context ``x [nenc*B, Kc, D]`` (+ positional embedding) repeated per target block,
    then the learned mask token + positional embedding at every target index -> ``[M*nenc*B, Kc+Kt, D]``.

    Owns ``mask_token`` ([1, 1, D], learned) and ``pos_embed`` ([1, N, D]; pass a tensor to use fixed values, e.g.
    a sin-cos table, which is then frozen as in I-JEPA)."""

    def __init__(self, num_patches: int, dim: int, pos_embed: torch.Tensor | None = None, init_std: float = 0.02):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=init_std, a=-2.0, b=2.0)
        if pos_embed is None:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
            nn.init.trunc_normal_(self.pos_embed, std=init_std, a=-2.0, b=2.0)
        else:
            self.pos_embed = nn.Parameter(pos_embed.reshape(1, num_patches, dim).clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        return predictor_tokens(x, masks_enc, masks_pred, self.mask_token, self.pos_embed)
