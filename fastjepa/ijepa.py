"""The I-JEPA objective: target encoder on the full image, context encoder on the context block, predictor on
the context + mask tokens, smooth-L1 against the normalised target features at every target block.

It knows nothing of processes, devices or files: the trainer wraps it (FSDP2/DDP, autocast, compile).
"""

import copy

import torch
from torch import nn

from fastjepa.kernels import ema_update, target_norm_gather, target_norm_smooth_l1
from fastjepa.models import VisionTransformer, VisionTransformerPredictor, build_models


def _mask_list(masks) -> list[torch.Tensor]:
    return list(masks) if isinstance(masks, (list, tuple)) else [masks]


class IJEPA(nn.Module):
    def __init__(self, encoder: VisionTransformer, predictor: VisionTransformerPredictor,
                 target_encoder: VisionTransformer | None = None):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.target_encoder = copy.deepcopy(encoder) if target_encoder is None else target_encoder
        self.target_encoder.requires_grad_(False)

    @torch.no_grad()
    def targets(self, images: torch.Tensor, masks_pred, num_context_blocks: int = 1) -> torch.Tensor:
        """``[M*nenc*B, Kt, D]``: layer-normalised (no affine) target-encoder features at every target block."""
        h = self.target_encoder(images)
        return target_norm_gather(h, _mask_list(masks_pred), num_context_blocks)

    def predict(self, images: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        """``[M*nenc*B, Kt, D]``: the predictor's outputs from the context encoder's view of the context blocks."""
        masks_enc, masks_pred = _mask_list(masks_enc), _mask_list(masks_pred)
        return self.predictor(self.encoder(images, masks_enc), masks_enc, masks_pred)

    def forward(self, images: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        """Loss for a batch: images ``[B, C, H, W]``, masks as the collator returns them (lists of ``[B, K]``)."""
        masks_enc, masks_pred = _mask_list(masks_enc), _mask_list(masks_pred)
        with torch.no_grad():
            h = self.target_encoder(images)
        z = self.predict(images, masks_enc, masks_pred)
        # = smooth_l1_loss(z, self.targets(...)), without materialising the normalised targets when fused
        return target_norm_smooth_l1(z, h, masks_pred, len(masks_enc))

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """``target <- momentum * target + (1 - momentum) * encoder``, over every parameter (as the official loop)."""
        ema_update(list(self.target_encoder.parameters()), list(self.encoder.parameters()), momentum)


def build_ijepa(cfg) -> IJEPA:
    encoder, predictor = build_models(cfg)
    return IJEPA(encoder, predictor)
