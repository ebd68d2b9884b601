"""layer_norm_fp8 and gelu_fp8 (the FP8 target forward's activations emitted in e4m3) against the reference
quantisation of the fp32 result (interpreter on CPU, the hardware's cast on a GPU): odd widths, a strided residual
stream, with and without the residual add, bad shapes refused, and no graph break when compiled."""

import pytest
import torch
import torch.nn.functional as F
from kernel_utils import triton_e4m3

from fastjepa.kernels import kernel_backend
from fastjepa.kernels.block_ops_fp8 import gelu_fp8, gelu_fp8_ref, layer_norm_fp8, layer_norm_fp8_ref
from fastjepa.kernels.ema_fp8 import E4M3_MAX

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(2, 5, 24), (3, 7, 80), (1, 1, 40), (2, 33, 160)]  # (B, L, D): odd rows, widths not powers of two


def rand(seed, *shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (1.5 + 2.0 * torch.randn(shape, generator=g)).to(DEVICE, dtype)


# How far fp32 rounding can move a value the kernel quantises, in e4m3 units of its row (the row maximum is 448):
# a few fp32 ulps of intermediates as large as the row's maximum (LayerNorm's centred values, GELU's 1 + erf).
FP32_SLACK = 4 * torch.finfo(torch.float32).eps * E4M3_MAX


def expected(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's scaled fp32 values, its scales (``quantize_rowwise``) and its codes, cast as Triton casts
    them on this device."""
    rows = h.float().reshape(-1, h.shape[-1])
    scale = rows.abs().amax(1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    values = (rows / scale).clamp(-E4M3_MAX, E4M3_MAX).view(h.shape)
    return values, scale, triton_e4m3(values)


def assert_codes(q: torch.Tensor, scale: torch.Tensor, h: torch.Tensor) -> None:
    """``q`` and ``scale`` are the row-wise quantisation of ``h``: scales to fp32 rounding (the kernel's reductions
    run in another order), codes equal except where the reference value lies within fp32 rounding of the boundary
    between two neighbouring codes. Below e4m3's normal range (2^-6, values under 1/28000 of the row maximum) the
    interpreter's cast is not even consistent between two kernels: those codes are checked on a GPU only."""
    values, want_scale, want_q = expected(h)
    assert q.dtype == torch.float8_e4m3fn and q.shape == h.shape and scale.shape == want_scale.shape
    torch.testing.assert_close(scale, want_scale, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    got, want = q.float(), want_q.float()
    if not q.is_cuda:
        normal = values.abs() >= 2**-6
        got, want, values = got[normal], want[normal], values[normal]
    moved = got != want
    assert ((got - want).abs()[moved] <= want.abs()[moved] / 8).all(), "codes more than one step apart"
    boundary = (got[moved] + want[moved]) / 2
    assert ((values[moved] - boundary).abs() <= FP32_SLACK).all(), (values[moved], got[moved], want[moved])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_fp8_is_the_reference_quantisation(shape, dtype):
    x, y = rand(0, *shape, dtype=dtype), rand(1, *shape, dtype=dtype)
    w, b = rand(2, shape[-1]), rand(3, shape[-1])
    for residual in (None, y):
        s, q, scale = layer_norm_fp8(x, w, b, 1e-6, y=residual)
        want_s = x if residual is None else x + residual
        assert (s is None) == (residual is None)
        if residual is not None:
            assert s.dtype == dtype and torch.equal(s, want_s)  # the residual stream, exactly as the add writes it
        assert_codes(q, scale, F.layer_norm(want_s.float(), (shape[-1],), w, b, 1e-6))


def test_layer_norm_fp8_reads_a_strided_residual_stream_in_place():
    full, y = rand(0, 2, 9, 48), rand(1, 2, 6, 48)
    w, b = rand(2, 48), rand(3, 48)
    x = full[:, 3:]  # the predictor's x[:, queries_from:] layout
    s, q, scale = layer_norm_fp8(x, w, b, 1e-6, y=y)
    assert torch.equal(s, x + y)
    assert_codes(q, scale, F.layer_norm((x + y).float(), (48,), w, b, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 96), (3, 7, 320), (1, 1, 64)])
def test_gelu_fp8_is_the_reference_quantisation(shape, dtype):
    h = rand(4, *shape, dtype=dtype) - 1.5  # both signs: GELU's negative tail is small
    q, scale = gelu_fp8(h)
    assert_codes(q, scale, F.gelu(h.float()))


def test_the_references_are_quantize_rowwise_of_the_fp32_result():
    x, y, w, b = rand(0, 2, 5, 24), rand(1, 2, 5, 24), rand(2, 24), rand(3, 24)
    s, q, scale = layer_norm_fp8_ref(x, w, b, 1e-6, y)
    h = F.layer_norm(x + y, (24,), w, b, 1e-6)
    torch.testing.assert_close(q.float() * scale.view(2, 5, 1), h, rtol=2**-4, atol=0)  # e4m3's half step
    q, scale = gelu_fp8_ref(x)
    torch.testing.assert_close(q.float() * scale.view(2, 5, 1), F.gelu(x), rtol=2**-4, atol=2**-9 * scale.max())


def test_bad_shapes_are_refused_naming_them():
    x = rand(0, 2, 5, 24)
    with pytest.raises(ValueError, match=r"x \(2, 5, 24\) must be \[B, L, D\] and y \(2, 5, 16\) the same"):
        layer_norm_fp8(x, rand(1, 24), rand(2, 24), y=rand(3, 2, 5, 16))
    with pytest.raises(ValueError, match=r"parameter of shape \(16,\) for activations of shape \(2, 5, 24\)"):
        layer_norm_fp8(x, rand(1, 16), rand(2, 24))


def test_the_reference_backend_runs_the_references():
    x, w, b = rand(0, 2, 5, 24), rand(1, 24), rand(2, 24)
    with kernel_backend("reference"):
        _, q, scale = layer_norm_fp8(x, w, b)
        gq, gscale = gelu_fp8(x)
    _, want_q, want_scale = layer_norm_fp8_ref(x, w, b)
    assert torch.equal(q.float(), want_q.float()) and torch.equal(scale, want_scale)
    assert torch.equal(gq.float(), gelu_fp8_ref(x)[0].float()) and torch.equal(gscale, gelu_fp8_ref(x)[1])


def test_fake_implementations_match_the_kernels():
    x, y, w, b = rand(0, 2, 5, 24), rand(1, 2, 5, 24), rand(2, 24), rand(3, 24)
    for args in ((x, y, w, b, 1e-6), (x, None, w, b, 1e-6)):
        torch.library.opcheck(torch.ops.fastjepa.layer_norm_fp8, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastjepa.gelu_fp8, (x,), test_utils=("test_schema", "test_faketensor"))


def test_no_graph_break_when_compiled():
    x, y, w, b = rand(0, 2, 5, 24), rand(1, 2, 5, 24), rand(2, 24), rand(3, 24)

    def tail(x, y, w, b):
        s, q, scale = layer_norm_fp8(x, w, b, 1e-6, y=y)
        g, g_scale = gelu_fp8(s)
        return s, q.float() * scale.view(2, 5, 1), g.float() * g_scale.view(2, 5, 1)

    for got, want in zip(torch.compile(tail, backend="aot_eager", fullgraph=True)(x, y, w, b), tail(x, y, w, b),
                         strict=True):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 256, 1280), (4, 256, 5120)])  # ViT-H/14's target: norm width, fc1 output
def test_bf16_activations_on_gpu(shape):
    h = rand(5, *shape, dtype=torch.bfloat16)
    w, b = rand(6, shape[-1]), rand(7, shape[-1])
    _, q, scale = layer_norm_fp8(h, w, b)
    assert_codes(q, scale, F.layer_norm(h.float(), (shape[-1],), w, b, 1e-6))
    q, scale = gelu_fp8(h)
    assert_codes(q, scale, F.gelu(h.float()))
