"""Pre-norm ViT block with the official I-JEPA (and timm) parameter names."""

import torch
from torch import nn

from fastjepa.modules.attention import Attention


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_backend: str = "sdpa", norm_eps: float = 1e-6, block_attn_backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=attn_backend, block_backend=block_attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0, *,
                queries_from: int = 0, context_len: int = 0, num_target_blocks: int = 0) -> torch.Tensor:
        """``[B, N, D]`` -> ``[B, N, D]``, or any layout of ``Attention.forward``: packed ``[T, D]`` sequences
        (``cu_seqlens``), the outputs of tokens ``queries_from:`` only (``[B, N - queries_from, D]``: attention
        queries, residual and MLP for those tokens alone), or the block-structured shared-context layout."""
        attn = self.attn(self.norm1(x), cu_seqlens, max_seqlen, queries_from=queries_from, context_len=context_len,
                         num_target_blocks=num_target_blocks)
        x = (x[:, queries_from:] if queries_from else x) + attn
        return x + self.mlp(self.norm2(x))
