"""Helpers shared by the kernel tests and benchmarks: I-JEPA-like masks and a precision-aware comparison."""

import torch

# Relative RMS error that a result in this dtype may always have (rounding of inputs and outputs).
RMS_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def random_masks(num_masks: int, batch: int, num_tokens: int, k: int, generator=None, device="cpu"):
    """M lists of ``[B, K]`` int64 indices, distinct and sorted within each row (like the multi-block collator)."""
    return [
        torch.rand(batch, num_tokens, generator=generator).argsort(1)[:, :k].sort(1).values.to(device)
        for _ in range(num_masks)
    ]


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item() if ref.numel() else 0.0


def assert_matches(fused: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, name: str = "") -> None:
    """``fused`` (the kernel, in its low precision) must be as close to ``exact`` (fp64 oracle) as ``plain``
    (PyTorch in the same precision) is, within 2x, or within the dtype's rounding floor; and hold no NaN."""
    assert fused.shape == exact.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(exact.shape)}"
    assert not fused.isnan().any(), f"{name}: NaN in the result (an element was never written)"
    err, plain_err = rel_rms(fused, exact), rel_rms(plain, exact)
    bound = max(2 * plain_err, RMS_FLOOR[fused.dtype])
    assert err <= bound, (
        f"{name}: relative RMS error {err:.3e} > {bound:.3e} (PyTorch in {fused.dtype}: {plain_err:.3e})"
    )
