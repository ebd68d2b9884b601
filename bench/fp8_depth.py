"""How the FP8 target forward's error grows with depth: the relative RMS error of every block's output and of the
normalised targets, FP8 (``fastjepa.fp8: target``) and bf16 against fp32, through one target encoder.

    python -m bench.fp8_depth                                      # ViT-H/14 at 224 px, random init, batch 2 (CPU)
    python -m bench.fp8_depth --model vit_mini --patch 4 --img 28 --in-chans 1 --weights RUN/target_encoder.pt

The target forward runs as the trainer runs it: a bf16 replica under bf16 autocast, its Linear layers in FP8 for
``fp8``; the oracle is the fp32 encoder. ``bound`` is the error the FP8 matmuls add up to if independent
(``fastjepa.modules.fp8``: 0.051 per matmul, in quadrature); an error above it means error amplification with depth
that scaling must fix. Writes ``fp8_depth.md`` and ``.csv`` to ``--out``. CPU-only measurement of numerics, not
speed: it runs anywhere (``torch._scaled_mm`` runs on the CPU).
"""

import argparse
import copy
import csv
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastjepa.choices import VIT_SIZES
from fastjepa.models import VisionTransformer
from fastjepa.modules.fp8 import MATMUL_REL_RMS, to_float8

from .common import RESULTS, device_dir, git_commit


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def block_outputs(encoder: VisionTransformer, images: torch.Tensor, autocast: bool) -> tuple[list, torch.Tensor]:
    """Every block's output and the normalised targets (final norm, then LayerNorm without affine, as the loss)."""
    outs = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outs.append(out.float())) for b in encoder.blocks]
    try:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            h = encoder(images)
    finally:
        for hook in hooks:
            hook.remove()
    return outs, F.layer_norm(h.float(), (h.shape[-1],))


def measure(encoder: VisionTransformer, images: torch.Tensor) -> list[dict]:
    exact, exact_t = block_outputs(encoder, images, autocast=False)
    replica = copy.deepcopy(encoder).to(torch.bfloat16)
    bf16, bf16_t = block_outputs(replica, images, autocast=True)
    fp8, fp8_t = block_outputs(to_float8(replica), images, autocast=True)
    rows = []
    for depth, (e, b, f) in enumerate(zip(exact, bf16, fp8, strict=True), start=1):
        rows.append({"depth": depth, "bf16": rel_rms(b, e), "fp8": rel_rms(f, e),
                     "bound": MATMUL_REL_RMS * math.sqrt(4 * depth)})
    rows.append({"depth": "targets", "bf16": rel_rms(bf16_t, exact_t), "fp8": rel_rms(fp8_t, exact_t),
                 "bound": MATMUL_REL_RMS * math.sqrt(4 * len(exact))})
    return rows


def build(args) -> VisionTransformer:
    dim, depth, heads, mlp_ratio = VIT_SIZES[args.model]
    torch.manual_seed(args.seed)
    encoder = VisionTransformer(args.img, args.patch, args.in_chans, dim, args.depth or depth, heads, mlp_ratio)
    if args.weights:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        missing = encoder.load_state_dict(state, strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise SystemExit(f"fp8_depth: {args.weights} does not fit {args.model} (patch {args.patch}, image "
                             f"{args.img}, {args.in_chans} channels): missing {missing.missing_keys[:3]}, unexpected "
                             f"{missing.unexpected_keys[:3]}; pass the run's --model/--patch/--img/--in-chans")
    return encoder.eval()


def markdown(rows: list[dict], args, seconds: float) -> str:
    lines = [f"# FP8 target forward: error by depth ({args.model}, patch {args.patch}, {args.img} px, batch "
             f"{args.batch}, {'weights ' + str(args.weights) if args.weights else 'random init'})", "",
             f"`{' '.join(['python -m bench.fp8_depth', *sys.argv[1:]])}`; commit {git_commit()}, torch "
             f"{torch.__version__}, {seconds:.0f} s on the CPU. Relative RMS error against the fp32 encoder.", "",
             "| depth | bf16 | fp8 | fp8 / bf16 | bound (independent matmuls) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['bf16']:.4f} | {r['fp8']:.4f} | {r['fp8'] / r['bf16']:.1f}x | "
                     f"{r['bound']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_huge", choices=sorted(VIT_SIZES))
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--in-chans", type=int, default=3)
    ap.add_argument("--depth", type=int, default=0, help="fewer blocks than the model's (0: all)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default="", help="a target encoder state dict (a run's target_encoder.pt)")
    ap.add_argument("--out", type=Path, default=RESULTS / device_dir("cpu"))
    args = ap.parse_args(argv)
    start = time.perf_counter()
    encoder = build(args)
    images = torch.randn(args.batch, args.in_chans, args.img, args.img, generator=torch.Generator().manual_seed(1))
    rows = measure(encoder, images)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "fp8_depth.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, args, time.perf_counter() - start)
    (args.out / "fp8_depth.md").write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
