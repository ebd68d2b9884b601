"""What the fused ops share: the backend switch, the mask-index checks, block sizes and small layout helpers.

The backend switch works like timm's ``use_fused_attn()``: ``FASTJEPA_KERNEL_BACKEND=reference`` in the
environment, or ``set_backend("reference")``, turns every op back to its PyTorch reference; ``triton`` runs every
Triton kernel on CUDA tensors (or under ``TRITON_INTERPRET=1``, how the kernels are tested on CPU); the default
``auto`` runs, on CUDA tensors, the implementation that measured faster (``MEASURED_WINNERS``) and Triton under the
interpreter.

Convention for every op that runs inside compiled code: its launchers are registered as ``torch.library`` custom
ops with fake implementations, and its ``autograd.Function`` calls ``op_or_launcher(op, launcher)``: the opaque
op while torch.compile traces (no graph break), the launcher itself in eager mode (no dispatcher overhead).
"""

import contextlib
import functools
import math
import os

import torch

from fastjepa.choices import KERNEL_BACKENDS

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install (macOS, Windows, ...): every op runs its PyTorch reference
    triton = tl = None

TRITON_HINT = "install triton (pip install 'fastjepa[gpu]' or pip install triton; Linux with an NVIDIA GPU)"


class _Absent:
    """Stands in for ``triton`` and ``triton.language`` when triton is not installed, so that the kernel files
    still define their kernels (their annotations and decorators run at import); ``use_triton`` is then False and
    no kernel is ever launched."""

    def jit(self, fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    def __getattr__(self, name):
        return self


if triton is None:
    triton = tl = _Absent()
    HAVE_TRITON = False
else:
    HAVE_TRITON = True


def require_triton(what: str) -> None:
    """For a Triton path asked for by name: say how to get triton instead of failing inside a stub."""
    if not HAVE_TRITON:
        raise RuntimeError(f"{what} needs triton, which is not installed: {TRITON_HINT}")

def triton_unavailable(device: torch.device, backend: str) -> str | None:
    """Why Triton kernels cannot run on ``device`` under kernel backend ``backend`` (None when they can): for a run
    that asks for them by name."""
    if not HAVE_TRITON:
        return f"triton is not installed ({TRITON_HINT})"
    if device.type != "cuda" and not interpreting():
        return f"the Triton kernels run on CUDA GPUs (or under TRITON_INTERPRET=1), this run is on {device.type}"
    if backend == "reference":
        return "fastjepa.kernel_backend=reference turns every kernel off"
    return None


_BACKEND = os.environ.get("FASTJEPA_KERNEL_BACKEND", "auto")
if _BACKEND not in KERNEL_BACKENDS:
    raise ValueError(f"FASTJEPA_KERNEL_BACKEND={_BACKEND!r}: choose one of {KERNEL_BACKENDS}")


def set_backend(name: str) -> None:
    """``"auto"`` (per op, what measured faster on a GPU), ``"triton"`` (every kernel where it can run) or
    ``"reference"``, for this process."""
    global _BACKEND
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {KERNEL_BACKENDS}")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


@contextlib.contextmanager
def kernel_backend(name: str):
    """``set_backend(name)`` inside a ``with`` block, the previous backend restored after it."""
    was = _BACKEND
    set_backend(name)
    try:
        yield
    finally:
        set_backend(was)


def forced_triton(op):
    """``op`` with its Triton kernel whatever ``auto`` would choose (benchmarks time the kernel itself)."""

    @functools.wraps(op)
    def call(*args, **kwargs):
        with kernel_backend("triton"):
            return op(*args, **kwargs)

    return call


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# What ``auto`` runs on a GPU: per op, (size, faster implementation) at each shape measured on an H200
# (bench/results/nvidia-h200/kernels.md: torch 2.11, bf16, batch 128, ViT-B/16 and ViT-H/14), size being the
# elements of the op's main input (the EMA: parameters); a call takes the winner at the measured size nearest to its
# own (log scale). A Triton kernel is the winner only where it beat both the PyTorch reference and torch.compile of
# the reference. Ops not listed (block attention) run Triton on a GPU.
MEASURED_WINNERS = {
    # fwd+bwd vs the reference: Triton 0.75x (ViT-B), 0.92x (ViT-H); torch.compile 0.75x, 0.93x
    "masked_gather": ((128 * 196 * 768, "reference"), (128 * 256 * 1280, "reference")),
    # fwd+bwd: Triton 1.23x, 1.16x; torch.compile 1.98x, 1.28x (the reference, not compiled, is the default)
    "predictor_tokens": ((128 * 60 * 384, "reference"), (128 * 70 * 384, "reference")),
    # fwd: Triton 3.85x, 4.24x; torch.compile 3.40x, 3.97x
    "target_norm_gather": ((128 * 196 * 768, "triton"), (128 * 256 * 1280, "triton")),
    # fwd+bwd: Triton 0.78x, 1.34x; torch.compile 0.85x, 1.00x
    "target_norm_smooth_l1": ((128 * 196 * 768, "reference"), (128 * 256 * 1280, "triton")),
    # update + bf16 replica copy: Triton 0.79 ms, torch._foreach_lerp_ 0.44, the official loop 3.43 (ViT-B, 86M
    # parameters); 2.51, 3.07 and 12.87 ms (ViT-H, 631M)
    "ema": ((85_800_000, "foreach"), (630_800_000, "triton")),
}


def measured_winner(op: str, size: int) -> str:
    """``"triton"``, ``"reference"`` or ``"foreach"``: what measured fastest at the size nearest to ``size``."""
    return min(MEASURED_WINNERS[op], key=lambda m: abs(math.log(max(size, 1) / m[0])))[1]


def use_triton(*tensors: torch.Tensor, op: str | None = None, size: int = 0) -> bool:
    """True when the Triton path should run for these tensors: triton installed, they live on a GPU (or the Triton
    interpreter is on), and the backend is ``triton``, or ``auto`` and Triton is what measured faster for ``op``
    at ``size`` (``MEASURED_WINNERS``; the interpreter always runs Triton: it is how kernels are tested)."""
    if _BACKEND == "reference" or not HAVE_TRITON:
        return False
    if not (interpreting() or all(t.is_cuda for t in tensors)):
        return False
    if _BACKEND == "triton" or op not in MEASURED_WINNERS or not any(t.is_cuda for t in tensors):
        return True
    return measured_winner(op, size) == "triton"


def op_or_launcher(op, launcher):
    """The registered ``torch.library`` op while torch.compile traces, the launcher itself in eager mode."""
    return op if torch.compiler.is_compiling() else launcher


def check_index_range(idx: torch.Tensor, num_tokens: int, op: str, name: str) -> None:
    """Indices outside ``[0, num_tokens)`` fail loudly on every path: a device-side assert on CUDA and in compiled
    code (no host synchronisation), an ``IndexError`` naming the op, the mask, the index and the range elsewhere.
    Unchecked, the fused kernels would read the next image's tokens (index N + k) or the previous one's (-1)."""
    if idx.numel() == 0:
        return
    ok = ((idx >= 0) & (idx < num_tokens)).all()
    message = f"{op}: {name} holds a token index outside [0, {num_tokens})"
    if idx.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(ok, message)
        return
    try:
        torch._assert_async(ok, message)  # on the CPU it checks at once, with no Python-level read of the tensor
    except RuntimeError:
        lo, hi = (int(v) for v in idx.aminmax())
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in (idx == bad).nonzero()[0])
        raise IndexError(f"{op}: {name}{list(where)} = {bad} is outside [0, {num_tokens}) (the tokens of one "
                         f"image); pass patch indices of the {num_tokens}-token grid") from None


