"""The ViT block's memory-bound half against torch.compile's fusion of the same ops, at ViT-H/14's three call sites
(context encoder and predictor with their backward, target forward without): ``add_layer_norm`` (residual add +
LayerNorm), ``bias_gelu`` (fc1's bias + exact GELU) and the whole ``residual_mlp`` (the two, fc1 and fc2: what
``fastjepa.block_impl`` chooses between). Providers: ``reference`` (eager PyTorch), ``compile`` (inductor, what
the default step runs), ``max_autotune`` (inductor's ``max-autotune-no-cudagraphs``, GPU only, the two fused ops
alone) and ``triton``
(fastjepa's kernels). Bytes are the memory-bound ops' ideal traffic (the whole half's GEMMs are not counted).

At the target call site (forward only) the FP8 target's variants too (``fastjepa.fp8: target``): ``layer_norm_fp8``
and ``gelu_fp8`` (the norm and the GELU emitting the next GEMM's e4m3 rows and scales) against compiling their
references (the op, then ``quantize_rowwise``), and ``residual_mlp_fp8``, the FP8 block's half both ways."""

import copy

import torch

from fastjepa.kernels import add_layer_norm, add_layer_norm_ref, bias_gelu, bias_gelu_ref
from fastjepa.kernels._utils import forced_triton
from fastjepa.kernels.block_ops_fp8 import gelu_fp8, gelu_fp8_ref, layer_norm_fp8, layer_norm_fp8_ref
from fastjepa.kernels.ema_fp8 import quantize_rowwise
from fastjepa.modules.block import Block
from fastjepa.modules.fp8 import Float8Linear, fp8_unsupported, to_float8

from .common import BenchConfig, Case, compiled, fused_available, grad_fn, run_cases

# name, sequences, tokens, width, heads, with backward: ViT-H/14 at batch 128 and the in1k recipe's expected
# token counts (fastjepa.parallel.call_sites: 71 context tokens, 4 target blocks of 44 in the repeat layout)
SHAPES = [("vit_h14 context", 128, 71, 1280, 16, True), ("vit_h14 target", 128, 256, 1280, 16, False),
          ("vit_h14 predictor", 512, 115, 384, 12, True)]
QUICK = [("tiny", 2, 9, 40, 4, True)]


def cases(cfg: BenchConfig) -> list[Case]:
    shapes = QUICK if cfg.quick else SHAPES if cfg.device.startswith("cuda") else SHAPES[-1:]
    return [case for shape in shapes for case in shape_cases(cfg, *shape)]


def providers_of(reference, fused, cfg: BenchConfig, autotune: bool = True) -> dict:
    out = {"reference": reference, "compile": compiled(reference, cfg)}
    if autotune and cfg.device.startswith("cuda") and not cfg.quick:
        out["max_autotune"] = torch.compile(reference, mode="max-autotune-no-cudagraphs", dynamic=False)
    if fused_available(cfg):
        out["triton"] = forced_triton(fused)
    return out


def timed(fns: dict, inputs: list[torch.Tensor], grad: bool, cfg: BenchConfig) -> dict:
    """``{provider: {mode: callable}}``: the forward, and with ``grad`` the forward + backward of the outputs'
    sum of squares (every output gets a gradient)."""
    out = {}
    for provider, fn in fns.items():
        def fwd(fn=fn):
            with torch.autocast("cuda", torch.bfloat16, enabled=cfg.device.startswith("cuda")):
                res = fn(*inputs)
            return sum(r.float().square().sum() for r in (res if isinstance(res, tuple) else (res,)))

        if grad:
            _, fwd_bwd = grad_fn(fwd, [t for t in inputs if t.requires_grad], torch.ones((), device=cfg.device))
            out[provider] = {"fwd+bwd": fwd_bwd}
        else:
            out[provider] = {"fwd": fwd}
    return out


