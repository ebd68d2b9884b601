"""Every attention backend agrees with the official math within the dtype's tolerance; auto is deterministic on CPU
and picks a timed backend on a GPU."""

import pytest
import torch

from fastjepa.modules import attention_backends as ab
from fastjepa.modules.attention import Attention

# fp32 ~1e-6 relative RMS; bf16: at most 2x the error of the official math in bf16 (flash-attention's rule).
FP32_TOL = 1e-6


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def qkv(shape, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]


def fwd_bwd(backend, q, k, v, grad_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = ab.attention(q, k, v, q.shape[-1] ** -0.5, backend)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


# (B, H, L, D): the predictor's head dim 24 and ViT-H's 80, odd token counts.
SHAPES = {"pred_d24_L69": (2, 3, 69, 24), "vith_d80_L113": (1, 2, 113, 80)}
CPU_BACKENDS = [b for b in ab.available_backends("cpu", torch.float32, 24) if b != "math"]


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_matches_math_fp32(backend, shape):
    q, k, v = qkv(SHAPES[shape], torch.float32)
    grad_out = torch.randn(SHAPES[shape], generator=torch.Generator().manual_seed(1))
    ref = fwd_bwd("math", q.double(), k.double(), v.double(), grad_out.double())
    got = fwd_bwd(backend, q, k, v, grad_out)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert g.dtype == torch.float32
        assert rel_rms(g, r) < FP32_TOL, f"{backend} {name}: rel RMS {rel_rms(g, r):.2e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_bf16_within_twice_math_error(backend):
    shape = SHAPES["pred_d24_L69"]
    q, k, v = qkv(shape, torch.bfloat16)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    ref = fwd_bwd("math", q.double(), k.double(), v.double(), grad_out.double())
    math_bf16 = fwd_bwd("math", q, k, v, grad_out)
    got = fwd_bwd(backend, q, k, v, grad_out)
    for name, g, m, r in zip(("out", "dq", "dk", "dv"), got, math_bf16, ref, strict=True):
        assert rel_rms(g, r) <= 2 * rel_rms(m, r), f"{backend} {name}: {rel_rms(g, r):.2e} vs math {rel_rms(m, r):.2e}"


def test_math_softmax_is_fp32():
    # Scores that differ by less than bf16's resolution near 8: a bf16 softmax would make them equal.
    q = torch.ones(1, 1, 1, 1, dtype=torch.bfloat16)
    k = torch.tensor([8.0, 8.0625], dtype=torch.bfloat16).reshape(1, 1, 2, 1)
    v = torch.tensor([0.0, 1.0], dtype=torch.bfloat16).reshape(1, 1, 2, 1)
    out = ab.attention_math(q, k, v, 64.0)  # scores 512 and 516
    assert out.item() > 0.9


def test_auto_on_cpu_is_deterministic_sdpa():
    q, k, v = qkv((1, 2, 9, 16), torch.float32)
    assert ab.resolve("auto", q, k, v, 0.25) == "sdpa"
    torch.testing.assert_close(ab.attention(q, k, v, 0.25, "auto"), ab.attention(q, k, v, 0.25, "sdpa"))


def test_unknown_or_unsupported_backend_is_named():
    q, k, v = qkv((1, 1, 4, 8), torch.float32)
    with pytest.raises(ValueError, match="sdpa_flash"):
        ab.attention(q, k, v, 1.0, "flash")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="available here"):
            ab.attention(q, k, v, 1.0, "sdpa_cudnn")


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_flash", "auto"])
def test_attention_module_backends_match_math(backend):
    torch.manual_seed(0)
    ref = Attention(48, 2, backend="math").double()
    mod = Attention(48, 2, backend=backend).double()
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
    x = torch.randn(2, 13, 48, dtype=torch.float64)
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_gpu_backends_within_twice_math_error(shape, dtype):
    q, k, v = qkv(SHAPES[shape], dtype, "cuda")
    grad_out = torch.randn(SHAPES[shape], device="cuda", dtype=dtype)
    ref = fwd_bwd("math", q.double(), k.double(), v.double(), grad_out.double())
    math_low = fwd_bwd("math", q, k, v, grad_out)
    for backend in ab.available_backends("cuda", dtype, q.shape[-1]):
        got = fwd_bwd(backend, q, k, v, grad_out)
        for name, g, m, r in zip(("out", "dq", "dk", "dv"), got, math_low, ref, strict=True):
            assert rel_rms(g, r) <= 2 * rel_rms(m, r) + 1e-4, f"{backend} {name}"


@pytest.mark.gpu
def test_gpu_auto_times_once_and_caches():
    q, k, v = qkv((4, 16, 70, 24), torch.bfloat16, "cuda")
    name, times = ab.pick_fastest(q, k, v, 24**-0.5, grad=True)
    assert name in times and isinstance(times[name], float)
    chosen = ab.resolve("auto", q, k, v, 24**-0.5)
    assert chosen in ab.available_backends("cuda", torch.bfloat16, 24)
    assert ab.resolve("auto", q, k, v, 24**-0.5) == chosen


def test_auto_key_buckets_token_counts_and_ignores_batch():
    # Token counts change with every mask draw: 70 and 75 context tokens share one timing, 70 and 130 do not.
    def key(batch, tokens):
        q = torch.empty(batch, 16, tokens, 24)
        return ab._auto_key(q, q, True)

    assert key(128, 70) == key(64, 75)
    assert key(128, 70) != key(128, 130)


@pytest.mark.parametrize("backend", ["auto", "sdpa_flash"])
def test_attention_module_compiles_without_graph_breaks(backend):
    # torch.compile per block must see one graph: the backend dispatch is traceable.
    explain = torch._dynamo.explain(Attention(32, 2, backend=backend))(torch.randn(2, 9, 32))
    assert explain.graph_break_count == 0 and explain.graph_count == 1
