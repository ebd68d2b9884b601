"""predictor_tokens (the predictor's input: context repeated per target block + mask tokens at the targets)."""

import torch

from fastjepa.kernels import predictor_tokens, predictor_tokens_ref
from fastjepa.kernels._utils import forced_triton

from .common import BenchConfig, Case, compiled, fused_available, grad_fn, random_masks, run_cases

# name, B, N, Dp, Kc, Kt, nenc, M
SHAPES = [("vit_h14 pred", 128, 256, 384, 70, 44, 1, 4), ("vit_b16 pred", 128, 196, 384, 60, 36, 1, 4)]
QUICK = [("tiny", 1, 16, 32, 7, 3, 1, 2)]


def cases(cfg: BenchConfig) -> list[Case]:
    # Without a GPU only the smaller shape runs (a smoke test of the script, not a measurement).
    shapes = QUICK if cfg.quick else SHAPES if cfg.device.startswith("cuda") else SHAPES[-1:]
    return [case for shape in shapes for case in shape_cases(cfg, *shape)]


def shape_cases(cfg: BenchConfig, name, batch, n, d, kc, kt, nenc, m) -> list[Case]:
    # A function per shape, so that the providers' closures bind this shape's tensors.
    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    out = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(nenc * batch, kc, d, generator=g).to(cfg.device, dtype).requires_grad_(True)
    mask_token = torch.randn(1, 1, d, generator=g).to(cfg.device, dtype).requires_grad_(True)
    pos = torch.randn(1, n, d, generator=g).to(cfg.device, dtype)
    masks_enc = random_masks(nenc, batch, n, kc, g, cfg.device)
    masks_pred = random_masks(m, batch, n, kt, g, cfg.device)
    impls = {"reference": predictor_tokens_ref, "compile": compiled(predictor_tokens_ref, cfg)}
    if fused_available(cfg):
        impls["triton"] = forced_triton(predictor_tokens)
    providers = {}
    for p, f in impls.items():
        def fwd(f=f):
            return f(x, masks_enc, masks_pred, mask_token, pos)

        bwd, fwd_bwd = grad_fn(fwd, [x, mask_token])
        providers[p] = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
    e = x.element_size()
    x_bytes, out_bytes = nenc * batch * kc * d * e, m * nenc * batch * (kc + kt) * d * e
    index_bytes = (nenc * kc + m * kt) * batch * 8
    fwd_bytes, bwd_bytes = x_bytes + out_bytes + index_bytes, out_bytes + x_bytes
    out.append(Case("predictor_tokens", f"{name} B{batch} Dp{d} Kc{kc} Kt{kt} nenc{nenc} M{m}", dtype,
                    {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}, providers))
    return out

def run(cfg: BenchConfig) -> list[dict]:
    return run_cases(cases(cfg), cfg)
