"""The memory-bound passes between a ViT block's GEMMs, fused: residual add + LayerNorm, and fc1's bias + GELU.

In a pre-norm block, ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` costs, besides the GEMMs, a read and write
of the residual stream per add, a LayerNorm pass, and fc1's bias and GELU over the widest activation (4 x dim). The
fused ops take one pass each, forward and backward:

- ``add_layer_norm(x, y, w, b)`` returns the new residual stream ``s = x + y`` and ``LayerNorm(s)`` (statistics in
  fp32, the output directly in the dtype the next GEMM runs in, under autocast bf16); its backward reads ``s``, the
  output gradient and the residual's gradient once and writes the one gradient both ``x`` and ``y`` receive, with
  the weight and bias gradients from per-program fp32 partial sums.
- ``bias_gelu(h, b)`` is the exact (erf) ``GELU(h + b)`` for fc1 run without its bias; its backward writes ``dh``
  and the bias gradient's partial sums in the same pass.

torch.compile's own fusion (inductor) is the alternative these kernels must beat: ``fastjepa.block_impl: auto``
times both at the run's shapes (``fastjepa.block_impl``); nothing here is chosen by default on a GPU it was never
timed on.
"""

import torch
import torch.nn.functional as F

from fastjepa.kernels._utils import cdiv, interpreting, next_power_of_2, op_or_launcher, tl, triton, use_triton


