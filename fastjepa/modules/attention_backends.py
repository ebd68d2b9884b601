"""Attention backends for the ViT blocks, chosen by name (``fastjepa.attn_backend`` in the config).

Every backend computes ``softmax(q k^T * scale) v`` on ``[B, H, L, D]`` tensors and returns ``[B, H, L, D]``:

- ``math``: the official numerics (scores materialised, scaled after the matmul, softmax in fp32); the reference.
- ``sdpa``: ``F.scaled_dot_product_attention`` with PyTorch's own dispatch.
- ``sdpa_flash`` / ``sdpa_cudnn`` / ``sdpa_efficient`` / ``sdpa_math``: SDPA pinned to one kernel with
  ``torch.nn.attention.sdpa_kernel``.
- ``flash_attn`` (FlashAttention-2, ``flash_attn.flash_attn_func``), ``flash_attn3`` (FlashAttention-3,
  ``flash_attn_interface``, Hopper GPUs) and ``xformers`` (``memory_efficient_attention``) when those packages are
  installed.
- ``auto``: on a GPU, the fastest of the available backends (cuDNN and FlashAttention-3 among them) for this head
  count, head dim, dtype, grad mode and sequence lengths (bucketed to powers of two), timed once and cached for
  the process; on CPU the deterministic choice ``sdpa``. The trainer resolves every ``auto`` attention before it
  compiles anything (``Attention.resolve_backend``), so compiled blocks read a plain name and never re-trace.
"""

import importlib.util
import weakref

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastjepa.choices import ATTENTION_BACKENDS as BACKENDS
from fastjepa.choices import VARLEN_ATTENTION_BACKENDS as VARLEN_BACKENDS
from fastjepa.kernels._utils import compiled_flex_attention
from fastjepa.timing import fastest

