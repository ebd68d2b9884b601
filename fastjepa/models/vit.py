"""ViT encoder with the official I-JEPA structure, initialisation and parameter names (also timm's)."""

import torch
from torch import nn

from fastjepa.choices import VIT_SIZES
from fastjepa.kernels import masked_gather
from fastjepa.mask_batch import PackedContext
from fastjepa.models.pos_embed import sincos_2d
from fastjepa.modules.block import Block


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
        # a low-precision copy of a model (the bf16 target replica) takes fp32 images outside autocast too
        return self.proj(x.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


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

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, N, D]`` patch embeddings (without the positional embedding)."""
        x = self.patch_embed(x)
        if x.shape[1] != self.num_patches:
            raise ValueError(f"input gives {x.shape[1]} patches, the model was built for {self.num_patches} "
                             f"(grid {self.grid[0]}x{self.grid[1]} of {self.patch_size}px patches)")
        return x

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None, final_norm: bool = True) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, N, D]``; with masks (``[M, B, K]`` indices, ``Masks.enc``) -> ``[M*B, K, D]``,
        the tokens at those positions only. ``final_norm=False`` leaves the last LayerNorm to the caller (the I-JEPA
        loss applies it to the target tokens only: ``final_norm_args``)."""
        x = self.embed(x)
        # the activations keep their dtype (bf16 under autocast) next to the fp32 positional embedding
        x = x + self.pos_embed.to(x.dtype) if masks is None else masked_gather(x, masks, self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) if final_norm else x

    def final_norm_args(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(weight, bias, eps)`` of the final LayerNorm for a caller that fuses it (``forward(final_norm=False)``),
        or None where it must run inside ``forward``: under FSDP2 the weights are sharded again after it."""
        if hasattr(self.norm.weight, "to_local"):
            return None
        return self.norm.weight, self.norm.bias, self.norm.eps

    def forward_packed(self, x: torch.Tensor, packed: PackedContext) -> torch.Tensor:
        """``[B, C, H, W]`` -> packed ``[T, D]``: the variable-length context blocks of ``packed``, one sequence each
        (no FLOP on padding)."""
        x = self.embed(x)
        batch, num_patches, dim = x.shape
        if (batch, num_patches) != (packed.batch, packed.num_patches):
            raise ValueError(f"forward_packed: images give {batch} x {num_patches} patches, the packed context was "
                             f"built for {packed.batch} x {packed.num_patches}")
        x = (x + self.pos_embed.to(x.dtype)).reshape(-1, dim)[packed.index]
        for blk in self.blocks:
            x = blk(x, cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen)
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
