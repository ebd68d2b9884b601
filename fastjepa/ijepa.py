"""The I-JEPA objective: target encoder on the full image, context encoder on the context block, predictor on
the context + mask tokens, smooth-L1 against the normalised target features at every target block.

It knows nothing of processes, devices or files: the trainer wraps it (FSDP2/DDP, autocast, compile).
"""

import copy

import torch
from torch import nn

from fastjepa.kernels import ema_update, target_norm_gather, target_norm_smooth_l1
from fastjepa.models import VisionTransformer, VisionTransformerPredictor, build_models
from fastjepa.models.varlen import PackedContext, pack_padded


def _mask_list(masks) -> list[torch.Tensor]:
    return list(masks) if isinstance(masks, (list, tuple)) else [masks]


class IJEPA(nn.Module):
    def __init__(self, encoder: VisionTransformer, predictor: VisionTransformerPredictor,
                 target_encoder: VisionTransformer | None = None, varlen_context: bool = False):
        super().__init__()
        # True: masks_enc are the collator's untruncated lists (-1 padded) and run as packed sequences
        self.varlen_context = varlen_context
        self.encoder = encoder
        self.predictor = predictor
        self.target_encoder = copy.deepcopy(encoder) if target_encoder is None else target_encoder
        self.target_encoder.requires_grad_(False)

    @torch.no_grad()
    def targets(self, images: torch.Tensor, masks_pred, num_context_blocks: int = 1) -> torch.Tensor:
        """``[M*nenc*B, Kt, D]``: layer-normalised (no affine) target-encoder features at every target block."""
        h = self.target_encoder(images)
        return target_norm_gather(h, _mask_list(masks_pred), num_context_blocks)

    def _context(self, masks_enc) -> list[torch.Tensor] | PackedContext:
        masks_enc = _mask_list(masks_enc)
        return pack_padded(masks_enc, self.encoder.num_patches) if self.varlen_context else masks_enc

    def predict(self, images: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        """``[M*nenc*B, Kt, D]``: the predictor's outputs from the context encoder's view of the context blocks."""
        context = self._context(masks_enc)
        return self.predictor(self.encoder(images, context), context, _mask_list(masks_pred))

    def forward(self, images: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        """Loss for a batch: images ``[B, C, H, W]``, masks as the collator returns them (lists of ``[B, K]``).
        The loss is the smooth-L1 mean over every predicted element, with or without variable-length context."""
        masks_pred = _mask_list(masks_pred)
        with torch.no_grad():
            h = self.target_encoder(images)
        z = self.predict(images, masks_enc, masks_pred)
        # = smooth_l1_loss(z, self.targets(...)), without materialising the normalised targets when fused
        return target_norm_smooth_l1(z, h, masks_pred, len(_mask_list(masks_enc)))

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """``target <- momentum * target + (1 - momentum) * encoder``, over every parameter (as the official loop)."""
        ema_update(list(self.target_encoder.parameters()), list(self.encoder.parameters()), momentum)


def build_ijepa(cfg) -> IJEPA:
    encoder, predictor = build_models(cfg)
    return IJEPA(encoder, predictor, varlen_context=cfg.fastjepa.varlen_context)
