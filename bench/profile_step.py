"""Where the time of one fastjepa training step goes: the trainer's step under ``torch.profiler``, its device
kernels split by category (GEMM, attention, elementwise/norm, optimizer, EMA, fastjepa kernels, other) and the
top kernels by time.

    python -m bench.profile_step --model vit_huge_14 --batch 128       # on a GPU
    python -m bench.profile_step --quick                                # CPU smoke run (host ops; no claims)

Writes ``profile.md`` (the split, the top kernels and, beside the measured split, the step's roofline at this GPU's
ceilings measured in the same run: ``bench/roofline.py``) and ``profile_trace.json`` (open in chrome://tracing or
Perfetto) to ``--out``.
"""

import argparse
import re
from collections import defaultdict
from pathlib import Path

import torch

from fastjepa.mask_batch import Masks

from . import roofline
from .bench_step import QUICK, SETUPS, make_inputs, matmul_rate
from .common import copy_bandwidth
from .step_providers import FastJepaStep, PhaseTimer

# First match wins: fastjepa's own kernels and the EMA before the generic patterns they would also match, attention
# (cutlass/cuDNN attention kernels) before GEMM. cuBLAS names its Hopper and Blackwell GEMMs ``nvjet_*``.
CATEGORIES = (
    ("EMA", r"ema_update"),
    ("fastjepa kernels", r"masked_gather|target_norm|predictor_tokens|block_attn"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|attn)|_efficient_attention|softmax"),
    ("GEMM", r"nvjet|gemm|cutlass|xmma|cublas|matmul|\bmm\b|addmm|bmm|triton_tem|sm\d+_.*(h|s)\d+|conv"),
    ("elementwise/norm", r"elementwise|vectorized|layer_norm|triton_(poi|per|red)|reduce|copy|cast|fill|gelu|add|mul"),
)


def category(name: str) -> str:
    lowered = name.lower()
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, lowered)), "other")


def is_annotation(name: str, flagged: bool = False) -> bool:
    """A range that spans kernels (``record_function``, ``Optimizer.step#AdamW.step``, ``ProfilerStep#3``), not a
    kernel: its device time is the time of kernels counted on their own, so summing it counts them twice."""
    return flagged or "#" in name


def profile(model: str, batch: int, warmup: int, compile_backend: str | None, out: Path) -> list[str]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = SETUPS[model]
    images, masks = make_inputs(s, batch, device, rotations=2)
    runner = FastJepaStep(s, device, torch.bfloat16 if device.type == "cuda" else None, compile_backend,
                          batch=batch)
    masks = [Masks.from_lists(enc, pred).to(device) for enc, pred in masks]
    timer = PhaseTimer(device)
    for i in range(warmup):
        timer.start()
        runner.step(images[i % 2], masks[i % 2], None, timer, 0.996, i)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        torch.cuda.synchronize()
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        timer.start()
        runner.step(images[0], masks[0], None, timer, 0.996, warmup)
        if device.type == "cuda":
            torch.cuda.synchronize()
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "profile_trace.json"))
    cuda = device.type == "cuda"
    rows = [(event.key, event.self_device_time_total if cuda else event.self_cpu_time_total, event.count,
             getattr(event, "is_user_annotation", False))
            for event in prof.key_averages()
            if not cuda or event.device_type == torch.autograd.DeviceType.CUDA]
    lines = table(rows, f"{model}, batch {batch}, compile={compile_backend or 'off'}, "
                        f"{'device kernels' if cuda else 'CPU host ops: no claims'}")
    if cuda:  # the floors at this GPU's ceilings measured now, beside its measured categories
        ceilings = dict(tflops=matmul_rate(device) / 1e12, tbps=copy_bandwidth(str(device)) / 1e3)
        return lines + [""] + roofline.report(s, batch, **ceilings, measured=category_ms(rows))
    return lines + [""] + roofline.report(s, batch)  # on a CPU: the floors at the H200's ceilings alone


def kernel_times(rows) -> tuple[dict[str, float], dict[str, int]]:
    """µs and calls per kernel name from profiler rows ``(name, self µs, calls, is a user annotation)``, annotation
    ranges left out (their kernels are rows of their own)."""
    times, calls = defaultdict(float), defaultdict(int)
    for name, us, count, annotation in rows:
        if us > 0 and not is_annotation(name, annotation):
            times[name] += us
            calls[name] += count
    return times, calls


def category_ms(rows) -> dict[str, float]:
    """Milliseconds per category of the profiler rows."""
    split = defaultdict(float)
    for name, us in kernel_times(rows)[0].items():
        split[category(name)] += us / 1e3
    return dict(split)


def table(rows, what: str) -> list[str]:
    """Markdown lines from profiler rows ``(name, self µs, calls, is a user annotation)``: the split by category and
    the top 15 kernels."""
    times, calls = kernel_times(rows)
    total = sum(times.values()) or 1.0
    split = {cat: ms * 1e3 for cat, ms in category_ms(rows).items()}
    lines = [f"# One fastjepa step by category ({what})", "", f"total {total / 1e3:.1f} ms", "",
             "| category | ms | share |", "|---|---|---|"]
    for cat, us in sorted(split.items(), key=lambda x: -x[1]):
        lines.append(f"| {cat} | {us / 1e3:.2f} | {us / total:.1%} |")
    lines += ["", "| top kernels | category | calls | ms | share |", "|---|---|---|---|---|"]
    for name, us in sorted(times.items(), key=lambda x: -x[1])[:15]:
        lines.append(f"| `{name[:90]}` | {category(name)} | {calls[name]} | {us / 1e3:.2f} | {us / total:.1%} |")
    return lines


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_huge_14", choices=list(SETUPS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5, help="steps before the profiled one (compile, auto attention)")
    ap.add_argument("--compile", default="inductor", help="torch.compile backend of the blocks, 'none' = off")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, 1 warm-up step, no compile")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.warmup, args.compile = QUICK["models"][0], QUICK["batch"], 1, "none"
    lines = profile(args.model, args.batch, args.warmup, None if args.compile == "none" else args.compile, args.out)
    path = args.out / "profile.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


if __name__ == "__main__":
    main()
