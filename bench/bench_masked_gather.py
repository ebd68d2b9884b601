"""masked_gather (context path: tokens after patch embedding, gathered at the context block + pos embed)."""

import torch

from fastjepa.kernels import masked_gather, masked_gather_ref
from fastjepa.kernels._utils import forced_triton

from .common import BenchConfig, Case, compiled, fused_available, grad_fn, random_masks, run_cases

# name, B, N, D, K, M (masks)
SHAPES = [("vit_h14 ctx", 128, 256, 1280, 70, 1), ("vit_b16 ctx", 128, 196, 768, 60, 1)]
QUICK = [("tiny", 2, 16, 32, 7, 1)]


def cases(cfg: BenchConfig) -> list[Case]:
    # Without a GPU only the smaller shape runs (a smoke test of the script, not a measurement).
    shapes = QUICK if cfg.quick else SHAPES if cfg.device.startswith("cuda") else SHAPES[-1:]
    return [case for shape in shapes for case in shape_cases(cfg, *shape)]


def shape_cases(cfg: BenchConfig, name, batch, n, d, k, m) -> list[Case]:
    # A function per shape, so that the providers' closures bind this shape's tensors.
    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    out = []
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, n, d, generator=g).to(cfg.device, dtype).requires_grad_(True)
    pos = torch.randn(n, d, generator=g).to(cfg.device, dtype)
    masks = random_masks(m, batch, n, k, g, cfg.device)
    ref_compiled = compiled(masked_gather_ref, cfg)
    impls = {"reference": masked_gather_ref, "compile": ref_compiled}
    if fused_available(cfg):
        impls["triton"] = forced_triton(masked_gather)
    providers = {}
    for provider, f in impls.items():
        def fwd(f=f):
            return f(tokens, masks, pos)

        bwd, fwd_bwd = grad_fn(fwd, [tokens])
        providers[provider] = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
    e = tokens.element_size()
    gathered = m * batch * k * d * e
    fwd_bytes = 2 * gathered + m * batch * k * 8 + n * d * e
    bwd_bytes = gathered + batch * n * d * e
    out.append(Case("masked_gather", f"{name} B{batch} N{n} D{d} K{k} M{m}", dtype,
                    {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}, providers))
    return out

def run(cfg: BenchConfig) -> list[dict]:
    return run_cases(cases(cfg), cfg)
