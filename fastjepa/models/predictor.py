"""The I-JEPA predictor: a narrow ViT that maps context tokens + mask tokens to target features.

How it lays out the mask-token attention is its ``layout`` (a constructor argument, ``fastjepa.predictor_layout``
in the config). Every layout returns ``[M*nenc*B, Kt, D]`` in the official order (target block major) from the
same weights and state dict, and every block runs through its module (so activation checkpointing, compile and
per-block FSDP2 cover all of them):

- ``repeat`` (default, the official method): the context is repeated once per target block, M sequences of
  ``Kc + Kt`` tokens per image, full attention; the last block computes queries, the MLP and the final
  norm/projection only for the target tokens, the only ones read out. Identical results to ``official``.
- ``official``: every block on every token, as the official code.
- ``shared`` (opt-in, changes the method): one sequence per (image, context block),
  ``[context; targets of block 1; ...; block M]``. Context tokens attend to the context only; the mask tokens of
  block m attend to the context and to block m (``fastjepa.kernels.block_attention``). The context is computed
  once instead of M times: per image ``Kc + M*Kt`` tokens instead of ``M*(Kc + Kt)``. With one predictor block
  both layouts give the same predictions; deeper, the official context tokens also see block m's mask tokens,
  which here they do not. The loss is unchanged.

With ``masks.packed`` it runs the variable-length context (``fastjepa.mask_batch.PackedContext``): for every
target block m and image, ``[that image's whole context; block m's mask tokens]`` as one packed sequence (the
official layout without a common context length). Loss weighting is unchanged: target blocks keep one size per
batch, so every image and target block weighs the same as in the official loss.
"""

import torch
from torch import nn

from fastjepa.choices import PREDICTOR_LAYOUTS
from fastjepa.kernels import mask_index, predictor_tokens
from fastjepa.mask_batch import Masks, PackedContext
from fastjepa.models.pos_embed import sincos_2d
from fastjepa.models.vit import init_official_
from fastjepa.modules.block import Block