_SDPA_PINNED = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
DEFAULT = "sdpa"


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The official I-JEPA attention: ``(q @ k^T) * scale``, softmax in fp32 (at least), probabilities back in v's
    dtype. Under autocast this is exactly the official numerics."""
    attn = (q @ k.transpose(-2, -1)) * scale
    return attn.softmax(dim=-1, dtype=torch.promote_types(attn.dtype, torch.float32)).to(v.dtype) @ v


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _sdpa_pinned(kind: SDPBackend):
    def run(q, k, v, scale):
        with sdpa_kernel(kind):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return run


def _flash_attn(q, k, v, scale):
    from flash_attn import flash_attn_func

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale).transpose(
        1, 2
    )


def _flash_attn3(q, k, v, scale):
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    out = out[0] if isinstance(out, tuple) else out  # some FlashAttention-3 releases also return the LSE
    return out.transpose(1, 2)


def _xformers(q, k, v, scale):
    from xformers.ops import memory_efficient_attention

    out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


_IMPLS = {
    "math": attention_math,
    "sdpa": _sdpa,
    **{name: _sdpa_pinned(kind) for name, kind in _SDPA_PINNED.items()},
    "flash_attn": _flash_attn,
    "flash_attn3": _flash_attn3,
    "xformers": _xformers,
}


# Looked up once: find_spec inside a compiled block would break the graph.
_INSTALLED = {package: importlib.util.find_spec(package) is not None
              for package in ("flash_attn", "flash_attn_interface", "xformers")}


def installed(package: str) -> bool:
    return _INSTALLED[package] if package in _INSTALLED else importlib.util.find_spec(package) is not None


def supports(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``backend`` can run on this device, dtype and head dim (documented kernel constraints; SDPA may still
    refuse a shape it cannot handle, which ``attention`` reports with PyTorch's reason)."""
    device = torch.device(device)
    half = dtype in (torch.float16, torch.bfloat16)
    cuda = device.type == "cuda"
    if backend in ("math", "sdpa", "sdpa_math"):
        return True
    if backend == "sdpa_flash":
        # PyTorch also ships a CPU flash kernel (any float dtype); on CUDA, fp16/bf16 with head dim % 8 == 0.
        return not cuda or (half and head_dim % 8 == 0 and head_dim <= 256)
    if backend == "sdpa_cudnn":
        return cuda and half and torch.cuda.get_device_capability(device) >= (8, 0)
    if backend == "sdpa_efficient":
        return cuda
    if backend == "flash_attn":
        return cuda and half and installed("flash_attn")
    if backend == "flash_attn3":  # FlashAttention-3: Hopper (sm_90) kernels
        return (cuda and half and head_dim % 8 == 0 and installed("flash_attn_interface")
                and torch.cuda.get_device_capability(device) >= (9, 0))
    if backend == "xformers":
        return cuda and installed("xformers")
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def available_backends(device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Concrete backends (not ``auto``) that can run here, the reference ``math`` last."""
    return [b for b in BACKENDS[1:] if supports(b, device, dtype, head_dim)]


_AUTO_CACHE: dict[tuple, str] = {}
_AUTO_TIMES: dict[tuple, dict[str, float | str]] = {}  # the timings behind each choice


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _auto_key(q: torch.Tensor, k: torch.Tensor, grad: bool) -> tuple:
    # Sequence lengths bucketed to powers of two and the batch left out: I-JEPA's token counts change every step
    # (masks), and one timing per bucket keeps the choice stable (and available to compiled code) across steps.
    return (str(q.device), q.dtype, q.shape[1], q.shape[-1], _bucket(q.shape[-2]), _bucket(k.shape[-2]), grad)


def _candidate(name: str, q, k, v, scale: float, grad: bool):
    impl = _IMPLS[name]
    q, k, v = (t.detach().requires_grad_(grad) for t in (q, k, v))

    def once():
        out = impl(q, k, v, scale)
        if grad:
            torch.autograd.grad(out, (q, k, v), out)

    return once


def pick_fastest(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, grad: bool) -> tuple[str, dict]:
    """Time every available backend except the two materialising ones (``math``, ``sdpa_math``) on these inputs,
    with the backward when ``grad``; returns the fastest name and ``{name: milliseconds or why it was excluded}``."""
    names = [n for n in available_backends(q.device, q.dtype, q.shape[-1]) if n not in ("math", "sdpa_math")]
    best, times = fastest({n: _candidate(n, q, k, v, scale, grad) for n in names})
    return best or DEFAULT, times


def resolve(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> str:
    """The concrete backend ``backend`` stands for on these inputs (``auto`` -> cached or timed choice)."""
    if backend != "auto":
        return backend
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = _auto_key(q, k, grad)
    if key in _AUTO_CACHE:
        return _AUTO_CACHE[key]
    if not q.is_cuda or torch.compiler.is_compiling():
        return DEFAULT
    _AUTO_CACHE[key], _AUTO_TIMES[key] = pick_fastest(q, k, v, scale, grad)
    return _AUTO_CACHE[key]


def auto_choices() -> dict[tuple, str]:
    """What ``auto`` picked so far: ``{(device, dtype, heads, head dim, Lq bucket, Lk bucket, grad): backend}``."""
    return dict(_AUTO_CACHE)


def auto_timings(q: torch.Tensor, k: torch.Tensor, grad: bool) -> dict[str, float | str]:
    """The timings behind ``auto``'s choice for inputs like these: ``{}`` where nothing was timed (CPU)."""
    return dict(_AUTO_TIMES.get(_auto_key(q, k, grad), {}))


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; choose one of {BACKENDS} (fastjepa.attn_backend in the config)"
        )
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str = "auto") -> torch.Tensor:
    """``softmax(q k^T * scale) v`` with the named backend. q, k, v: ``[B, H, L, D]`` -> ``[B, H, L, D]``."""
    name = resolve(check_backend(backend), q, k, v, scale)
    # Checked eagerly only: torch.compile traces the first (eager-validated) call's choice.
    if not torch.compiler.is_compiling() and not supports(name, q.device, q.dtype, q.shape[-1]):
        raise RuntimeError(
            f"attention backend {name!r} cannot run on {q.device.type} with {q.dtype} and head dim {q.shape[-1]}"
            f"; available here: {available_backends(q.device, q.dtype, q.shape[-1])} (or use 'auto')"
        )
    return _IMPLS[name](q, k, v, scale)


# ---------------------------------------------------------------------------------------------------------------
# Variable-length (packed) attention: sequences of different lengths concatenated along the token dimension,
# delimited by cumulative lengths (flash-attn's cu_seqlens convention). No padding FLOPs on flash_attn/flex.

