"""FP8 (e4m3) matmuls: the target encoder's forward (``fastjepa.fp8: target``), and with ``fastjepa.fp8: all``
also the context encoder's and the predictor's forward and backward, through torchao.

Half of an I-JEPA step's FLOPs is the target forward, which needs no gradient; on Hopper GPUs FP8 matmuls run at
twice the bf16 rate. ``Float8Linear`` is an ``nn.Linear`` (same parameters, same state dict) whose forward
quantises its input and its weight to e4m3 and multiplies them with ``torch._scaled_mm``, output in bf16.

Scaling is dynamic and row-wise: one scale per token of the input and one per output channel of the weight, each
its row's absolute maximum over e4m3's largest value (448). A row's extreme value then sets only its own scale:
the high-norm tokens ViTs are known to grow do not coarsen every other token's quantisation, as one tensor-wise
scale would; cuBLASLt runs row-wise scaled matmuls with bf16 outputs on Hopper at the tensor-wise speed.

The weights' e4m3 rows and scales are written by the EMA pass itself, from the fp32 target
(``fastjepa.kernels.ema_update_fp8``: one program per output row keeps the row in registers between the update
and its quantisation), so the target forward reads 1 byte per weight and quantises only its activations. Under
FSDP2 the replica is sharded and the forward quantises the gathered bf16 weight instead (about 1.9 GB moved for
ViT-H/14, under a millisecond at HBM speed). This no-grad path needs nothing of torchao's training machinery;
``bench_step``'s ``fastjepa_torchao_fp8`` provider times torchao's float8 layers on the same target forward, so
it is always measured against the library a user would reach for.

The trained GEMMs (``fastjepa.fp8: all``) are torchao's float8 training (``torchao.float8``, row-wise recipe:
e4m3 operands with one scale per row, forward and both backward GEMMs; ``to_float8_training``). Its layers keep
the ``nn.Linear`` parameters, so the fp32 master weights, the optimizer and checkpoints are unchanged.

Error: e4m3 keeps 3 mantissa bits, so rounding to nearest has a relative error of at most 2^-4, and its RMS is at
most 2^-4/sqrt(3) = 0.036 per operand (uniform rounding error at the top of a binade; smaller values of the
mantissa have less); a product of two rounded operands has at most sqrt(2) of that, 0.051, which a long dot
product of independent terms keeps as its relative RMS error. Through a network, the matmuls' errors add in
quadrature: n of them bound the output's relative RMS error by 0.051 sqrt(n) (tests/test_fp8.py).
"""

import importlib.util

import torch
from torch import nn

from fastjepa.kernels.ema_fp8 import quantize_rowwise

# Relative RMS error of one FP8 matmul output against its exact value (derivation in the module docstring).
MATMUL_REL_RMS = 2**0.5 * 2**-4 / 3**0.5


def fp8_unsupported(device: torch.device) -> str | None:
    """Why FP8 matmuls cannot run on ``device``, or None when they can (the CPU runs them in software)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no FP8 tensor cores "
                "(they start at 8.9: L4, L40, H100, H200, B200)")
    return None


def fp8_matmul(x8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               weight_e4m3: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` given as e4m3 rows ``x8 [..., K]`` and their fp32 ``[rows, 1]`` scales,
    bf16 out; the weight's e4m3 rows and scales are ``weight_e4m3`` and ``weight_scale`` when given (the EMA wrote
    them), else quantised here."""
    w8, w_scale = (weight_e4m3, weight_scale) if weight_e4m3 is not None else quantize_rowwise(weight)
    # the bias in the GEMM's epilogue (cuBLASLt/CUTLASS add it in fp32 before the bf16 rounding): no extra pass
    bias = None if bias is None else bias.to(torch.bfloat16)
    out = torch._scaled_mm(x8.reshape(-1, x8.shape[-1]), w8.t(), scale_a=x_scale, scale_b=w_scale.t(), bias=bias,
                           out_dtype=torch.bfloat16)
    return out.reshape(*x8.shape[:-1], weight.shape[0])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               weight_e4m3: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` with both operands in e4m3 (row-wise dynamic scales), bf16 out: ``x`` quantised
    here, then ``fp8_matmul``."""
    x8, x_scale = quantize_rowwise(x.reshape(-1, x.shape[-1]))
    return fp8_matmul(x8.view(x.shape), x_scale, weight, bias, weight_e4m3, weight_scale)


def torchao_unavailable() -> str | None:
    """Why ``fastjepa.fp8: all`` cannot run here (torchao is not installed), or None."""
    if importlib.util.find_spec("torchao") is None:
        return ("it trains through torchao's float8 layers and torchao is not installed "
                "(pip install torchao; pure Python for this use)")
    return None


def to_float8_training(module: nn.Module, source: type = nn.Linear) -> int:
    """Every layer of type ``source`` (an ``nn.Linear`` type) in ``module`` whose sizes e4m3 GEMMs accept
    (multiples of 16) becomes torchao's ``Float8Linear`` with row-wise scales (forward and backward GEMMs in e4m3,
    the same parameters and state dict). Returns how many layers it converted."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def fits(layer: nn.Module, fqn: str) -> bool:
        return type(layer) is source and layer.in_features % 16 == 0 and layer.out_features % 16 == 0

    before = sum(type(m) is source for m in module.modules())
    convert_to_float8_training(module, config=Float8LinearConfig.from_recipe_name("rowwise"), module_filter_fn=fits)
    return before - sum(type(m) is source for m in module.modules())


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` whose forward runs in FP8 (no gradient flows through it: the target forward's layers).
    ``weight_e4m3`` and ``weight_scale``, when held (``IJEPA.quantize_fp8_weights``), are the weight's e4m3 rows and
    scales that the EMA writes with the weight (``fastjepa.kernels.ema_update_fp8``): the forward quantises no
    weight."""

    weight_e4m3: torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.weight_e4m3, self.weight_scale)

    def forward_e4m3(self, x8: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """The layer on an input that its producer already quantised (``fastjepa.kernels.block_ops_fp8``)."""
        return fp8_matmul(x8, x_scale, self.weight, self.bias, self.weight_e4m3, self.weight_scale)


def fp8_layers(module: nn.Module) -> list[Float8Linear]:
    return [m for m in module.modules() if isinstance(m, Float8Linear)]


def release_fp8_weights(module: nn.Module) -> None:
    """Drop the e4m3 weights the EMA keeps (``IJEPA.quantize_fp8_weights``): under FSDP2 the replica is sharded,
    and the forward quantises the gathered bf16 weight instead."""
    for layer in fp8_layers(module):
        layer.weight_e4m3 = layer.weight_scale = None


def to_float8(module: nn.Module) -> nn.Module:
    """Every ``nn.Linear`` inside ``module`` becomes a ``Float8Linear`` over the same parameters (names and
    state dict unchanged). Returns ``module``."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                fp8 = Float8Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device="meta")
                fp8.weight, fp8.bias = child.weight, child.bias
                setattr(parent, name, fp8)
    return module