def shape_cases(cfg: BenchConfig, name, rows, tokens, dim, heads, grad) -> list[Case]:
    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    block = Block(dim, heads).to(cfg.device)
    block.requires_grad_(grad)
    x, attn = (torch.randn(rows, tokens, dim, device=cfg.device, dtype=dtype, requires_grad=grad) for _ in range(2))
    h = torch.randn(rows, tokens, 4 * dim, device=cfg.device, dtype=dtype, requires_grad=grad)
    shape, e = f"{name} {rows}x{tokens}x{dim}", x.element_size()
    mode = "fwd+bwd" if grad else "fwd"
    act, wide = rows * tokens * dim * e, rows * tokens * 4 * dim * e
    # ideal traffic: forward reads x, attn and writes s, out; backward reads s, dout, ds and writes one gradient
    ln_bytes = 4 * act + (4 * act if grad else 0)
    gelu_bytes = 2 * wide + (3 * wide if grad else 0)
    norm = (block.norm2.weight, block.norm2.bias, block.norm2.eps)
    cases = [
        Case("add_layer_norm", shape, dtype, {mode: ln_bytes},
             timed(providers_of(lambda a, b: add_layer_norm_ref(a, b, *norm), lambda a, b: add_layer_norm(a, b, *norm),
                                cfg), [x, attn], grad, cfg)),
        Case("bias_gelu", shape, dtype, {mode: gelu_bytes},
             timed(providers_of(lambda t: bias_gelu_ref(t, block.mlp.fc1.bias),
                                lambda t: bias_gelu(t, block.mlp.fc1.bias), cfg), [h], grad, cfg)),
        Case("residual_mlp", shape, dtype, {mode: ln_bytes + gelu_bytes},
             # no max-autotune here: autotuning fc1 and fc2 takes minutes, beyond gpu_check's stage budget
             timed(providers_of(lambda a, b: block.residual_mlp(a, b, "compile"),
                                lambda a, b: block.residual_mlp(a, b, "fused"), cfg, autotune=False),
                   [x, attn], grad, cfg)),
    ]
    if not grad or cfg.quick:
        cases += fp8_cases(cfg, block, shape, x.detach(), attn.detach(), h.detach(), act, wide)
    return cases


def fp8_cases(cfg: BenchConfig, block: Block, shape: str, x, attn, h, act: int, wide: int) -> list[Case]:
    """The FP8 target block's memory-bound half (forward only), where FP8 matmuls run (the CPU emulates them)."""
    if fp8_unsupported(torch.device(cfg.device)):
        return []
    e, dtype = x.element_size(), x.dtype
    replica = to_float8(copy.deepcopy(block).requires_grad_(False).to(dtype))
    for layer in replica.modules():
        if isinstance(layer, Float8Linear):  # the e4m3 weights the EMA keeps
            layer.weight_e4m3, layer.weight_scale = quantize_rowwise(layer.weight.float())
    norm = (replica.norm2.weight, replica.norm2.bias, replica.norm2.eps)
    # ideal traffic: read x and attn, write s and the e4m3 rows (1 byte each); read h, write its e4m3 rows
    ln_bytes, gelu_bytes = 3 * act + act // e, wide + wide // e
    return [
        Case("layer_norm_fp8", shape, dtype, {"fwd": ln_bytes},
             timed(providers_of(lambda a, b: layer_norm_fp8_ref(a, *norm, y=b),
                                lambda a, b: layer_norm_fp8(a, *norm, y=b), cfg), [x, attn], False, cfg)),
        Case("gelu_fp8", shape, dtype, {"fwd": gelu_bytes},
             timed(providers_of(gelu_fp8_ref, gelu_fp8, cfg), [h], False, cfg)),
        Case("residual_mlp_fp8", shape, dtype, {"fwd": ln_bytes + gelu_bytes},
             timed(providers_of(lambda a, b: replica.residual_mlp(a, b, "compile"),
                                lambda a, b: replica.residual_mlp(a, b, "fused"), cfg, autotune=False),
                   [x, attn], False, cfg)),
    ]


def run(cfg: BenchConfig) -> list[dict]:
    return run_cases(cases(cfg), cfg)
