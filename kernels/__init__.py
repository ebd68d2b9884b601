"""Fused ops for JEPA-style training (installed as ``fastjepa.kernels``).

Each op lives in its own file: the PyTorch reference (``x_ref``), the Triton kernels, launchers, the autograd
Function and the public functional ``x``. The functional takes the fused path on CUDA tensors (or under
``TRITON_INTERPRET=1``) and the reference otherwise. ``FASTJEPA_FUSED=0`` in the environment, or
``set_fused(False)``, turns every op back to its reference.
"""

from fastjepa.kernels._switch import fused_enabled, set_fused
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
    "fused_enabled",
    "set_fused",
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
