"""nn.Module drop-ins: attention with backends, the ViT block, and modules over the fused ops."""

from fastjepa.modules.attention import ATTENTION_BACKENDS, Attention
from fastjepa.modules.block import MLP, Block
from fastjepa.modules.ema import EMAUpdater
from fastjepa.modules.gather import MaskedGather, PredictorTokens, TargetNormGather, TargetNormSmoothL1Loss

__all__ = [
    "ATTENTION_BACKENDS",
    "Attention",
    "Block",
    "EMAUpdater",
    "MLP",
    "MaskedGather",
    "PredictorTokens",
    "TargetNormGather",
    "TargetNormSmoothL1Loss",
]
