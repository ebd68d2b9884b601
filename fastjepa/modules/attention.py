"""Multi-head self-attention with selectable backends and the official I-JEPA parameter names.

One module, four layouts of its input, each a method of its own (``forward`` dispatches on the keyword arguments,
so hooks, activation checkpointing and ``torch.compile`` see every call through the module):

- dense ``[B, N, C]`` (the default);
- packed sequences ``[T, C]`` delimited by ``cu_seqlens`` (variable-length context);
- ``queries_from=k``: every token is a key and value, only tokens ``k:`` are queries (the predictor's last block,
  which only needs the mask tokens' outputs);
- ``context_len, num_target_blocks``: the shared-context predictor's block-structured attention
  (``fastjepa.kernels.block_attention``).
"""

import torch
import torch.nn.functional as F
from torch import nn

from fastjepa.choices import ATTENTION_BACKENDS, BLOCK_ATTENTION_BACKENDS
from fastjepa.kernels.block_attention import block_attention
from fastjepa.modules.attention_backends import attention, auto_timings, resolve, varlen_attention


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa",
                 block_backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
        if block_backend not in BLOCK_ATTENTION_BACKENDS:
            raise ValueError(f"unknown block-attention backend {block_backend!r}; choose one of "
                             f"{BLOCK_ATTENTION_BACKENDS}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.block_backend = block_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def resolve_backend(self, batch: int, seq_len: int, device, dtype: torch.dtype,
                        grad: bool) -> tuple[str, dict[str, float | str]]:
        """Replace ``auto`` by the backend that is fastest for this module at ``batch`` sequences of ``seq_len``
        tokens, with the backward when ``grad`` (timed once per shape bucket on a GPU; ``sdpa`` on CPU); returns it
        and the timings behind it. Done before compiling, so a compiled block reads a plain name: it never times
        candidates or re-traces."""
        if self.backend != "auto":
            return self.backend, {}
        shape = (batch, self.num_heads, seq_len, self.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
        with torch.set_grad_enabled(grad):
            self.backend = resolve("auto", q, k, v, self.scale)
        return self.backend, auto_timings(q, k, grad)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0, *,
                queries_from: int = 0, context_len: int = 0, num_target_blocks: int = 0) -> torch.Tensor:
        """``[B, N, C]`` -> ``[B, N, C]``; the other layouts as the module docstring lists them."""
        if cu_seqlens is not None:
            return self.forward_packed(x, cu_seqlens, max_seqlen)
        if queries_from:
            return self.forward_queries_from(x, queries_from)
        if num_target_blocks:
            return self.forward_block_structured(x, context_len, num_target_blocks)
        return self.forward_qkv(self.qkv(x))

    def forward_qkv(self, qkv: torch.Tensor) -> torch.Tensor:
        """The dense layout from its ``[B, N, 3C]`` qkv projection (an FP8 block computes it from e4m3 rows)."""
        batch, seq_len, width = qkv.shape
        q, k, v = qkv.reshape(batch, seq_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, self.scale, self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, seq_len, width // 3))

    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Packed sequences ``[T, C]`` that attend only within themselves (``fastjepa.mask_batch.PackedContext``)."""
        total, dim = x.shape
        q, k, v = self.qkv(x).reshape(total, 3, self.num_heads, self.head_dim).unbind(1)
        backend = "math" if self.backend == "math" else "auto"
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.scale, backend)
        return self.proj(out.reshape(total, dim))

    def forward_queries_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """``[B, N, C]`` -> ``[B, N - start, C]``: the outputs of tokens ``start:`` only (q for those tokens alone)."""
        batch, seq_len, dim = x.shape
        w_q, w_kv = self.qkv.weight.split([dim, 2 * dim])
        b_q, b_kv = self.qkv.bias.split([dim, 2 * dim]) if self.qkv.bias is not None else (None, None)
        q = F.linear(x[:, start:], w_q, b_q).reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = F.linear(x, w_kv, b_kv).reshape(batch, seq_len, 2, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4)
        out = attention(q, k, v, self.scale, self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, -1, dim))

    def forward_block_structured(self, x: torch.Tensor, context_len: int, num_target_blocks: int) -> torch.Tensor:
        """``[B, Lc + M*Lt, C]`` laid out ``[context; block 1; ...; block M]``: context queries see the context,
        the queries of block m see the context and block m."""
        batch, seq_len, dim = x.shape
        qkv = self.qkv(x).reshape(batch, seq_len, 3, self.num_heads, self.head_dim)
        out = block_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], context_len, num_target_blocks, self.scale,
                              self.block_backend)
        return self.proj(out.reshape(batch, seq_len, dim))
