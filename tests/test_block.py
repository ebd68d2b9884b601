"""The ViT block's two implementations of its memory-bound half (fastjepa.modules.block): the fused kernels
(Triton interpreter on CPU) compute what the PyTorch ops compute, in every layout, and the choice between them."""

import pytest
import torch
from dist_utils import torchrun
from kernel_utils import rel_rms

from fastjepa import timing
from fastjepa.kernels._utils import triton_unavailable
from fastjepa.modules.block import Block

DIM, HEADS = 40, 4  # a width that is not a power of two


def twins(seed=0):
    torch.manual_seed(seed)
    ref = Block(DIM, HEADS, attn_backend="math")
    fused = Block(DIM, HEADS, attn_backend="math", impl="fused")
    fused.load_state_dict(ref.state_dict())
    with torch.no_grad():  # non-trivial LayerNorm and bias parameters
        for b in (ref, fused):
            torch.manual_seed(seed + 1)
            for p in (b.norm2.weight, b.norm2.bias, b.mlp.fc1.bias):
                p.add_(0.3 * torch.randn_like(p))
    return ref, fused


def run(block, x, **kwargs):
    x = x.clone().requires_grad_()
    out = block(x, **kwargs)
    out.backward(out.detach() + 0.01)  # a gradient that varies across elements
    return out.detach(), x.grad, [p.grad.clone() for p in block.parameters()]


@pytest.mark.parametrize("layout", ["dense", "queries_from", "packed"])
def test_fused_block_matches_the_pytorch_ops_forward_and_backward(layout):
    ref, fused = twins()
    g = torch.Generator().manual_seed(2)
    if layout == "packed":
        x, kwargs = torch.randn(11, DIM, generator=g), {"cu_seqlens": torch.tensor([0, 4, 11]), "max_seqlen": 7}
    else:
        x, kwargs = torch.randn(3, 9, DIM, generator=g), ({"queries_from": 5} if layout == "queries_from" else {})
    want, got = run(ref, x, **kwargs), run(fused, x, **kwargs)
    for name, w, f in (("output", want[0], got[0]), ("input gradient", want[1], got[1])):
        assert rel_rms(f, w) <= 1e-6, f"{layout}: {name} differs by {rel_rms(f, w):.2e}"
    for (name, _), w, f in zip(ref.named_parameters(), want[2], got[2], strict=True):
        assert rel_rms(f, w) <= 1e-6, f"{layout}: gradient of {name} differs by {rel_rms(f, w):.2e}"


def test_impl_is_validated_and_resolved_without_timing_on_cpu():
    block = Block(DIM, HEADS)
    assert block.resolve_impl("auto", 2, 9, torch.float32, grad=True) == ("compile", {})
    assert block.resolve_impl("fused", 2, 9, torch.float32, grad=True) == ("fused", {})
    with pytest.raises(ValueError, match="block_impl='fast'.*auto"):
        block.resolve_impl("fast", 2, 9, torch.float32, grad=True)
    with pytest.raises(ValueError, match="unknown block implementation 'auto'"):
        Block(DIM, HEADS, impl="auto")  # a block runs a concrete implementation; "auto" is resolved for it


def test_fastest_excludes_a_failing_candidate_and_reports_why(monkeypatch):
    monkeypatch.setattr(timing, "time_ms", lambda fn, reps=5: fn())

    def broken():
        raise RuntimeError("no kernel for this shape\nsecond line")

    best, times = timing.fastest({"slow": lambda: 2.0, "broken": broken, "quick": lambda: 1.0})
    assert best == "quick"
    assert times["broken"] == "failed: RuntimeError: no kernel for this shape"
    assert timing.fastest({"broken": broken})[0] is None
    assert timing.describe({"quick": 1.0, "broken": times["broken"]}).startswith("quick 1.000 ms, broken failed")


def test_fused_blocks_need_triton_on_a_gpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA GPUs" in triton_unavailable(torch.device("cpu"), "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_unavailable(torch.device("cpu"), "auto") is None
    assert "reference" in triton_unavailable(torch.device("cpu"), "reference")


@pytest.mark.dist
def test_every_rank_runs_rank_zeros_timed_choices(tmp_path):
    """Timings differ between GPUs by noise: two torchrun processes that timed different winners both run rank 0's
    attention backend and block implementation at every call site."""
    out = tmp_path / "choices.pt"
    torchrun("dist_choices.py", str(out))
    for rank in (0, 1):
        got = torch.load(out.with_suffix(f".rank{rank}.pt"), weights_only=False)
        assert got["ran"] == {s: [("sdpa", "compile")] for s in ("context", "target", "predictor")}, rank
        assert got["agreed"]["block_impl"]["target"] == ("compile", {"compile": 0.0}), rank
