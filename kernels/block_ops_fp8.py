"""The FP8 target forward's activations leaving the ops before its GEMMs already in e4m3 (forward only: the target
encoder runs without autograd).

With ``fastjepa.fp8: target`` each of a block's four Linear layers multiplies e4m3 rows with one scale per token
(``fastjepa.modules.fp8``). Quantising an activation as its own step costs a read of the bf16 tensor for the row
maxima and another to scale and cast it; here the op that produces the activation does it while the row is still in
registers:

- ``layer_norm_fp8(x, w, b, y=None)``: (``s = x + y`` when ``y`` is given,) ``LayerNorm(s)`` in fp32, its row
  maximum, the row scale ``amax / 448`` and the row in e4m3: the inputs of qkv (norm1) and fc1 (norm2, after the
  attention's residual add);
- ``gelu_fp8(h)``: the exact GELU of fc1's output (its bias added in the GEMM's epilogue) in fp32, quantised the
  same way for fc2.

Each equals ``quantize_rowwise`` (``fastjepa.kernels.ema_fp8``) of the fp32 result (the references beside them).
One program per row; rows up to 16K elements (ViT-H's fc1 output has 5120). The interpreter's e4m3 cast is wrong at
binade boundaries (31.9 -> 16): CPU tests account for it, the GPU test checks bit for bit.

No GPU has timed these yet: they run inside the fused block (``Block.forward_fp8``), which ``block_impl: auto``
chooses only where it measured faster than torch.compile's fusion of the same ops at the target's shapes.
"""

import torch
import torch.nn.functional as F

from fastjepa.kernels._utils import next_power_of_2, op_or_launcher, tl, triton, use_triton
from fastjepa.kernels.ema_fp8 import E4M3, quantize_rowwise


def layer_norm_fp8_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
                       y: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Reference: ``(s, e4m3 rows, [rows, 1] scales)`` of ``layer_norm(s)`` in fp32, ``s = x + y`` (None without
    ``y``, when ``s`` is ``x``)."""
    s = x if y is None else x + y
    h = F.layer_norm(s.float(), (s.shape[-1],), weight.float(), bias.float(), eps)
    q, scale = quantize_rowwise(h.reshape(-1, h.shape[-1]))
    return (None if y is None else s), q.view(h.shape), scale


def gelu_fp8_ref(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``(e4m3 rows, [rows, 1] scales)`` of the exact GELU of ``h`` in fp32."""
    q, scale = quantize_rowwise(F.gelu(h.float()).reshape(-1, h.shape[-1]))
    return q.view(h.shape), scale


@triton.jit
def _quantize_row(v, m, q, scale, row, off):
    # v: one fp32 row (zero outside the mask m): its scale amax / 448 and the row in e4m3, as quantize_rowwise
    b_scale = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12) / 448.0
    b_q = tl.minimum(tl.maximum(tl.math.div_rn(v, b_scale), -448.0), 448.0)
    tl.store(q + off, b_q.to(q.dtype.element_ty), mask=m)
    tl.store(scale + row, b_scale)


@triton.jit
def _ln_fp8_kernel(x, y, w, b, s, q, scale, L, sxb, sxl, D, eps, HAS_Y: tl.constexpr, BLOCK_D: tl.constexpr):
    # x may be a [B, L, D] view with strides (sxb, sxl, 1); y, s, q are contiguous [M, D]
    row = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m = o_d < D
    off = row * D + o_d
    b_s = tl.load(x + (row // L) * sxb + (row % L) * sxl + o_d, mask=m, other=0).to(tl.float32)
    if HAS_Y:
        b_s = (b_s + tl.load(y + off, mask=m, other=0).to(tl.float32)).to(s.dtype.element_ty)
        tl.store(s + off, b_s, mask=m)
        b_s = b_s.to(tl.float32)  # normalise s as stored, as the unfused ops do
    b_mean = tl.sum(b_s, axis=0) / D
    b_c = tl.where(m, b_s - b_mean, 0.0)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_c * b_c, axis=0) / D + eps)
    b_w = tl.load(w + o_d, mask=m, other=0).to(tl.float32)
    b_b = tl.load(b + o_d, mask=m, other=0).to(tl.float32)
    _quantize_row(tl.where(m, b_c * b_rstd * b_w + b_b, 0.0), m, q, scale, row, off)