def _varlen_math(q, k, v, cu_seqlens, max_seqlen, scale):
    bounds = cu_seqlens.tolist()
    outs = [attention_math(*(t[a:b].transpose(0, 1) for t in (q, k, v)), scale).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(outs)


def varlen_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every packed token: its sequence id and its position inside that sequence."""
    lengths = cu_seqlens.diff()
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=total)
    return seq, torch.arange(total, device=cu_seqlens.device) - cu_seqlens[seq]


def _varlen_sdpa(q, k, v, cu_seqlens, max_seqlen, scale):
    # Padded to [S, H, max_seqlen, D] with a key-padding mask: SDPA's masked kernels (efficient, cuDNN, math).
    total, heads, dim = q.shape
    seq, pos = varlen_positions(cu_seqlens, total)
    num_seqs = len(cu_seqlens) - 1

    def pad(t):
        out = t.new_zeros(num_seqs, max_seqlen, heads, dim)
        out[seq, pos] = t
        return out.transpose(1, 2)

    valid = torch.arange(max_seqlen, device=q.device)[None, :] < cu_seqlens.diff()[:, None]
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[seq, pos]


_FLEX_MASK: list = [None, None]  # (weak reference to the cu_seqlens it was built for, block mask)


def _varlen_flex(q, k, v, cu_seqlens, max_seqlen, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Every block of a step attends within the same sequences: build the block mask once per cu_seqlens tensor
    # (held by a weak reference: a new step's tensor, even at a recycled address, builds a new mask).
    ref, block_mask = _FLEX_MASK
    if ref is None or ref() is not cu_seqlens:
        total = q.shape[0]
        seq, _ = varlen_positions(cu_seqlens, total)

        def same_sequence(b, h, q_idx, kv_idx):
            return seq[q_idx] == seq[kv_idx]

        block_mask = create_block_mask(same_sequence, None, None, total, total, device=q.device)
        _FLEX_MASK[:] = [weakref.ref(cu_seqlens), block_mask]
    fn = compiled_flex_attention() if q.is_cuda else flex_attention
    out = fn(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask, scale=scale)
    return out[0].transpose(0, 1)


def _varlen_flash_attn(q, k, v, cu_seqlens, max_seqlen, scale):
    from flash_attn import flash_attn_varlen_func

    cu = cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale)


_VARLEN_IMPLS = {"math": _varlen_math, "sdpa": _varlen_sdpa, "flex": _varlen_flex, "flash_attn": _varlen_flash_attn}


def varlen_auto(q: torch.Tensor) -> str:
    """Deterministic choice: flash-attn's varlen kernel when installed (GPU, fp16/bf16), else FlexAttention on a
    GPU, else padded SDPA."""
    if supports("flash_attn", q.device, q.dtype, q.shape[-1]):
        return "flash_attn"
    return "flex" if q.is_cuda else "sdpa"


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float, backend: str = "auto") -> torch.Tensor:
    """Attention within each packed sequence. q, k, v: ``[T, H, D]`` (T = total tokens); ``cu_seqlens``: int
    ``[S + 1]``, 0 first and T last; ``max_seqlen``: the longest sequence. Returns ``[T, H, D]``.
    Backends: "flash_attn", "flex" (FlexAttention, document mask; no CPU backward), "sdpa" (padded + key mask),
    "math" (per-sequence loop, the reference), "auto" (see ``varlen_auto``)."""
    if backend not in VARLEN_BACKENDS:
        raise ValueError(f"unknown varlen attention backend {backend!r}; choose one of {VARLEN_BACKENDS}")
    # Shapes only: reading cu_seqlens' values would synchronise with the host at every layer. Its values are
    # checked where it is built (fastjepa.mask_batch.PackedContext, on the CPU).
    if q.dim() != 3 or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"varlen_attention: q must be packed [T, H, D] and cu_seqlens an int [S + 1] tensor running "
                         f"from 0 to T; got q {tuple(q.shape)}, cu_seqlens {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    name = varlen_auto(q) if backend == "auto" else backend
    return _VARLEN_IMPLS[name](q, k, v, cu_seqlens, max_seqlen, scale)
