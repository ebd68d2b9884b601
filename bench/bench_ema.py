"""ema_update over every parameter of a ViT: the official per-parameter loop, torch._foreach_lerp_, one lerp over
flat buffers, and the fused multi-tensor kernels (Triton, CUDA C++ when built); with and without writing a bf16
copy of the target for its forward (baselines then cast with torch._foreach_copy_)."""

import torch

from fastjepa.kernels import ema_update_ref
from fastjepa.kernels.cuda_ext import available as cuda_ext_available
from fastjepa.kernels.ema import ema_update_fused

from .common import BenchConfig, Case, fused_available, run_cases

MOMENTUM = 0.996


def vit_shapes(dim: int, depth: int, patch: int, num_patches: int) -> list[tuple[int, ...]]:
    """Parameter shapes of an official-layout ViT (timm/I-JEPA order)."""
    block = [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,), (dim,), (dim,),
             (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return [(1, num_patches, dim), (dim, 3, patch, patch), (dim,)] + block * depth + [(dim,), (dim,)]


SHAPES = [("vit_h14", vit_shapes(1280, 32, 14, 256)), ("vit_b16", vit_shapes(768, 12, 16, 196))]
QUICK = [("tiny", [(69,), (16, 32)])]


def cases(cfg: BenchConfig) -> list[Case]:
    # Without a GPU only the smaller shape runs (a smoke test of the script, not a measurement).
    shapes = QUICK if cfg.quick else SHAPES if cfg.device.startswith("cuda") else SHAPES[-1:]
    return [case for shape in shapes for case in shape_cases(cfg, *shape)]


def shape_cases(cfg: BenchConfig, name, shapes) -> list[Case]:
    # A function per shape, so that the providers' closures bind this shape's tensors.
    # On CPU the copy is fp16: the Triton interpreter mishandles bf16.
    copy_dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float16
    out = []
    numel = sum(torch.Size(s).numel() for s in shapes)
    flat_t = torch.randn(numel, device=cfg.device)
    flat_o = torch.randn(numel, device=cfg.device)
    flat_c = torch.empty(numel, device=cfg.device, dtype=copy_dtype)
    sizes = [torch.Size(s).numel() for s in shapes]
    # The per-tensor lists are views into the flat buffers, so every provider does the same work.
    target = [t.view(s) for t, s in zip(flat_t.split(sizes), shapes, strict=True)]
    online = [o.view(s) for o, s in zip(flat_o.split(sizes), shapes, strict=True)]
    copies = [c.view(s) for c, s in zip(flat_c.split(sizes), shapes, strict=True)]
    w = 1.0 - MOMENTUM

    def loop_copy():
        ema_update_ref(target, online, MOMENTUM)
        torch._foreach_copy_(copies, target)

    def foreach_copy():
        torch._foreach_lerp_(target, online, w)
        torch._foreach_copy_(copies, target)

    def flat_copy():
        flat_t.lerp_(flat_o, w)
        flat_c.copy_(flat_t)

    providers = {
        "reference": {"update": lambda: ema_update_ref(target, online, MOMENTUM), "update+copy": loop_copy},
        "foreach_lerp": {"update": lambda: torch._foreach_lerp_(target, online, w), "update+copy": foreach_copy},
        "flat_buffer": {"update": lambda: flat_t.lerp_(flat_o, w), "update+copy": flat_copy},
    }
    if fused_available(cfg):
        providers["triton"] = {
            "update": lambda: ema_update_fused(target, online, MOMENTUM),
            "update+copy": lambda: ema_update_fused(target, online, MOMENTUM, copy=copies),
        }
    if cfg.device.startswith("cuda") and cuda_ext_available():
        providers["cuda"] = {
            "update": lambda: ema_update_fused(target, online, MOMENTUM, backend="cuda"),
            "update+copy": lambda: ema_update_fused(target, online, MOMENTUM, copy=copies, backend="cuda"),
        }
    update = 3 * numel * 4
    out.append(Case("ema", f"{name} {len(shapes)} tensors {numel / 1e6:.1f}M params fp32", torch.float32,
                    {"update": update, "update+copy": update + numel * flat_c.element_size()}, providers))
    return out

def run(cfg: BenchConfig) -> list[dict]:
    return run_cases(cases(cfg), cfg)
