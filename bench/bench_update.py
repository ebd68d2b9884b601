"""The parameter update of a step over a ViT encoder (AdamW, the EMA of its target and the bf16 replica) plus a
predictor's AdamW: ``reference`` (fused AdamW, then the official per-parameter EMA loop), ``separate`` (fused AdamW,
then ``ema_update`` as the default step runs it) and ``triton`` (``adamw_ema_step``: one pass over the parameters,
what ``fastjepa.update_impl: fused`` runs). Bytes: what one pass must read and write (fp32 parameter, gradient and
moments, the target, the bf16 replica)."""

import torch

from fastjepa.kernels import adamw_ema_step, ema_update, ema_update_ref

from .bench_ema import vit_shapes
from .common import BenchConfig, Case, fused_available, run_cases

MOMENTUM = 0.996
# name, encoder shapes, predictor shapes (ViT-H/14 with the official 12-block, 384-wide predictor)
SHAPES = [("vit_h14", vit_shapes(1280, 32, 14, 256), vit_shapes(384, 12, 14, 256))]
QUICK = [("tiny", [(69,), (16, 32)], [(24,), (8, 8)])]


def cases(cfg: BenchConfig) -> list[Case]:
    shapes = QUICK if cfg.quick or not cfg.device.startswith("cuda") else SHAPES
    return [case for shape in shapes for case in shape_cases(cfg, *shape)]


def state(shapes, cfg: BenchConfig, copy_dtype):
    encoder = [torch.nn.Parameter(torch.randn(s, device=cfg.device)) for s in shapes[0]]
    predictor = [torch.nn.Parameter(torch.randn(s, device=cfg.device)) for s in shapes[1]]
    for p in encoder + predictor:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW([{"params": encoder}, {"params": predictor, "weight_decay": 0.0}], lr=1e-4,
                                  fused=True)
    target = [p.detach().clone() for p in encoder]
    copies = [t.to(copy_dtype) for t in target]
    return optimizer, target, encoder, copies


def shape_cases(cfg: BenchConfig, name, encoder_shapes, predictor_shapes) -> list[Case]:
    # On CPU the replica is fp16: the Triton interpreter mishandles bf16.
    copy_dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float16
    shapes = (encoder_shapes, predictor_shapes)
    enc = sum(torch.Size(s).numel() for s in encoder_shapes)
    pred = sum(torch.Size(s).numel() for s in predictor_shapes)
    ideal = enc * (4 + 4 + 4 + 16 + 8 + 2) + pred * (4 + 4 + 4 + 16)  # p rw, g r, m/v rw, target rw, replica w
    providers = {}
    opt, target, online, copies = state(shapes, cfg, copy_dtype)

    def reference():
        opt.step()
        ema_update_ref(target, online, MOMENTUM)
        torch._foreach_copy_(copies, target)

    def separate():
        opt.step()
        ema_update(target, online, MOMENTUM, copy=copies)

    providers["reference"], providers["separate"] = {"update": reference}, {"update": separate}
    if fused_available(cfg):
        providers["triton"] = {"update": lambda: adamw_ema_step(opt, target, online, MOMENTUM, copies,
                                                                 backend="triton")}
    shape = f"{name} encoder {enc / 1e6:.1f}M + predictor {pred / 1e6:.1f}M params"
    return [Case("adamw_ema", shape, torch.float32, {"update": ideal}, providers)]


def run(cfg: BenchConfig) -> list[dict]:
    return run_cases(cases(cfg), cfg)