def add_layer_norm_ref(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``(s, layer_norm(s))`` with ``s = x + y``."""
    s = x + y
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def bias_gelu_ref(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Reference: ``gelu(h + bias)``, exact (erf), as ``nn.GELU()``."""
    return F.gelu(h + bias)


def _tiles(rows: int, dim: int) -> tuple[int, int]:
    """(rows per tile, BLOCK_D) for whole-row kernels: ~8K elements per tile on a GPU, one big tile interpreted."""
    block_d = next_power_of_2(dim)
    budget = 1 << 16 if interpreting() else 8192
    return max(1, min(next_power_of_2(rows), budget // block_d)), block_d


def _programs(tiles: int, device: torch.device) -> int:
    """Programs of the backward kernels (each loops over tiles and keeps fp32 partial sums of the parameter
    gradients): a few per SM on a GPU, few under the interpreter, where each program runs one after another."""
    if device.type != "cuda":
        return min(tiles, 2)
    return min(tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count)


@triton.jit
def _add_ln_fwd_kernel(x, y, w, b, s, out, mean, rstd, M, L, sxb, sxl, D, eps,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # x may be a [B, L, D] view with strides (sxb, sxl, 1) (the block's x[:, queries_from:]); y, s, out are
    # contiguous [M, D]. LayerNorm reads s as stored (rounded to its dtype), as the unfused ops do.
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m = (o_m < M)[:, None] & m_d[None, :]
    r = o_m.to(tl.int64)
    p_x = x + ((r // L) * sxb + (r % L) * sxl)[:, None] + o_d[None, :]
    b_s = tl.load(p_x, mask=m, other=0).to(tl.float32) + tl.load(y + r[:, None] * D + o_d[None, :], mask=m,
                                                                 other=0).to(tl.float32)
    b_s = b_s.to(s.dtype.element_ty)
    tl.store(s + r[:, None] * D + o_d[None, :], b_s, mask=m)
    b_s = b_s.to(tl.float32)
    b_mean = tl.sum(b_s, axis=1) / D
    b_c = tl.where(m, b_s - b_mean[:, None], 0.0)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_c * b_c, axis=1) / D + eps)
    b_w = tl.load(w + o_d, mask=m_d, other=0).to(tl.float32)
    b_b = tl.load(b + o_d, mask=m_d, other=0).to(tl.float32)
    b_y = b_c * b_rstd[:, None] * b_w[None, :] + b_b[None, :]
    tl.store(out + r[:, None] * D + o_d[None, :], b_y.to(out.dtype.element_ty), mask=m)
    tl.store(mean + r, b_mean, mask=o_m < M)
    tl.store(rstd + r, b_rstd, mask=o_m < M)


@triton.jit
def _add_ln_bwd_kernel(s, mean, rstd, w, dout, ds, dx, dw_part, db_part, M, D, num_tiles, HAS_DS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program loops over tiles pid, pid + P, ...: each row's input gradient in one pass, the weight and bias
    # gradients accumulated in fp32 registers and written once per program (summed by the caller).
    pid = tl.program_id(0)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_w = tl.load(w + o_d, mask=m_d, other=0).to(tl.float32)
    acc_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        o_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m = (o_m < M)[:, None] & m_d[None, :]
        r = o_m.to(tl.int64)
        off = r[:, None] * D + o_d[None, :]
        b_mean = tl.load(mean + r, mask=o_m < M, other=0)
        b_rstd = tl.load(rstd + r, mask=o_m < M, other=0)
        b_xhat = tl.where(m, (tl.load(s + off, mask=m, other=0).to(tl.float32) - b_mean[:, None]) * b_rstd[:, None],
                          0.0)
        b_dy = tl.load(dout + off, mask=m, other=0).to(tl.float32)
        b_wdy = b_dy * b_w[None, :]
        c1 = tl.sum(b_xhat * b_wdy, axis=1) / D
        c2 = tl.sum(b_wdy, axis=1) / D
        b_dx = (b_wdy - (b_xhat * c1[:, None] + c2[:, None])) * b_rstd[:, None]
        if HAS_DS:
            b_dx += tl.load(ds + off, mask=m, other=0).to(tl.float32)
        tl.store(dx + off, b_dx.to(dx.dtype.element_ty), mask=m)
        acc_w += tl.sum(b_dy * b_xhat, axis=0)
        acc_b += tl.sum(b_dy, axis=0)
    tl.store(dw_part + pid * D + o_d, acc_w, mask=m_d)
    tl.store(db_part + pid * D + o_d, acc_b, mask=m_d)


@triton.jit
def _gelu_fwd_kernel(h, b, out, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = (o_m < M)[:, None] & (o_d < D)[None, :]
    off = o_m.to(tl.int64)[:, None] * D + o_d[None, :]
    b_v = tl.load(h + off, mask=m, other=0).to(tl.float32) + tl.load(b + o_d, mask=o_d < D, other=0).to(tl.float32)
    b_y = 0.5 * b_v * (1.0 + tl.math.erf(b_v * 0.7071067811865476))
    tl.store(out + off, b_y.to(out.dtype.element_ty), mask=m)


@triton.jit
def _gelu_bwd_kernel(h, b, dout, dh, db_part, M, D, num_tiles, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grid (column tiles, P): program (j, p) loops over the row tiles p, p + P, ... of column tile j.
    pid_d, pid = tl.program_id(0), tl.program_id(1)
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_b = tl.load(b + o_d, mask=m_d, other=0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for tile in range(pid, num_tiles, tl.num_programs(1)):
        o_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m = (o_m < M)[:, None] & m_d[None, :]
        off = o_m.to(tl.int64)[:, None] * D + o_d[None, :]
        b_v = tl.load(h + off, mask=m, other=0).to(tl.float32) + b_b[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(b_v * 0.7071067811865476))
        pdf = tl.exp(-0.5 * b_v * b_v) * 0.3989422804014327
        b_dv = tl.where(m, tl.load(dout + off, mask=m, other=0).to(tl.float32) * (cdf + b_v * pdf), 0.0)
        tl.store(dh + off, b_dv.to(dh.dtype.element_ty), mask=m)
        acc += tl.sum(b_dv, axis=0)
    tl.store(db_part + pid.to(tl.int64) * D + o_d, acc, mask=m_d)


# sm_90 compile check (tests/kernels/test_compile.py): bf16 activations, fp32 parameters, as under autocast.
COMPILE_SPECS = {
    "add_layer_norm_fwd": (
        _add_ln_fwd_kernel,
        {"x": "*bf16", "y": "*bf16", "w": "*fp32", "b": "*fp32", "s": "*bf16", "out": "*bf16", "mean": "*fp32",
         "rstd": "*fp32", "M": "i32", "L": "i32", "sxb": "i64", "sxl": "i64", "D": "i32", "eps": "fp32"},
        {"BLOCK_M": 4, "BLOCK_D": 2048}),
    "add_layer_norm_bwd": (
        _add_ln_bwd_kernel,
        {"s": "*bf16", "mean": "*fp32", "rstd": "*fp32", "w": "*fp32", "dout": "*bf16", "ds": "*bf16", "dx": "*bf16",
         "dw_part": "*fp32", "db_part": "*fp32", "M": "i32", "D": "i32", "num_tiles": "i32"},
        {"HAS_DS": True, "BLOCK_M": 4, "BLOCK_D": 2048}),
    "bias_gelu_fwd": (
        _gelu_fwd_kernel, {"h": "*bf16", "b": "*fp32", "out": "*bf16", "M": "i32", "D": "i32"},
        {"BLOCK_M": 8, "BLOCK_D": 1024}),
    "bias_gelu_bwd": (
        _gelu_bwd_kernel,
        {"h": "*bf16", "b": "*fp32", "dout": "*bf16", "dh": "*bf16", "db_part": "*fp32", "M": "i32", "D": "i32",
         "num_tiles": "i32"},
        {"BLOCK_M": 8, "BLOCK_D": 1024}),
}


def add_layer_norm_fwd(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       out_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``[B, L, D]`` x (any strides with a unit last one), contiguous y -> (s, out, mean, rstd)."""
    batch, length, dim = y.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    s = torch.empty(y.shape, dtype=torch.promote_types(x.dtype, y.dtype), device=y.device)
    out = torch.empty(y.shape, dtype=out_dtype, device=y.device)
    rows = batch * length
    mean = torch.empty(rows, dtype=torch.float32, device=y.device)
    rstd = torch.empty_like(mean)
    if rows:
        block_m, block_d = _tiles(rows, dim)
        _add_ln_fwd_kernel[(cdiv(rows, block_m),)](
            x, y, weight, bias, s, out, mean, rstd, rows, length, x.stride(0), x.stride(1), dim, eps,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=8 if block_d >= 2048 else 4,
        )
    return s, out, mean, rstd


def add_layer_norm_bwd(s: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                       dout: torch.Tensor, ds: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """-> (the gradient of x and of y, one tensor in s's dtype; weight gradient; bias gradient, in fp32)."""
    dim = s.shape[-1]
    rows = s.numel() // max(dim, 1)
    dout = dout.contiguous()
    ds = None if ds is None else ds.contiguous()
    dx = torch.empty_like(s)
    block_m, block_d = _tiles(rows, dim)
    tiles = cdiv(rows, block_m)
    programs = max(1, _programs(tiles, s.device))
    parts = torch.empty(2, programs, dim, dtype=torch.float32, device=s.device)
    if rows:
        _add_ln_bwd_kernel[(programs,)](
            s, mean, rstd, weight, dout, dout if ds is None else ds, dx, parts[0], parts[1], rows, dim, tiles,
            HAS_DS=ds is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=8 if block_d >= 2048 else 4,
        )
    else:
        parts.zero_()
    return dx, parts[0].sum(0), parts[1].sum(0)


def _gelu_tiles(rows: int, dim: int) -> tuple[int, int]:
    block_d = min(next_power_of_2(dim), 1024)
    return max(1, min(next_power_of_2(rows), (1 << 16 if interpreting() else 8192) // block_d)), block_d


def bias_gelu_fwd(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    dim = h.shape[-1]
    h = h.contiguous()
    out = torch.empty_like(h)
    rows = h.numel() // max(dim, 1)
    if rows:
        block_m, block_d = _gelu_tiles(rows, dim)
        _gelu_fwd_kernel[(cdiv(rows, block_m), cdiv(dim, block_d))](h, bias, out, rows, dim, BLOCK_M=block_m,
                                                                    BLOCK_D=block_d, num_warps=4)
    return out


def bias_gelu_bwd(h: torch.Tensor, bias: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (the gradient of h in its dtype, the bias gradient in fp32)."""
    dim = h.shape[-1]
    rows = h.numel() // max(dim, 1)
    dout = dout.contiguous()
    dh = torch.empty_like(h)
    block_m, block_d = _gelu_tiles(rows, dim)
    tiles, col_tiles = cdiv(rows, block_m), cdiv(dim, block_d)
    programs = max(1, _programs(tiles, h.device) // col_tiles if h.is_cuda else _programs(tiles, h.device))
    parts = torch.zeros(programs, dim, dtype=torch.float32, device=h.device)
    if rows:
        _gelu_bwd_kernel[(col_tiles, programs)](h, bias, dout, dh, parts, rows, dim, tiles, BLOCK_M=block_m,
                                               BLOCK_D=block_d, num_warps=4)
    return dh, parts.sum(0)


@torch.library.custom_op("fastjepa::add_layer_norm_fwd", mutates_args=())
def _add_ln_fwd_op(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_layer_norm_fwd(x, y, weight, bias, eps, out_dtype)


@_add_ln_fwd_op.register_fake
def _(x, y, weight, bias, eps, out_dtype):
    rows = y.numel() // y.shape[-1]
    stats = y.new_empty((rows,), dtype=torch.float32)
    return (y.new_empty(y.shape, dtype=torch.promote_types(x.dtype, y.dtype)), y.new_empty(y.shape, dtype=out_dtype),
            stats, torch.empty_like(stats))


@torch.library.custom_op("fastjepa::add_layer_norm_bwd", mutates_args=())
def _add_ln_bwd_op(s: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                   dout: torch.Tensor, ds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_layer_norm_bwd(s, mean, rstd, weight, dout, ds)


@_add_ln_bwd_op.register_fake
def _(s, mean, rstd, weight, dout, ds):
    dim = s.shape[-1]
    return torch.empty_like(s), s.new_empty((dim,), dtype=torch.float32), s.new_empty((dim,), dtype=torch.float32)


@torch.library.custom_op("fastjepa::bias_gelu_fwd", mutates_args=())
def _gelu_fwd_op(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return bias_gelu_fwd(h, bias)


@_gelu_fwd_op.register_fake
def _(h, bias):
    return torch.empty_like(h)


@torch.library.custom_op("fastjepa::bias_gelu_bwd", mutates_args=())
def _gelu_bwd_op(h: torch.Tensor, bias: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return bias_gelu_bwd(h, bias, dout)


@_gelu_bwd_op.register_fake
def _(h, bias, dout):
    return torch.empty_like(h), h.new_empty((h.shape[-1],), dtype=torch.float32)


class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, weight, bias, eps, out_dtype):
        s, out, mean, rstd = op_or_launcher(_add_ln_fwd_op, add_layer_norm_fwd)(x, y, weight, bias, eps, out_dtype)
        ctx.save_for_backward(s, mean, rstd, weight)
        ctx.dtypes = (x.dtype, y.dtype, weight.dtype, bias.dtype)
        return s, out

    @staticmethod
    def backward(ctx, ds, dout):
        s, mean, rstd, weight = ctx.saved_tensors
        dsum, dw, db = op_or_launcher(_add_ln_bwd_op, add_layer_norm_bwd)(s, mean, rstd, weight, dout, ds)
        x_dtype, y_dtype, w_dtype, b_dtype = ctx.dtypes
        return dsum.to(x_dtype), dsum.to(y_dtype), dw.to(w_dtype), db.to(b_dtype), None, None


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bias):
        ctx.save_for_backward(h, bias)
        return op_or_launcher(_gelu_fwd_op, bias_gelu_fwd)(h, bias)

    @staticmethod
    def backward(ctx, dout):
        h, bias = ctx.saved_tensors
        dh, db = op_or_launcher(_gelu_bwd_op, bias_gelu_bwd)(h, bias, dout)
        return dh, db.to(bias.dtype)


def _check_rows(op: str, x: torch.Tensor, *params: torch.Tensor) -> None:
    for p in params:
        if p.shape != (x.shape[-1],):
            raise ValueError(f"{op}: parameter of shape {tuple(p.shape)} for activations of shape {tuple(x.shape)}; "
                             f"it must be [{x.shape[-1]}], the last dimension")


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next pre-norm in one pass: ``(s, layer_norm(s, weight, bias))`` with ``s = x + y``.

    Args:
        x: ``[B, L, D]`` residual stream (a view such as ``x[:, k:]`` is read in place), y: ``[B, L, D]``.
        weight, bias: ``[D]`` LayerNorm parameters.
    Returns ``s`` in the promoted dtype of x and y and the normalised output in the dtype the next matmul runs in
    (autocast's dtype under autocast: the same values the unfused LayerNorm's fp32 output would be cast to)."""
    if x.shape != y.shape or x.dim() != 3:
        raise ValueError(f"add_layer_norm: x {tuple(x.shape)} and y {tuple(y.shape)} must be the same [B, L, D]")
    _check_rows("add_layer_norm", x, weight, bias)
    if not use_triton(x, y, weight, bias):
        s, out = add_layer_norm_ref(x, y, weight, bias, eps)
        return s, out
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    out_dtype = torch.get_autocast_dtype(device) if autocast else torch.promote_types(x.dtype, y.dtype)
    return AddLayerNormFunction.apply(x, y.contiguous(), weight, bias, eps, out_dtype)


def bias_gelu(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(h + bias)`` (exact erf GELU) in one pass, for a Linear run without its bias; output in h's dtype."""
    _check_rows("bias_gelu", h, bias)
    if not use_triton(h, bias):
        return bias_gelu_ref(h, bias)
    return BiasGeluFunction.apply(h, bias)
