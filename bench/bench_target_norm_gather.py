"""target_norm_gather (targets: LayerNorm without affine at the target blocks) and the fused loss
target_norm_smooth_l1 (targets never materialised) against the official full-sequence LayerNorm + gather."""

import torch

from fastjepa.kernels import target_norm_gather, target_norm_gather_ref
from fastjepa.kernels._utils import forced_triton
from fastjepa.kernels.target_norm_gather import target_norm_smooth_l1, target_norm_smooth_l1_ref

from .common import BenchConfig, Case, compiled, fused_available, grad_fn, random_masks, run_cases

# name, B, N, D, K, M (target blocks), nenc
SHAPES = [("vit_h14 tgt", 128, 256, 1280, 44, 4, 1), ("vit_b16 tgt", 128, 196, 768, 36, 4, 1)]
QUICK = [("tiny", 1, 16, 32, 5, 2, 2)]


def cases(cfg: BenchConfig) -> list[Case]:
    # Without a GPU only the smaller shape runs (a smoke test of the script, not a measurement).
    shapes = QUICK if cfg.quick else SHAPES if cfg.device.startswith("cuda") else SHAPES[-1:]
    return [case for shape in shapes for case in shape_cases(cfg, *shape)]


def shape_cases(cfg: BenchConfig, name, batch, n, d, k, m, nenc) -> list[Case]:
    # A function per shape, so that the providers' closures bind this shape's tensors.
    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    out = []
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, n, d, generator=g).to(cfg.device, dtype)
    pred = torch.randn(m * nenc * batch, k, d, generator=g).to(cfg.device, dtype).requires_grad_(True)
    masks = random_masks(m, batch, n, k, g, cfg.device)
    shape = f"{name} B{batch} N{n} D{d} K{k} M{m} nenc{nenc}"
    e = h.element_size()
    gathered, written = m * batch * k * d * e, m * nenc * batch * k * d * e

    targets = {"reference": target_norm_gather_ref, "compile": compiled(target_norm_gather_ref, cfg)}
    if fused_available(cfg):
        targets["triton"] = forced_triton(target_norm_gather)
    providers = {p: {"fwd": lambda f=f: f(h, masks, nenc)} for p, f in targets.items()}
    out.append(Case("target_norm_gather", shape, dtype, {"fwd": gathered + written}, providers))

    losses = {"reference": target_norm_smooth_l1_ref, "compile": compiled(target_norm_smooth_l1_ref, cfg)}
    if fused_available(cfg):
        losses["triton"] = forced_triton(target_norm_smooth_l1)
    providers = {}
    for p, f in losses.items():
        def fwd(f=f):
            return f(pred, h, masks, nenc)

        bwd, fwd_bwd = grad_fn(fwd, [pred], torch.ones((), device=cfg.device, dtype=dtype))
        providers[p] = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
    fwd_bytes, bwd_bytes = gathered + written, gathered + 2 * written
    out.append(Case("target_norm_smooth_l1", shape, dtype,
                    {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}, providers))
    return out

def run(cfg: BenchConfig) -> list[dict]:
    return run_cases(cases(cfg), cfg)

