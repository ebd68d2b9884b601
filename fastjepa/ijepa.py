"""The I-JEPA objective: target encoder on the full image, context encoder on the context block, predictor on
the context + mask tokens, smooth-L1 against the normalised target features at every target block.

It knows nothing of processes, devices or files: the trainer wraps it (FSDP2/DDP, autocast, compile).
"""

import copy

import torch
from torch import nn

from fastjepa.kernels import ema_update, target_norm_gather, target_norm_smooth_l1
from fastjepa.masks import Masks
from fastjepa.models import VisionTransformer, VisionTransformerPredictor, build_models
from fastjepa.modules.fp8 import to_float8


class IJEPA(nn.Module):
    def __init__(self, encoder: VisionTransformer, predictor: VisionTransformerPredictor,
                 target_encoder: VisionTransformer | None = None, varlen_context: bool = False):
        super().__init__()
        # True: the collator's context lists are untruncated (-1 padded) and run as packed sequences
        self.varlen_context = varlen_context
        self.encoder = encoder
        self.predictor = predictor
        self.target_encoder = copy.deepcopy(encoder) if target_encoder is None else target_encoder
        self.target_encoder.requires_grad_(False)
        # The low-precision replica the target forward reads (enable_target_replica): derived from the fp32
        # target, written by the EMA pass, never checkpointed, so it is kept out of the module tree.
        self.__dict__["target_replica"] = None

    def enable_target_replica(self, dtype: torch.dtype = torch.bfloat16, fp8: bool = False) -> None:
        """Run the target forward on a ``dtype`` copy of the target encoder that the EMA pass writes (the fused
        kernel's ``copy=`` output), so autocast never re-casts the frozen weights: the forward reads 2 bytes per
        weight. With ``fp8``, its Linear layers multiply in e4m3 (``fastjepa.modules.fp8``). The fp32 target stays
        the EMA's master and what checkpoints hold. Call after ``.to(device)``."""
        replica = copy.deepcopy(self.target_encoder).to(dtype)
        replica.requires_grad_(False)
        self.__dict__["target_replica"] = to_float8(replica) if fp8 else replica

    @property
    def target_forward_encoder(self) -> VisionTransformer:
        """The module the target forward runs: the replica when there is one, else the target encoder."""
        return self.target_replica if self.target_replica is not None else self.target_encoder

    @torch.no_grad()
    def sync_target_replica(self) -> None:
        """Refresh the replica from the target encoder (after loading weights into it)."""
        if self.target_replica is not None:
            torch._foreach_copy_(_locals(self.target_replica.parameters()), _locals(self.target_encoder.parameters()))

    def to_masks(self, masks_enc, masks_pred=None) -> Masks:
        """The official lists (or stacked tensors) as one ``Masks`` value; a ``Masks`` passes through."""
        if isinstance(masks_enc, Masks):
            return masks_enc
        return Masks.from_lists(masks_enc, masks_pred, self.encoder.num_patches if self.varlen_context else None)

    @torch.no_grad()
    def targets(self, images: torch.Tensor, masks_enc, masks_pred=None) -> torch.Tensor:
        """``[M*nenc*B, Kt, D]``: layer-normalised (no affine) target-encoder features at every target block."""
        masks = self.to_masks(masks_enc, masks_pred)
        return target_norm_gather(self.target_forward_encoder(images), masks.pred, masks.num_context_blocks)

    def predict(self, images: torch.Tensor, masks_enc, masks_pred=None) -> torch.Tensor:
        """``[M*nenc*B, Kt, D]``: the predictor's outputs from the context encoder's view of the context blocks."""
        masks = self.to_masks(masks_enc, masks_pred)
        if masks.packed is not None:
            return self.predictor.forward_packed(self.encoder.forward_packed(images, masks.packed), masks.packed,
                                                 masks.pred)
        return self.predictor(self.encoder(images, masks.enc), masks.enc, masks.pred)

    def forward(self, images: torch.Tensor, masks_enc, masks_pred=None) -> torch.Tensor:
        """Loss for a batch: images ``[B, C, H, W]`` and either a ``Masks`` value or the collator's lists of
        ``[B, K]`` tensors (converted once here). The loss is the smooth-L1 mean over every predicted element,
        with or without variable-length context."""
        masks = self.to_masks(masks_enc, masks_pred)
        with torch.no_grad():
            h = self.target_forward_encoder(images)
        z = self.predict(images, masks)
        # = smooth_l1_loss(z, self.targets(...)), without materialising the normalised targets when fused
        return target_norm_smooth_l1(z, h, masks.pred, masks.num_context_blocks)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """``target <- momentum * target + (1 - momentum) * encoder``, over every parameter (as the official loop),
        writing the replica's low-precision copy in the same pass."""
        replica = None if self.target_replica is None else list(self.target_replica.parameters())
        ema_update(list(self.target_encoder.parameters()), list(self.encoder.parameters()), momentum, copy=replica)


def _locals(params) -> list[torch.Tensor]:
    """The local tensors of (possibly FSDP2-sharded) parameters."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in params]


def build_ijepa(cfg) -> IJEPA:
    encoder, predictor = build_models(cfg)
    return IJEPA(encoder, predictor, varlen_context=cfg.fastjepa.varlen_context)
