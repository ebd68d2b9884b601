"""Helpers of the kernel tests: a precision-aware comparison and the sm_90 compile check of every kernel."""

import contextlib

import torch

from bench.common import random_masks  # noqa: F401 (re-exported: the tests' I-JEPA-like masks)

# Relative RMS error that a result in this dtype may always have (rounding of inputs and outputs).
RMS_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
KERNEL_FILES = ("masked_gather", "target_norm_gather", "predictor_tokens", "ema", "ema_fp8", "block_ops",
                "block_ops_fp8", "adamw_ema")


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


def triton_e4m3(v: torch.Tensor) -> torch.Tensor:
    """``v`` (fp32) cast to e4m3 by Triton on ``v``'s device: the expected codes of a kernel that computes ``v``
    and casts it. On a GPU that is the hardware's round-to-nearest (``v.to(e4m3)``); the Triton interpreter's cast
    differs (it loses the carry of a mantissa that rounds up: 127.99 -> 64, and a unit of subnormals), so CPU tests
    compare a kernel's codes with the same cast of the reference's values."""
    if v.is_cuda:
        return v.to(torch.float8_e4m3fn)
    import triton
    import triton.language as tl

    @triton.jit
    def cast(x, q, N, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(q + o, tl.load(x + o, mask=o < N).to(q.dtype.element_ty), mask=o < N)

    flat = v.float().contiguous().reshape(-1)
    q = torch.empty(flat.shape, dtype=torch.float8_e4m3fn)
    cast[(triton.cdiv(flat.numel(), 1 << 16),)](flat, q, flat.numel(), BLOCK=1 << 16)
    return q.view(v.shape)


def compile_kernels_for(arch: int = 90) -> dict[str, list[str]]:
    """Compile every kernel's ``COMPILE_SPECS`` (declared next to it) to a cubin for ``sm_<arch>`` without a GPU
    (Triton's bundled ptxas), specialised as a real launch would be (tensor pointers and ``N``/``D`` divisible by
    16). Returns each kernel's distinct global load/store instructions, so tests can check that accesses are
    vectorised. Needs TRITON_INTERPRET unset."""
    import importlib
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = {}
    for module in KERNEL_FILES:
        specs = importlib.import_module(f"fastjepa.kernels.{module}").COMPILE_SPECS
        for name, (fn, sig, consts) in specs.items():
            sig = {**sig, **{k: "constexpr" for k in consts}}
            div = [(i,) for i, (n, t) in enumerate(sig.items()) if t.startswith("*") or n in ("N", "D")]
            src = ASTSource(fn=fn, signature=sig, constexprs=consts,
                            attrs={k: [["tt.divisibility", 16]] for k in div})
            ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4}).asm["ptx"]
            out[name] = sorted(set(re.findall(r"(?:ld|st)\.global[\w.:]*", ptx)))
    return out


@contextlib.contextmanager
def one_process_mesh():
    """A one-process gloo group and its 1-D CPU device mesh, for DTensor (FSDP2-like) parameters in one process;
    the group is destroyed afterwards unless it existed before."""
    import torch.distributed as dist
    from torch.distributed.tensor import init_device_mesh

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        if owns_group:
            dist.destroy_process_group()
