"""Shared-context block attention: Triton (through the interpreter on CPU) and FlexAttention against the dense
masked reference, and the reference against the official repeated-context layout it replaces."""

import pytest
import torch

from fastjepa.kernels import block_attention as ba

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


@pytest.fixture
def nan_empty(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element a kernel forgets to write fails."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)


def make_qkv(batch, heads, head_dim, context_len, target_len, num_target_blocks, dtype, device="cpu", strided=False,
             seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seq_len = context_len + num_target_blocks * target_len
    if strided:  # slices of one [B, L, 3, H, D] projection, as the attention module produces them
        qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen).to(device, dtype)
        return [qkv[:, :, i].requires_grad_() for i in range(3)]
    return [torch.randn(batch, seq_len, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
            for _ in range(3)]


def check_against_fp64(q, k, v, context_len, num_target_blocks, backend):
    out = ba.block_attention(q, k, v, context_len, num_target_blocks, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = ba.block_attention_ref(*ref_in, context_len, num_target_blocks)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    tol = TOL[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_rms(out, ref) < tol, f"forward rel RMS {rel_rms(out, ref):.2e} >= {tol}"
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert torch.isfinite(g).all(), f"d{name} has non-finite entries"
        assert rel_rms(g, rg) < tol, f"d{name} rel RMS {rel_rms(g, rg):.2e} >= {tol}"


# (batch, heads, head_dim, context_len, target_len, num_target_blocks, dtype, strided)
CASES = {
    "fp32_d24_ctx7_3x4": (2, 2, 24, 7, 4, 3, torch.float32, False),
    "fp16_d16_ctx5_2x3": (2, 2, 16, 5, 3, 2, torch.float16, False),
    # context longer than one 16-row interpreter tile, odd target length: tails in every loop
    "fp32_d24_ctx17_2x5_strided": (1, 2, 24, 17, 5, 2, torch.float32, True),
    "fp16_d24_ctx9_1x1": (2, 1, 24, 9, 1, 1, torch.float16, False),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_triton_matches_reference(case, nan_empty):
    *shape, dtype, strided = CASES[case]
    q, k, v = make_qkv(*shape, dtype, strided=strided)
    check_against_fp64(q, k, v, shape[3], shape[5], "triton")


def test_flex_forward_matches_reference():
    # FlexAttention has no CPU backward: its gradients are checked by the gpu test below.
    q, k, v = (t.detach() for t in make_qkv(2, 2, 16, 7, 4, 3, torch.float32))
    out = ba.block_attention(q, k, v, 7, 3, backend="flex")
    ref = ba.block_attention_ref(q.double(), k.double(), v.double(), 7, 3)
    assert rel_rms(out, ref) < TOL[torch.float32]


def test_reference_equals_repeated_context_layout():
    """Context rows = attention over the context alone; block m's rows = the official [context; block m] sequence."""
    batch, heads, head_dim, context_len, target_len, num_target_blocks = 2, 2, 8, 5, 3, 3
    q, k, v = (t.detach().double() for t in make_qkv(batch, heads, head_dim, context_len, target_len, num_target_blocks,
                                                     torch.float64))
    out = ba.block_attention_ref(q, k, v, context_len, num_target_blocks)

    def dense(idx):
        s = torch.einsum("blhd,bmhd->bhlm", q[:, idx], k[:, idx]) * head_dim**-0.5
        return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v[:, idx])

    ctx = torch.arange(context_len)
    torch.testing.assert_close(out[:, :context_len], dense(ctx), rtol=1e-12, atol=1e-12)
    for m in range(num_target_blocks):
        blk = context_len + m * target_len + torch.arange(target_len)
        torch.testing.assert_close(out[:, blk], dense(torch.cat([ctx, blk]))[:, context_len:], rtol=1e-12, atol=1e-12)


def test_traceable_by_compile():
    q, k, v = make_qkv(1, 2, 16, 5, 3, 2, torch.float32)
    fn = torch.compile(lambda a, b, c: ba.block_attention(a, b, c, 5, 2, backend="triton"), backend="aot_eager",
                       fullgraph=True)
    out = fn(q, k, v)
    out.sum().backward()
    ref = ba.block_attention_ref(q.detach(), k.detach(), v.detach(), 5, 2)
    assert rel_rms(out, ref) < 1e-6 and torch.isfinite(q.grad).all()


def test_bad_layout_is_named():
    q = torch.randn(1, 10, 2, 8)
    with pytest.raises(ValueError, match="context_len"):
        ba.block_attention(q, q, q, context_len=5, num_target_blocks=3)
    with pytest.raises(ValueError, match="backend"):
        ba.block_attention(q, q, q, context_len=4, num_target_blocks=3, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [24, 80])
@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_gpu_bf16_predictor_shape(backend, head_dim):
    # official ViT-H predictor: ~70 context tokens, 4 blocks of ~44 targets, 16 heads
    q, k, v = make_qkv(8, 16, head_dim, 70, 44, 4, torch.bfloat16, device="cuda", strided=True)
    out = ba.block_attention(q, k, v, 70, 4, backend=backend)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = ba.block_attention_ref(*ref_in, 70, 4)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    # flash-attention's rule: at most 2x the error of plain PyTorch in bf16 (bf16 matmuls, fp32 softmax)
    plain_in = [t.detach().requires_grad_() for t in (q, k, v)]
    mask = ba.block_attention_mask(70, 44, 4, "cuda")
    qh, kh, vh = (t.transpose(1, 2) for t in plain_in)
    scores = (qh @ kh.transpose(-1, -2) * head_dim**-0.5).masked_fill(~mask, float("-inf"))
    plain = (scores.softmax(-1, dtype=torch.float32).to(vh.dtype) @ vh).transpose(1, 2)
    plain_grads = torch.autograd.grad(plain, plain_in, grad_out)
    assert rel_rms(out, ref) <= 2 * rel_rms(plain, ref) + 1e-4
    for g, rg, pg in zip(grads, ref_grads, plain_grads, strict=True):
        assert rel_rms(g, rg) <= 2 * rel_rms(pg, rg) + 1e-4
