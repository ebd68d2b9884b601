"""nn.Module drop-ins: attention with backends, the ViT block, and modules over the fused ops."""

from fastjepa.modules.attention import Attention
from fastjepa.modules.block import MLP, Block
from fastjepa.modules.ema import EMAUpdater
from fastjepa.modules.gather import MaskedGather, PredictorTokens, TargetNormGather, TargetNormSmoothL1Loss

__all__ = [
    "Attention",
    "Block",
    "EMAUpdater",
    "MLP",
    "MaskedGather",
    "PredictorTokens",
    "TargetNormGather",
    "TargetNormSmoothL1Loss",
]
