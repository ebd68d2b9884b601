"""ViT encoder with the official I-JEPA structure, initialisation and parameter names (also timm's)."""

import torch
from torch import nn

from fastjepa.kernels import masked_gather
from fastjepa.models.pos_embed import sincos_2d
from fastjepa.models.varlen import PackedContext, encoder_forward_varlen
from fastjepa.modules.block import Block

# name: (embed_dim, depth, num_heads, mlp_ratio), the official sizes.
VIT_SIZES = {
    "vit_micro": (64, 4, 4, 4.0),  # not an official size: the CPU demo (MNIST) and fast tests
    "vit_mini": (192, 4, 4, 4.0),  # not an official size: vit_tiny's width at depth 4, the MNIST CPU demo encoder
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1408, 40, 16, 48 / 11),
}


def init_official_(module: nn.Module, std: float = 0.02) -> None:
    """The initialisation an official run ends up with: truncated normal (std 0.02) for every Linear and Conv2d
    weight, zero biases, unit LayerNorms. The official models also rescale each block's output projections by
    1/sqrt(2 * layer), but ``init_model`` re-initialises every Linear afterwards, which undoes it."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def grid_size(img_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size={patch_size}")
    return h // patch_size, w // patch_size


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, attn_backend: str = "sdpa", init_std: float = 0.02):
        super().__init__()
        self.grid = grid_size(img_size, patch_size)
        self.patch_size = patch_size
        self.num_patches = self.grid[0] * self.grid[1]
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        # A parameter (not a buffer) so that state dicts and optimizer param indices match the official ones.
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, *self.grid).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, attn_backend) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_official_(self, init_std)

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | torch.Tensor | PackedContext | None = None
                ) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, N, D]``; with masks (one or a list of M ``[B, K]``) -> ``[M*B, K, D]``; with
        a ``PackedContext`` (variable-length context) -> packed ``[T, D]``."""
        if isinstance(masks, PackedContext):
            return encoder_forward_varlen(self, x, masks)
        x = self.patch_embed(x)
        if x.shape[1] != self.num_patches:
            raise ValueError(f"input gives {x.shape[1]} patches, the model was built for {self.num_patches} "
                             f"(grid {self.grid[0]}x{self.grid[1]} of {self.patch_size}px patches)")
        if masks is None:
            x = x + self.pos_embed
        else:
            x = masked_gather(x, masks, self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def _make(name: str):
    def constructor(patch_size: int = 16, img_size: int | tuple[int, int] = 224, **kwargs) -> VisionTransformer:
        dim, depth, heads, mlp_ratio = VIT_SIZES[name]
        kwargs = {"embed_dim": dim, "depth": depth, "num_heads": heads, "mlp_ratio": mlp_ratio, **kwargs}
        return VisionTransformer(img_size=img_size, patch_size=patch_size, **kwargs)

    constructor.__name__ = name
    constructor.__doc__ = f"{name}: width {VIT_SIZES[name][0]}, depth {VIT_SIZES[name][1]}, {VIT_SIZES[name][2]} heads."
    return constructor


vit_micro, vit_mini, vit_tiny, vit_small, vit_base, vit_large, vit_huge, vit_giant = (_make(n) for n in VIT_SIZES)
