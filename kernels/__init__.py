"""Fused ops for JEPA-style training (installed as ``fastjepa.kernels``).

Each op lives in its own file: the PyTorch reference (``x_ref``), the Triton kernels, launchers, the autograd
Function and the public functional ``x``. The functional takes the Triton path on CUDA tensors (or under
``TRITON_INTERPRET=1``) and the reference otherwise. The kernel backend ``reference``
(``FASTJEPA_KERNEL_BACKEND=reference`` in the environment, or ``set_backend("reference")``) turns every op back to
its reference. Masks are ``[M, B, K]`` index tensors (or the official list of M ``[B, K]`` tensors); indices
outside ``[0, N)`` raise on every path.
"""

from fastjepa.kernels._utils import get_backend, mask_index, set_backend, stack_masks
from fastjepa.kernels.ema import ema_update, ema_update_ref
from fastjepa.kernels.masked_gather import masked_gather, masked_gather_ref
from fastjepa.kernels.predictor_tokens import predictor_tokens, predictor_tokens_ref
from fastjepa.kernels.target_norm_gather import (
    target_norm_gather,
    target_norm_gather_ref,
    target_norm_smooth_l1,
    target_norm_smooth_l1_ref,
)

__all__ = [
    "get_backend",
    "mask_index",
    "set_backend",
    "stack_masks",
    "ema_update",
    "ema_update_ref",
    "masked_gather",
    "masked_gather_ref",
    "predictor_tokens",
    "predictor_tokens_ref",
    "target_norm_gather",
    "target_norm_gather_ref",
    "target_norm_smooth_l1",
    "target_norm_smooth_l1_ref",
]
