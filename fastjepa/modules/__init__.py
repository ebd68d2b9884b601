"""nn.Module drop-ins: attention with backends, the ViT block, and modules over the fused ops."""

from fastjepa.modules.attention import ATTENTION_BACKENDS, Attention
from fastjepa.modules.block import MLP, Block

__all__ = ["ATTENTION_BACKENDS", "Attention", "Block", "MLP"]