class VisionTransformerPredictor(nn.Module):
    def __init__(self, num_patches: int | tuple[int, int], embed_dim: int = 768, predictor_embed_dim: int = 384,
                 depth: int = 6, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_backend: str = "sdpa", init_std: float = 0.02, layout: str = "repeat",
                 block_attn_backend: str = "auto"):
        super().__init__()
        if layout not in PREDICTOR_LAYOUTS:
            raise ValueError(f"unknown predictor layout {layout!r}; choose one of {PREDICTOR_LAYOUTS}")
        self.layout = layout
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
            Block(predictor_embed_dim, num_heads, mlp_ratio, qkv_bias, attn_backend,
                  block_attn_backend=block_attn_backend) for _ in range(depth)
        )
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)
        nn.init.trunc_normal_(self.mask_token, std=init_std, a=-2.0, b=2.0)
        init_official_(self, init_std)

    def forward(self, x: torch.Tensor, masks: Masks) -> torch.Tensor:
        """Context ``[nenc*B, Kc, D]`` (packed ``[T, D]`` with ``masks.packed``) -> predictions
        ``[M*nenc*B, Kt, D]`` for every target block, in the order of ``fastjepa.kernels.target_norm_gather``'s
        targets."""
        if not isinstance(masks, Masks):
            raise TypeError(f"the predictor takes one Masks value, got {type(masks).__name__}; build it from the "
                            "official lists with fastjepa.mask_batch.Masks.from_lists(masks_enc, masks_pred)")
        if masks.packed is not None:
            return self.forward_packed(x, masks.packed, masks.pred)
        masks_enc, masks_pred = masks.enc, masks.pred
        if self.layout == "official":
            return self.forward_official(x, masks_enc, masks_pred)
        if self.layout == "repeat":
            return self.forward_repeat(x, masks_enc, masks_pred)
        return self.forward_shared(x, masks_enc, masks_pred)

    def _tokens(self, x: torch.Tensor, masks_enc: torch.Tensor, masks_pred: torch.Tensor) -> torch.Tensor:
        return predictor_tokens(self.predictor_embed(x), masks_enc, masks_pred, self.mask_token,
                                self.predictor_pos_embed)

    def _readout(self, h: torch.Tensor) -> torch.Tensor:
        return self.predictor_proj(self.predictor_norm(h))

    def forward_official(self, x: torch.Tensor, masks_enc: torch.Tensor, masks_pred: torch.Tensor) -> torch.Tensor:
        """The official computation, step by step: every block runs on every token."""
        num_context = x.shape[1]
        h = self._tokens(x, masks_enc, masks_pred)
        for blk in self.predictor_blocks:
            h = blk(h)
        return self._readout(h[:, num_context:])

    def forward_repeat(self, x: torch.Tensor, masks_enc: torch.Tensor, masks_pred: torch.Tensor) -> torch.Tensor:
        """The official result; the last block computes the target tokens' outputs only."""
        num_context = x.shape[1]
        h = self._tokens(x, masks_enc, masks_pred)
        *blocks, last = self.predictor_blocks
        for blk in blocks:
            h = blk(h)
        return self._readout(last(h, queries_from=num_context))

    def shared_tokens(self, x: torch.Tensor, masks_enc: torch.Tensor, masks_pred: torch.Tensor) -> torch.Tensor:
        """``[nenc*B, Kc + M*Kt, Dp]``: embedded context (+ pos) then the mask tokens (+ pos) of every target
        block, the input of the ``shared`` layout."""
        dim = self.mask_token.shape[-1]
        pos = self.predictor_pos_embed.reshape(-1, dim)
        masks_enc = mask_index(masks_enc, masks_enc.shape[1], len(pos), "predictor", "masks_enc")
        masks_pred = mask_index(masks_pred, masks_enc.shape[1], len(pos), "predictor", "masks_pred")
        ctx = self.predictor_embed(x)
        ctx = ctx + pos[masks_enc.reshape(-1, masks_enc.shape[-1])].to(ctx.dtype)
        tgt = self.mask_token.reshape(1, 1, dim) + pos[masks_pred.permute(1, 0, 2).flatten(1)]  # [B, M*Kt, Dp]
        return torch.cat([ctx, tgt.repeat(masks_enc.shape[0], 1, 1).to(ctx.dtype)], dim=1)

    def forward_shared(self, x: torch.Tensor, masks_enc: torch.Tensor, masks_pred: torch.Tensor) -> torch.Tensor:
        """The ``shared`` layout: the context computed once per image and context block."""
        num_context, (num_target_blocks, _, target_len) = x.shape[1], masks_pred.shape
        h = self.shared_tokens(x, masks_enc, masks_pred)
        for blk in self.predictor_blocks:
            h = blk(h, context_len=num_context, num_target_blocks=num_target_blocks)
        rows, _, dim = h.shape
        h = h[:, num_context:].reshape(rows, num_target_blocks, target_len, dim).transpose(0, 1)
        return self._readout(h.reshape(-1, target_len, dim))

    def forward_packed(self, z: torch.Tensor, packed: PackedContext, masks_pred: torch.Tensor) -> torch.Tensor:
        """Packed context ``z`` ``[T, D]`` (``VisionTransformer.forward_packed``) -> ``[M*nenc*B, Kt, D]`` in the
        official row order."""
        dim = self.mask_token.shape[-1]
        pos = self.predictor_pos_embed.reshape(-1, dim)
        masks_pred = mask_index(masks_pred, packed.batch, len(pos), "predictor", "masks_pred")
        ctx = self.predictor_embed(z)
        ctx = ctx + pos[packed.index % packed.num_patches].to(ctx.dtype)
        tgt = self.mask_token.reshape(1, dim) + pos[masks_pred.reshape(-1)]  # rows (m, b, k)
        h = torch.cat([ctx, tgt.to(ctx.dtype)])[packed.predictor_index]
        for blk in self.predictor_blocks:
            h = blk(h, cu_seqlens=packed.predictor_cu_seqlens, max_seqlen=packed.predictor_max_seqlen)
        return self._readout(h[packed.target_index])
