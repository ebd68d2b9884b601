"""The global switch between fused kernels and their PyTorch references (like timm's ``use_fused_attn``)."""

import os

import torch

_FUSED = os.environ.get("FASTJEPA_FUSED", "1") != "0"


def set_fused(enabled: bool) -> None:
    """Turn every fused op on or off for this process (``FASTJEPA_FUSED=0`` sets the default to off)."""
    global _FUSED
    _FUSED = bool(enabled)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_enabled(*tensors: torch.Tensor) -> bool:
    """True when the fused path should run for these tensors: the switch is on and they live on a GPU
    (or the Triton interpreter is on, which is how the kernels are tested on CPU)."""
    if not _FUSED:
        return False
    return interpreting() or all(t.is_cuda for t in tensors)


def op_or_launcher(op, launcher):
    """The registered ``torch.library`` op while torch.compile traces (an opaque node with a fake implementation,
    so graphs need not break), the launcher itself in eager mode (no dispatcher overhead)."""
    return op if torch.compiler.is_compiling() else launcher