def mask_index(masks: torch.Tensor, batch: int, num_tokens: int, op: str, name: str = "masks") -> torch.Tensor:
    """Stacked ``[M, B, K]`` masks -> a contiguous int index for ``[batch, num_tokens, D]`` tokens, with type,
    shape, dtype and range checked (errors name the op and the mask)."""
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"{op}: {name} is a {type(masks).__name__}; pass one [M, B, K] index tensor (torch.stack "
                        "the official list of M [B, K] tensors, or use fastjepa.mask_batch.Masks.from_lists)")
    if masks.dim() != 3 or masks.shape[1] != batch or masks.shape[0] < 1:
        raise ValueError(f"{op}: {name} has shape {tuple(masks.shape)}; expected [M, B, K] with B = {batch}, the "
                         "batch of the tokens")
    if masks.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: {name} has dtype {masks.dtype}; pass int64 (or int32) token indices in "
                         f"[0, {num_tokens})")
    check_index_range(masks, num_tokens, op, name)
    return masks.contiguous()


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def row_blocks(rows: int, dim: int) -> tuple[int, int]:
    """(rows per program, BLOCK_D): one program covers whole rows of the feature dimension. The interpreter runs
    programs one after another, so it gets as many rows per program as possible."""
    block_d = next_power_of_2(dim)
    budget = 1 << 16 if interpreting() else 8192
    return max(1, min(next_power_of_2(rows), budget // block_d)), block_d


def repeat_interleave_batch(x: torch.Tensor, batch_size: int, repeat: int) -> torch.Tensor:
    """``[G*B, ...]`` -> ``[G*repeat*B, ...]``: each group of B rows repeated ``repeat`` times in place
    (the official ordering that pairs predictions of every context block with their targets)."""
    if repeat == 1:
        return x
    groups = x.reshape(-1, batch_size, *x.shape[1:])
    return groups.unsqueeze(1).expand(-1, repeat, *groups.shape[1:]).reshape(-1, *x.shape[1:])


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once per process (eager FlexAttention is unfused). Automatic dynamic shapes: token
    counts change with every mask draw, a static compile would hit the recompile limit."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)
