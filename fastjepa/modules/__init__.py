"""nn.Module drop-ins: attention with backends, the ViT block, modules over the fused ops, and SIGReg."""

from fastjepa.modules.attention import Attention
from fastjepa.modules.block import MLP, Block
from fastjepa.modules.ema import EMAUpdater
from fastjepa.modules.gather import MaskedGather, PredictorTokens, TargetNormGather, TargetNormSmoothL1Loss
from fastjepa.modules.sigreg import SIGReg

__all__ = [
    "Attention",
    "Block",
    "EMAUpdater",
    "MLP",
    "MaskedGather",
    "PredictorTokens",
    "SIGReg",
    "TargetNormGather",
    "TargetNormSmoothL1Loss",
]
