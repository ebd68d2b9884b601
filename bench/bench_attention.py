"""Attention at the I-JEPA shapes: every ViT attention backend against the official math, and the predictor's
mask-token attention in the official repeated-context layout against the shared-context layout.

Cases (ViT-H/14, 128 images per GPU, official masks: ~70 context tokens, 4 blocks of ~44 targets):

- ``vit_attention`` target encoder (256 tokens, head dim 80), context encoder (70 tokens, head dim 80), predictor
  (M*B sequences of 70 + 44 tokens, head dim 24): providers ``reference`` (official math, fp32 softmax) and each
  backend of ``fastjepa.modules.attention_backends`` available here.
- ``predictor_attention`` per batch of images: ``reference`` = the official layout (the context repeated once per
  target block) on SDPA; ``shared_*`` = one sequence per image through ``block_attention`` (Triton, FlexAttention,
  dense reference). Both produce every target query's attention output; the shared layout also skips the M-1
  repeated context queries, which is its point.

GB/s counts the ideal traffic (q, k, v read, out written; backward adds dout, out read and dq, dk, dv written).
``python -m bench --suite attention [--quick]``.
"""

import torch

from fastjepa.kernels.block_attention import block_attention
from fastjepa.modules import attention_backends as backends

from .common import BenchConfig, Case, fused_available, grad_fn, run_cases

# name: (sequences, heads, tokens, head dim)
SHAPES = {
    "vith14_target_L256_d80": (128, 16, 256, 80),
    "vith14_context_L70_d80": (128, 16, 70, 80),
    "vith14_predictor_L114_d24": (512, 16, 114, 24),
}
QUICK_SHAPES = {"tiny_L17_d24": (2, 2, 17, 24)}
# name: (images, heads, context tokens, target tokens, blocks, head dim)
SHARED = {"vith14_pred_B128_ctx70_4x44_d24": (128, 16, 70, 44, 4, 24)}
QUICK_SHARED = {"tiny_B2_ctx7_3x4_d16": (2, 2, 7, 4, 3, 16)}


def _bytes(numel: int, elem: int) -> dict[str, int]:
    return {"fwd": 4 * numel * elem, "fwd+bwd": (4 + 8) * numel * elem}


def _modes(make_out, inputs) -> dict:
    _, fwd_bwd = grad_fn(make_out, inputs)
    return {"fwd": lambda: make_out(), "fwd+bwd": fwd_bwd}


def backend_case(cfg: BenchConfig, dtype, name: str, seqs: int, heads: int, tokens: int, dim: int) -> Case:
    # One function per shape, so that the providers' closures bind this shape's tensors.
    q, k, v = (torch.randn(seqs, heads, tokens, dim, device=cfg.device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    scale = dim**-0.5
    providers = {}
    # the reference first: run_cases computes speed-ups against it in provider order
    for backend in ["math"] + [b for b in backends.available_backends(cfg.device, dtype, dim) if b != "math"]:
        try:  # a pinned kernel may refuse this shape or dtype: leave it out, as auto does
            backends.attention(q, k, v, scale, backend)
        except RuntimeError as err:
            print(f"attention backend {backend} skipped at {name}: {str(err).splitlines()[0][:100]}")
            continue
        providers["reference" if backend == "math" else backend] = _modes(
            lambda b=backend: backends.attention(q, k, v, scale, b), [q, k, v])
    return Case("vit_attention", name, dtype, _bytes(q.numel(), q.element_size()), providers)


def shared_case(cfg: BenchConfig, dtype, name: str, batch: int, heads: int, ctx: int, tgt: int, blocks: int,
                dim: int) -> Case:
    seq_len = ctx + blocks * tgt
    q, k, v = (torch.randn(batch, seq_len, heads, dim, device=cfg.device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    # Official layout: the same tokens, the context copied into each block's sequence.
    rep = [torch.randn(blocks * batch, heads, ctx + tgt, dim, device=cfg.device, dtype=dtype, requires_grad=True)
           for _ in range(3)]
    providers = {"reference": _modes(lambda: backends.attention(*rep, dim**-0.5, "sdpa"), rep)}
    shared = ["reference"] + (["flex"] if cfg.device.startswith("cuda") else [])  # FlexAttention: no CPU backward
    shared += ["triton"] if fused_available(cfg) else []
    for backend in shared:
        providers[f"shared_{backend}"] = _modes(
            lambda b=backend: block_attention(q, k, v, ctx, blocks, backend=b), [q, k, v])
    return Case("predictor_attention", name, dtype, _bytes(q.numel(), q.element_size()), providers)


def run(cfg: BenchConfig) -> list[dict]:
    # bf16 on a GPU; fp32 on CPU (the Triton interpreter mishandles bf16; CPU runs are smoke tests).
    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    cases = [backend_case(cfg, dtype, name, *shape) for name, shape in (QUICK_SHAPES if cfg.quick else SHAPES).items()]
    cases += [shared_case(cfg, dtype, name, *shape) for name, shape in (QUICK_SHARED if cfg.quick else SHARED).items()]
    return run_cases(cases, cfg)
