"""Fused ops for JEPA-style training (installed as ``fastjepa.kernels``).

Each op lives in its own file: the PyTorch reference (``x_ref``), the Triton kernels, launchers, the autograd
Function and the public functional ``x``. On CUDA tensors the functional runs what measured faster on a GPU
(``MEASURED_WINNERS``: the Triton kernel only where it beat PyTorch and torch.compile), under
``TRITON_INTERPRET=1`` the Triton kernel, elsewhere the reference. The kernel backend (``FASTJEPA_KERNEL_BACKEND``
in the environment, ``set_backend(name)`` or ``with kernel_backend(name):``) ``triton`` forces every Triton kernel,
``reference`` every reference. Masks are ``[M, B, K]`` index tensors (``torch.stack`` of the official list of M
``[B, K]`` tensors); indices outside ``[0, N)`` raise on every path.
"""

from fastjepa.kernels._utils import (
    MEASURED_WINNERS,
    get_backend,
    kernel_backend,
    mask_index,
    set_backend,
)
from fastjepa.kernels.adamw_ema import adamw_ema_step, adamw_ema_step_ref
from fastjepa.kernels.block_ops import add_layer_norm, add_layer_norm_ref, bias_gelu, bias_gelu_ref
from fastjepa.kernels.ema import ema_update, ema_update_ref
from fastjepa.kernels.ema_fp8 import ema_update_fp8, ema_update_fp8_ref
from fastjepa.kernels.masked_gather import masked_gather, masked_gather_ref
from fastjepa.kernels.predictor_tokens import predictor_tokens, predictor_tokens_ref
from fastjepa.kernels.target_norm_gather import (
    target_norm_gather,
    target_norm_gather_ref,
    target_norm_smooth_l1,
    target_norm_smooth_l1_ref,
)

__all__ = [
    "MEASURED_WINNERS",
    "get_backend",
    "kernel_backend",
    "mask_index",
    "set_backend",
    "adamw_ema_step",
    "adamw_ema_step_ref",
    "add_layer_norm",
    "add_layer_norm_ref",
    "bias_gelu",
    "bias_gelu_ref",
    "ema_update",
    "ema_update_ref",
    "ema_update_fp8",
    "ema_update_fp8_ref",
    "masked_gather",
    "masked_gather_ref",
    "predictor_tokens",
    "predictor_tokens_ref",
    "target_norm_gather",
    "target_norm_gather_ref",
    "target_norm_smooth_l1",
    "target_norm_smooth_l1_ref",
]
