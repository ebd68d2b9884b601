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


def _kernel_specs():
    """(name, kernel, signature, constexprs) of every Triton kernel, at ViT-H-like block sizes."""
    import importlib

    mg, tg, pt, ema = (importlib.import_module(f"fastjepa.kernels.{m}")
                       for m in ("masked_gather", "target_norm_gather", "predictor_tokens", "ema"))
    i32 = "i32"
    specs = [
        ("masked_gather_fwd", mg._masked_gather_fwd_kernel,
         {"x": "*bf16", "idx": "*i64", "pos": "*bf16", "out": "*bf16", "B": i32, "N": i32, "K": i32, "D": i32},
         {"HAS_POS": True, "BLOCK_K": 4, "BLOCK_D": 2048}),
        ("masked_gather_bwd", mg._masked_gather_bwd_kernel,
         {"dy": "*bf16", "idx": "*i64", "dx": "*bf16", "M": i32, "B": i32, "N": i32, "K": i32, "D": i32},
         {"BLOCK_N": 4, "BLOCK_K": 128, "BLOCK_D": 2048}),
        ("target_norm_gather_fwd", tg._target_norm_gather_fwd_kernel,
         {"h": "*bf16", "idx": "*i64", "out": "*bf16", "B": i32, "N": i32, "K": i32, "D": i32, "NENC": i32,
          "eps": "fp32"},
         {"BLOCK_K": 4, "BLOCK_D": 2048}),
        ("predictor_tokens_fwd", pt._predictor_tokens_fwd_kernel,
         {"x": "*bf16", "idx_enc": "*i64", "idx_pred": "*i64", "mask_token": "*fp32", "pos": "*fp32", "out": "*fp32",
          "B": i32, "NENC": i32, "M": i32, "KC": i32, "KT": i32, "D": i32},
         {"BLOCK_K": 16, "BLOCK_D": 512}),
        ("predictor_tokens_bwd", pt._predictor_tokens_bwd_kernel,
         {"dy": "*fp32", "dx": "*bf16", "partial": "*fp32", "B": i32, "NENC": i32, "M": i32, "KC": i32, "KT": i32,
          "D": i32, "NUM_KC_TILES": i32},
         {"BLOCK_K": 16, "BLOCK_D": 512}),
        ("ema_update", ema._ema_update_kernel,
         {"table": "*i64", "base_t": "*fp32", "base_o": "*fp32", "base_c": "*bf16", "momentum": "fp32",
          "weight": "fp32"},
         {"HAS_COPY": True, "ALIGN": 4, "CHUNK": 16384, "BLOCK": 4096}),
    ]
    for backward in (False, True):
        specs.append((f"target_norm_smooth_l1_{'bwd' if backward else 'fwd'}", tg._target_norm_smooth_l1_kernel,
                      {"pred": "*bf16", "h": "*bf16", "idx": "*i64", "partial": "*fp32", "dpred": "*bf16",
                       "dloss": "*bf16", "B": i32, "N": i32, "K": i32, "D": i32, "NENC": i32, "eps": "fp32",
                       "scale": "fp32"},
                      {"BACKWARD": backward, "BLOCK_K": 4, "BLOCK_D": 2048}))
    return specs


def compile_kernels_for(arch: int = 90) -> dict[str, list[str]]:
    """Compile every kernel to a cubin for ``sm_<arch>`` without a GPU (Triton's bundled ptxas), specialised as a
    real launch would be (tensor pointers and ``N``/``D`` divisible by 16). Returns each kernel's distinct global
    load/store instructions, so tests can check that accesses are vectorised. Needs TRITON_INTERPRET unset."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = {}
    for name, fn, sig, consts in _kernel_specs():
        sig = {**sig, **{k: "constexpr" for k in consts}}
        div = [(i,) for i, (n, t) in enumerate(sig.items()) if t.startswith("*") or n in ("N", "D")]
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs={k: [["tt.divisibility", 16]] for k in div})
        ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4}).asm["ptx"]
        out[name] = sorted(set(re.findall(r"(?:ld|st)\.global[\w.:]*", ptx)))
    return out
