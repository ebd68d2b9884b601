"""I-JEPA in strong plain PyTorch: the step benchmark's ``pytorch`` baseline, what a careful user writes without
fastjepa. Its own modules (SDPA attention, ``torch.gather`` masks, the official predictor layout: every block on
every token), compiled per block, with fused AdamW and a ``_foreach_lerp_`` EMA in the benchmark. Parameter
names are the official ones (fastjepa's too), so every provider starts from the same weights.
"""

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, heads), MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def apply_masks(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).expand(-1, -1, x.shape[-1])) for m in masks])


def repeat_per_context(x: torch.Tensor, num_targets: int, num_contexts: int) -> torch.Tensor:
    """``[M*B, ...]`` -> ``[M*nenc*B, ...]``, rows ordered (target block, context block, image) as the predictions."""
    x = x.reshape(num_targets, 1, -1, *x.shape[1:])
    return x.expand(-1, num_contexts, *x.shape[2:]).flatten(0, 2)


class Encoder(nn.Module):
    def __init__(self, dim, depth, heads, mlp_ratio, patch, num_patches, in_chans=3):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, images: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2) + self.pos_embed
        if masks is not None:
            x = apply_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class Predictor(nn.Module):
    def __init__(self, dim, pred_dim, depth, heads, mlp_ratio, num_patches):
        super().__init__()
        self.predictor_embed = nn.Linear(dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.predictor_pos_embed = nn.Parameter(torch.zeros(1, num_patches, pred_dim), requires_grad=False)
        self.predictor_blocks = nn.ModuleList(Block(pred_dim, heads, mlp_ratio) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(pred_dim, dim)

    def forward(self, x: torch.Tensor, masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor]) -> torch.Tensor:
        batch, num_context = len(x) // len(masks_enc), x.shape[1]
        pos = self.predictor_pos_embed.expand(batch, -1, -1)
        x = self.predictor_embed(x) + apply_masks(pos, masks_enc)
        tgt = repeat_per_context(apply_masks(pos, masks_pred), len(masks_pred), len(masks_enc)) + self.mask_token
        x = torch.cat([x.repeat(len(masks_pred), 1, 1), tgt], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        return self.predictor_proj(self.predictor_norm(x[:, num_context:]))


def build(dim, depth, heads, mlp_ratio, patch, num_patches, pred_dim, pred_depth, in_chans=3):
    """(encoder, target encoder, predictor)."""
    encoder = Encoder(dim, depth, heads, mlp_ratio, patch, num_patches, in_chans)
    target = Encoder(dim, depth, heads, mlp_ratio, patch, num_patches, in_chans).requires_grad_(False)
    return encoder, target, Predictor(dim, pred_dim, pred_depth, heads, mlp_ratio, num_patches)


def loss(encoder, target, predictor, images, masks_enc, masks_pred) -> torch.Tensor:
    with torch.no_grad():
        h = target(images)
        h = F.layer_norm(h, (h.shape[-1],))
        h = repeat_per_context(apply_masks(h, masks_pred), len(masks_pred), len(masks_enc))
    z = predictor(encoder(images, masks_enc), masks_enc, masks_pred)
    return F.smooth_l1_loss(z, h)
