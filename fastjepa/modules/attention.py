"""Multi-head self-attention with selectable backends and the official I-JEPA parameter names."""

import torch
from torch import nn

# The backends (sdpa, pinned SDPA kernels, flash-attn, xformers, math, auto) live in attention_backends.
from fastjepa.modules.attention_backends import BACKENDS as ATTENTION_BACKENDS
from fastjepa.modules.attention_backends import (  # noqa: F401 (attention_math re-exported)
    attention,
    attention_math,
    varlen_attention,
)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0) -> torch.Tensor:
        """``[B, N, C]``; or, with ``cu_seqlens`` (int ``[S + 1]``), packed sequences ``[T, C]`` that attend only
        within themselves (variable-length context, ``fastjepa.models.varlen``)."""
        if cu_seqlens is not None:
            T, C = x.shape
            q, k, v = self.qkv(x).reshape(T, 3, self.num_heads, self.head_dim).unbind(1)
            backend = "math" if self.backend == "math" else "auto"
            return self.proj(varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.scale, backend).reshape(T, C))
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, self.scale, self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))
