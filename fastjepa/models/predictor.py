"""The I-JEPA predictor: a narrow ViT that maps context tokens + mask tokens to target features."""

import torch
from torch import nn

from fastjepa.kernels import predictor_tokens
from fastjepa.models.pos_embed import sincos_2d
from fastjepa.models.shared_context import LAYOUTS, predictor_forward
from fastjepa.models.varlen import PackedContext, predictor_forward_varlen
from fastjepa.models.vit import init_official_
from fastjepa.modules.block import Block


class VisionTransformerPredictor(nn.Module):
    def __init__(self, num_patches: int | tuple[int, int], embed_dim: int = 768, predictor_embed_dim: int = 384,
                 depth: int = 6, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_backend: str = "sdpa", init_std: float = 0.02, layout: str = "repeat"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown predictor layout {layout!r}; choose one of {LAYOUTS}")
        # How forward lays out the mask-token attention (fastjepa.models.shared_context): "repeat" computes what
        # "official" computes with a cheaper last block; "shared" (opt-in) computes the context once.
        self.layout = layout
        self.block_attention_provider = "auto"
        self.compile_backend: str | None = None
        if isinstance(num_patches, int):
            side = round(num_patches**0.5)
            if side * side != num_patches:
                raise ValueError(f"num_patches={num_patches} is not a square grid: pass (grid_h, grid_w)")
            num_patches = (side, side)
        self.grid = tuple(num_patches)
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        self.predictor_pos_embed = nn.Parameter(
            sincos_2d(predictor_embed_dim, *self.grid).unsqueeze(0), requires_grad=False
        )
        self.predictor_blocks = nn.ModuleList(
            Block(predictor_embed_dim, num_heads, mlp_ratio, qkv_bias, attn_backend) for _ in range(depth)
        )
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)
        nn.init.trunc_normal_(self.mask_token, std=init_std, a=-2.0, b=2.0)
        init_official_(self, init_std)

    def forward(self, x: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        """Context ``[nenc*B, Kc, D]`` -> predictions ``[M*nenc*B, Kt, D]`` for every target block, in the order
        of ``fastjepa.kernels.target_norm_gather``'s targets. With a ``PackedContext`` as ``masks_enc``, ``x`` is
        the packed ``[T, D]`` context (variable-length context, repeat layout)."""
        if isinstance(masks_enc, PackedContext):
            return predictor_forward_varlen(self, x, masks_enc, masks_pred)
        if self.layout == "official":
            return self.forward_official(x, masks_enc, masks_pred)
        return predictor_forward(self, x, masks_enc, masks_pred, self.layout, self.block_attention_provider,
                                 self.compile_backend)

    def forward_official(self, x: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        """The official computation, step by step: every block runs on every token."""
        num_context = x.shape[1]
        x = predictor_tokens(self.predictor_embed(x), masks_enc, masks_pred, self.mask_token,
                             self.predictor_pos_embed)
        for blk in self.predictor_blocks:
            x = blk(x)
        x = self.predictor_norm(x)
        return self.predictor_proj(x[:, num_context:])
