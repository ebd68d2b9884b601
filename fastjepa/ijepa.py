"""The I-JEPA objective: target encoder on the full image, context encoder on the context block, predictor on
the context + mask tokens, smooth-L1 against the normalised target features at every target block.

Two options beyond the official method: SIGReg (LeJEPA's regulariser, ``fastjepa.modules.sigreg``) on the context
encoder's output, mixed in as ``(1 - weight) * I-JEPA + weight * SIGReg``; and an online target (no momentum copy:
the targets come from the context encoder itself under ``no_grad``, teacher-free as in LeJEPA).

It knows nothing of processes, devices or files: the trainer wraps it (FSDP2/DDP, autocast, compile).
"""

import copy

import torch
from torch import nn

from fastjepa.kernels import ema_update, ema_update_fp8, target_norm_gather, target_norm_smooth_l1
from fastjepa.kernels.ema_fp8 import quantize_rowwise
from fastjepa.mask_batch import Masks
from fastjepa.models import VisionTransformer, VisionTransformerPredictor, build_models
from fastjepa.modules.fp8 import fp8_layers, to_float8
from fastjepa.modules.sigreg import SIGReg
from fastjepa.spec import ModelSpec, Objective


class IJEPA(nn.Module):
    """``online_target``: no target encoder of its own (``target_encoder`` is the context encoder, outside the
    module tree, so state dicts hold no ``target_encoder.*``). ``sigreg`` with ``sigreg_weight``: the regulariser
    on the context encoder's output, averaged per context block (``sigreg_tokens=False``) or on every token;
    ``sigreg_seed`` plus the step picks its directions."""

    def __init__(self, encoder: VisionTransformer, predictor: VisionTransformerPredictor,
                 target_encoder: VisionTransformer | None = None, varlen_context: bool = False, *,
                 online_target: bool = False, sigreg: SIGReg | None = None, sigreg_weight: float = 0.0,
                 sigreg_tokens: bool = False, sigreg_seed: int = 0):
        super().__init__()
        # True: the collator's context lists are untruncated (-1 padded) and run as packed sequences
        self.varlen_context = varlen_context
        self.encoder = encoder
        self.predictor = predictor
        if online_target:
            if target_encoder is not None:
                raise ValueError("online_target: the targets come from the encoder; pass no target_encoder")
        else:  # a registered submodule: its weights are in state dicts and checkpoints
            self.target_encoder = copy.deepcopy(encoder) if target_encoder is None else target_encoder
            self.target_encoder.requires_grad_(False)
        self.sigreg = sigreg if sigreg_weight > 0 else None
        self.sigreg_weight, self.sigreg_tokens, self.sigreg_seed = sigreg_weight, sigreg_tokens, sigreg_seed
        # (I-JEPA loss, SIGReg) of the last forward, detached, on the device: logged without a host sync
        self.loss_terms: tuple[torch.Tensor, torch.Tensor] | None = None
        # The low-precision replica the target forward reads (enable_target_replica): derived from the fp32
        # target, written by the EMA pass, never checkpointed. A tuple, not a module attribute, keeps it out of
        # the module tree (state dicts, .to(), DDP's parameters); () without one.
        self._replica: tuple[VisionTransformer, ...] = ()

    def enable_target_replica(self, dtype: torch.dtype = torch.bfloat16, fp8: bool = False) -> None:
        """Run the target forward on a ``dtype`` copy of the target encoder that the EMA pass writes (the fused
        kernel's ``copy=`` output), so autocast never re-casts the frozen weights: the forward reads 2 bytes per
        weight. With ``fp8``, its Linear layers multiply in e4m3 (``fastjepa.modules.fp8``). The fp32 target stays
        the EMA's master and what checkpoints hold. Call after ``.to(device)``."""
        if self.online_target:
            raise ValueError("an online target has no EMA pass to write a replica; run it without one")
        replica = copy.deepcopy(self.target_encoder).to(dtype)
        replica.requires_grad_(False)
        self._replica = (to_float8(replica) if fp8 else replica,)
        if fp8:
            self.quantize_fp8_weights()  # then kept by update_target's EMA

    @property
    def online_target(self) -> bool:
        return "target_encoder" not in self._modules

    @property
    def target_encoder(self) -> VisionTransformer:
        """The EMA target encoder, or with an online target the context encoder itself."""
        return self._modules.get("target_encoder", self.encoder)

    @property
    def target_replica(self) -> VisionTransformer | None:
        """The low-precision replica the target forward reads (``enable_target_replica``), or None."""
        return self._replica[0] if self._replica else None

    @property
    def target_forward_encoder(self) -> VisionTransformer:
        """The module the target forward runs: the replica when there is one, else the target encoder."""
        return self.target_replica if self.target_replica is not None else self.target_encoder

    @torch.no_grad()
    def sync_target_replica(self) -> None:
        """Refresh the replica from the target encoder (after loading weights into it)."""
        if self.target_replica is not None:
            torch._foreach_copy_(_locals(self.target_replica.parameters()), _locals(self.target_encoder.parameters()))
            if self.held_fp8_layers():
                self.quantize_fp8_weights()

    @torch.no_grad()
    def quantize_fp8_weights(self) -> None:
        """Every FP8 replica layer's e4m3 weight and scales, quantised from the fp32 target's weight as the EMA
        (``update_target``) keeps them."""
        source = dict(zip(map(id, self.target_replica.parameters()), self.target_encoder.parameters(), strict=True))
        for layer in fp8_layers(self.target_replica):
            layer.weight_e4m3, layer.weight_scale = quantize_rowwise(source[id(layer.weight)])

    def check_masks(self, masks: Masks) -> Masks:
        """``masks`` as this model reads them: one ``Masks`` value, packed exactly when the context is."""
        if not isinstance(masks, Masks):
            raise TypeError(f"IJEPA takes one Masks value, got {type(masks).__name__}; build it with "
                            "fastjepa.mask_batch.Masks.from_lists(masks_enc, masks_pred) from the official lists")
        if (masks.packed is not None) != self.varlen_context:
            raise ValueError(f"the model's varlen_context is {self.varlen_context} but the masks are "
                             f"{'' if masks.packed is not None else 'not '}packed; use the collator of this model's "
                             "spec, or Masks.from_lists(..., packed_num_patches=N) exactly with varlen_context")
        return masks

    @torch.no_grad()
    def targets(self, images: torch.Tensor, masks: Masks) -> torch.Tensor:
        """``[M*nenc*B, Kt, D]``: layer-normalised (no affine) target-encoder features at every target block."""
        masks = self.check_masks(masks)
        h, norm = self.target_features(images)
        return target_norm_gather(h, masks.pred, masks.num_context_blocks, norm=norm)

    @torch.no_grad()
    def target_features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """The target forward's ``[B, N, D]`` output and the final LayerNorm that the loss still has to apply to
        the target tokens (it normalises only those), or None where the forward applied it (FSDP2)."""
        encoder = self.target_forward_encoder
        norm = encoder.final_norm_args()
        return encoder(images, final_norm=norm is None), norm

    def encode_context(self, images: torch.Tensor, masks: Masks) -> torch.Tensor:
        """The context encoder's output: ``[nenc*B, Kc, D]``, or packed ``[T, D]`` with variable-length context."""
        if masks.packed is not None:
            return self.encoder.forward_packed(images, masks.packed)
        return self.encoder(images, masks.enc)

    def predict(self, images: torch.Tensor, masks: Masks, context: torch.Tensor | None = None) -> torch.Tensor:
        """``[M*nenc*B, Kt, D]``: the predictor's outputs from the context encoder's view of the context blocks
        (``context``: that view, when already computed)."""
        masks = self.check_masks(masks)
        context = self.encode_context(images, masks) if context is None else context
        return self.predictor(context, masks)

    def forward(self, images: torch.Tensor, masks: Masks, step: int = 0) -> torch.Tensor:
        """Loss for a batch: images ``[B, C, H, W]`` and its ``Masks`` (from the collator, or
        ``Masks.from_lists`` of the official lists). The loss is the smooth-L1 mean over every predicted element,
        with or without variable-length context; with SIGReg, mixed with it (``step`` picks its directions)."""
        masks = self.check_masks(masks)
        h, norm = self.target_features(images)
        context = self.encode_context(images, masks)
        z = self.predictor(context, masks)
        # = smooth_l1_loss(z, self.targets(...)), without materialising the normalised targets when fused
        loss = target_norm_smooth_l1(z, h, masks.pred, masks.num_context_blocks, norm=norm)
        if self.sigreg is None:
            return loss
        reg = self.sigreg(self.sigreg_samples(context, masks), seed=self.sigreg_step_seed(step))
        self.loss_terms = (loss.detach(), reg.detach())
        return (1 - self.sigreg_weight) * loss + self.sigreg_weight * reg

    def sigreg_step_seed(self, step: int) -> int:
        """SIGReg's directions at ``step``: a function of the run's seed and the step, so every rank (and a
        resumed run) draws the same ones without communicating."""
        return self.sigreg_seed * 1_000_003 + step

    def sigreg_samples(self, context: torch.Tensor, masks: Masks) -> torch.Tensor:
        """``[N, D]``: every context token, or each context block's tokens averaged (one sample per block)."""
        if masks.packed is None:
            return context.flatten(0, 1) if self.sigreg_tokens else context.mean(1)
        if self.sigreg_tokens:
            return context
        return masks.packed.segment_mean(context)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """``target <- momentum * target + (1 - momentum) * encoder``, over every parameter (as the official loop),
        writing the replica's low-precision copy in the same pass. Nothing to do for an online target."""
        if self.online_target:
            return
        target, online, copy = self.ema_pairs()
        held = {id(layer.weight): layer for layer in self.held_fp8_layers()}
        if not held:
            ema_update(target, online, momentum, copy=copy)
            return
        # the FP8 layers' weights through the EMA that writes their e4m3 rows and scales, the rest as usual
        fp8 = [i for i, c in enumerate(copy) if id(c) in held]
        rest = [i for i in range(len(target)) if id(copy[i]) not in held]
        layers = [held[id(copy[i])] for i in fp8]
        ema_update_fp8([target[i] for i in fp8], [online[i] for i in fp8], momentum,
                       [layer.weight_e4m3 for layer in layers], [layer.weight_scale for layer in layers],
                       copy=[copy[i] for i in fp8])
        ema_update([target[i] for i in rest], [online[i] for i in rest], momentum, copy=[copy[i] for i in rest])

    def held_fp8_layers(self) -> list:
        """The FP8 replica's layers whose e4m3 weights the EMA keeps (``hold_fp8_weights``); [] without them."""
        layers = [] if self.target_replica is None else fp8_layers(self.target_replica)
        return [layer for layer in layers if layer.weight_e4m3 is not None]

    def ema_pairs(self) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter] | None]:
        """(target, online, copy): the EMA's parameter lists, paired in order, and the replica's (or None)."""
        replica = None if self.target_replica is None else list(self.target_replica.parameters())
        return list(self.target_encoder.parameters()), list(self.encoder.parameters()), replica


def _locals(params) -> list[torch.Tensor]:
    """The local tensors of (possibly FSDP2-sharded) parameters."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in params]


def objective_options(objective: Objective) -> dict:
    """IJEPA's keyword options for an ``Objective``: the target kind and SIGReg."""
    sigreg = (SIGReg(objective.sigreg_slices, objective.sigreg_points, objective.sigreg_t_max)
              if objective.sigreg_weight > 0 else None)
    return {"online_target": objective.online_target, "sigreg": sigreg,
            "sigreg_weight": objective.sigreg_weight, "sigreg_tokens": objective.sigreg_tokens,
            "sigreg_seed": objective.seed}


def build_ijepa(spec: ModelSpec) -> IJEPA:
    """The model of a run's spec (``ModelSpec.from_config``): encoder, predictor and objective."""
    encoder, predictor = build_models(spec)
    return IJEPA(encoder, predictor, varlen_context=spec.varlen_context, **objective_options(spec.objective))
