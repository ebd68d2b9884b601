"""Pre-norm ViT block with the official I-JEPA (and timm) parameter names.

Its memory-bound half (residual add, LayerNorm, fc1's bias and GELU) runs in one of two implementations, the
block's ``impl``: ``"compile"``, the PyTorch ops as written (fused by torch.compile when the blocks are compiled),
or ``"fused"``, fastjepa's kernels (``fastjepa.kernels.add_layer_norm`` and ``bias_gelu``). ``resolve_impl`` picks
the faster by timing both at the run's shapes (``fastjepa.block_impl: auto``). In an FP8 target block (its Linear
layers ``Float8Linear``) the fused implementation is ``forward_fp8``: both LayerNorms and the GELU emit the e4m3
rows and scales of the next GEMM's input (``fastjepa.kernels.block_ops_fp8``) and fc1's bias is in its epilogue.
"""

import torch
import torch.nn.functional as F
from torch import nn

from fastjepa.choices import BLOCK_IMPLS
from fastjepa.kernels import add_layer_norm, bias_gelu
from fastjepa.kernels.block_ops_fp8 import gelu_fp8, layer_norm_fp8
from fastjepa.modules.attention import Attention
from fastjepa.modules.fp8 import Float8Linear
from fastjepa.timing import fastest


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The same function with fc1 run without its bias and the bias added in the GELU's one pass."""
        if type(self.fc1) is not nn.Linear:  # e.g. torchao's FP8 layers, which train through their own GEMMs
            raise TypeError(f"the fused MLP runs fc1 as a plain matmul; its {type(self.fc1).__name__} runs with "
                            "impl='compile'")
        return self.fc2(bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_backend: str = "sdpa", norm_eps: float = 1e-6, block_attn_backend: str = "auto",
                 impl: str = "compile"):
        super().__init__()
        if impl not in BLOCK_IMPLS[1:]:
            raise ValueError(f"unknown block implementation {impl!r}; choose one of {BLOCK_IMPLS[1:]}")
        self.impl = impl
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=attn_backend, block_backend=block_attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0, *,
                queries_from: int = 0, context_len: int = 0, num_target_blocks: int = 0) -> torch.Tensor:
        """``[B, N, D]`` -> ``[B, N, D]``, or any layout of ``Attention.forward``: packed ``[T, D]`` sequences
        (``cu_seqlens``), the outputs of tokens ``queries_from:`` only (``[B, N - queries_from, D]``: attention
        queries, residual and MLP for those tokens alone), or the block-structured shared-context layout."""
        if self.e4m3_activations and cu_seqlens is None and not (queries_from or num_target_blocks):
            return self.forward_fp8(x)
        attn = self.attn(self.norm1(x), cu_seqlens, max_seqlen, queries_from=queries_from, context_len=context_len,
                         num_target_blocks=num_target_blocks)
        return self.residual_mlp(x[:, queries_from:] if queries_from else x, attn, self.impl)

    @property
    def e4m3_activations(self) -> bool:
        """An FP8 (target) block in the fused implementation: its GEMM inputs leave the fused ops in e4m3."""
        return self.impl == "fused" and isinstance(self.mlp.fc1, Float8Linear)

    @torch.no_grad()
    def forward_fp8(self, x: torch.Tensor) -> torch.Tensor:
        """The dense forward of an FP8 block (no gradient: the target's): norm1 straight into qkv's e4m3 input,
        then ``residual_mlp`` fused."""
        _, x8, x_scale = layer_norm_fp8(x, self.norm1.weight, self.norm1.bias, self.norm1.eps)
        return self.residual_mlp(x, self.attn.forward_qkv(self.attn.qkv.forward_e4m3(x8, x_scale)), "fused")

    def residual_mlp(self, x: torch.Tensor, attn: torch.Tensor, impl: str) -> torch.Tensor:
        """``s + mlp(norm2(s))`` with ``s = x + attn``: the block after its attention, in implementation ``impl``."""
        if impl == "compile":
            x = x + attn
            return x + self.mlp(self.norm2(x))
        if isinstance(self.mlp.fc1, Float8Linear):  # the residual add, norm2 and GELU emit fc1's and fc2's e4m3 input
            s, h8, h_scale = layer_norm_fp8(x, self.norm2.weight, self.norm2.bias, self.norm2.eps, y=attn)
            g8, g_scale = gelu_fp8(self.mlp.fc1.forward_e4m3(h8, h_scale))
            return s + self.mlp.fc2.forward_e4m3(g8, g_scale)
        packed = x.dim() == 2  # [T, D] packed sequences: one batch row for the kernel
        s, h = add_layer_norm(x.unsqueeze(0) if packed else x, attn.unsqueeze(0) if packed else attn,
                              self.norm2.weight, self.norm2.bias, self.norm2.eps)
        out = s + self.mlp.forward_fused(h)
        return out.squeeze(0) if packed else out

    def resolve_impl(self, impl: str, rows: int, seq_len: int, dtype: torch.dtype, grad: bool,
                     compiler=None) -> tuple[str, dict[str, float | str]]:
        """Set ``impl`` and return it with the timings behind it: ``"auto"`` times ``residual_mlp`` in both
        implementations on ``rows`` sequences of ``seq_len`` random tokens (forward, and backward when ``grad``),
        ``"compile"`` through ``torch.compile(backend=compiler)`` when the blocks are compiled, on this block's
        CUDA device; elsewhere (CPU), or when fc1 trains through torchao's FP8 layers, it is ``"compile"`` without
        timing. An FP8 block's fused implementation also quantises norm1's output for qkv, so there the whole block
        is timed."""
        if impl not in BLOCK_IMPLS:
            raise ValueError(f"fastjepa.block_impl={impl!r}: choose one of {BLOCK_IMPLS}")
        device = self.norm2.weight.device
        if impl != "auto" or device.type != "cuda" or type(self.mlp.fc1) not in (nn.Linear, Float8Linear):
            self.impl = "compile" if impl == "auto" else impl
            return self.impl, {}
        shape = (rows, seq_len, self.norm2.weight.shape[0])
        x, attn = (torch.randn(shape, device=device, dtype=dtype, requires_grad=grad) for _ in range(2))
        # the weight gradients are timed but returned, not accumulated into the block's .grad (the first step's)
        wrt = [x, attn, *(p for p in self.parameters() if p.requires_grad)]
        whole = isinstance(self.mlp.fc1, Float8Linear)
        candidates = {}
        for name in BLOCK_IMPLS[1:]:
            def probe(x, attn, name=name):
                if not whole:
                    return self.residual_mlp(x, attn, name)
                if name == "fused":  # the whole FP8 block computes its own attention
                    return self.forward_fp8(x)
                return self.residual_mlp(x, self.attn(self.norm1(x)), "compile")

            run = torch.compile(probe, backend=compiler) if compiler is not None and name == "compile" else probe

            def once(run=run):
                with torch.autocast("cuda", dtype, enabled=dtype != torch.float32), torch.set_grad_enabled(grad):
                    out = run(x, attn)
                    if grad:
                        torch.autograd.grad(out, wrt, out.detach(), allow_unused=True)

            candidates[name] = once
        best, times = fastest(candidates)
        self.impl = best or "compile"
        return self.impl, times