@triton.jit
def _gelu_fp8_kernel(h, q, scale, D, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m = o_d < D
    off = row * D + o_d
    b_v = tl.load(h + off, mask=m, other=0).to(tl.float32)
    _quantize_row(0.5 * b_v * (1.0 + tl.math.erf(b_v * 0.7071067811865476)), m, q, scale, row, off)


# sm_90 compile check (tests/kernels/test_compile.py): bf16 activations, fp32 LayerNorm parameters, ViT-H widths.
COMPILE_SPECS = {
    "layer_norm_fp8": (
        _ln_fp8_kernel,
        {"x": "*bf16", "y": "*bf16", "w": "*fp32", "b": "*fp32", "s": "*bf16", "q": "*fp8e4nv", "scale": "*fp32",
         "L": "i32", "sxb": "i64", "sxl": "i64", "D": "i32", "eps": "fp32"},
        {"HAS_Y": True, "BLOCK_D": 2048}),
    "gelu_fp8": (_gelu_fp8_kernel, {"h": "*bf16", "q": "*fp8e4nv", "scale": "*fp32", "D": "i32"}, {"BLOCK_D": 8192}),
}


def _warps(block_d: int) -> int:
    return 16 if block_d >= 8192 else 8 if block_d >= 2048 else 4


def layer_norm_fp8_fwd(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, L, D]`` x (any strides with a unit last one), contiguous y or None -> (s, or an empty tensor without
    y; e4m3 ``[B, L, D]``; fp32 ``[B*L, 1]`` scales)."""
    batch, length, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = batch * length
    s = (torch.empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype), device=x.device) if y is not None
         else x.new_empty(0))
    q = torch.empty(x.shape, dtype=E4M3, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        block_d = next_power_of_2(dim)
        _ln_fp8_kernel[(rows,)](x, x if y is None else y, weight, bias, s, q, scale, length, x.stride(0),
                                x.stride(1), dim, eps, HAS_Y=y is not None, BLOCK_D=block_d, num_warps=_warps(block_d))
    return s, q, scale


def gelu_fp8_fwd(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dim = h.shape[-1]
    h = h.contiguous()
    rows = h.numel() // max(dim, 1)
    q = torch.empty(h.shape, dtype=E4M3, device=h.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=h.device)
    if rows:
        block_d = next_power_of_2(dim)
        _gelu_fp8_kernel[(rows,)](h, q, scale, dim, BLOCK_D=block_d, num_warps=_warps(block_d))
    return q, scale


@torch.library.custom_op("fastjepa::layer_norm_fp8", mutates_args=())
def _ln_fp8_op(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_fp8_fwd(x, y, weight, bias, eps)


@_ln_fp8_op.register_fake
def _(x, y, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    s = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype)) if y is not None else x.new_empty(0)
    return s, x.new_empty(x.shape, dtype=E4M3), x.new_empty((rows, 1), dtype=torch.float32)


@torch.library.custom_op("fastjepa::gelu_fp8", mutates_args=())
def _gelu_fp8_op(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return gelu_fp8_fwd(h)


@_gelu_fp8_op.register_fake
def _(h):
    return h.new_empty(h.shape, dtype=E4M3), h.new_empty((h.numel() // h.shape[-1], 1), dtype=torch.float32)


@torch.no_grad()
def layer_norm_fp8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
                   y: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """LayerNorm (after the residual add ``s = x + y`` when ``y`` is given) straight into e4m3 rows for the next
    FP8 GEMM, in one pass. Returns ``(s or None, e4m3 [B, L, D], fp32 [B*L, 1] scales)``; no gradient."""
    if x.dim() != 3 or (y is not None and y.shape != x.shape):
        raise ValueError(f"layer_norm_fp8: x {tuple(x.shape)} must be [B, L, D]"
                         + ("" if y is None else f" and y {tuple(y.shape)} the same"))
    for p in (weight, bias):
        if p.shape != (x.shape[-1],):
            raise ValueError(f"layer_norm_fp8: parameter of shape {tuple(p.shape)} for activations of shape "
                             f"{tuple(x.shape)}; it must be [{x.shape[-1]}], the last dimension")
    if not use_triton(x, weight, bias):
        return layer_norm_fp8_ref(x, weight, bias, eps, y)
    y = None if y is None else y.contiguous()
    s, q, scale = op_or_launcher(_ln_fp8_op, layer_norm_fp8_fwd)(x, y, weight, bias, eps)
    return (None if y is None else s), q, scale


@torch.no_grad()
def gelu_fp8(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact GELU of ``h`` straight into e4m3 rows for the next FP8 GEMM, in one pass: ``(e4m3 like h, fp32
    [rows, 1] scales)``; no gradient."""
    if not use_triton(h):
        return gelu_fp8_ref(h)
    return op_or_launcher(_gelu_fp8_op, gelu_fp8_fwd)(h)
