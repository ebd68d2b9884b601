"""Whole I-JEPA training step: target forward, context forward/backward, predictor forward/backward, optimizer, EMA.

Providers, side by side in one run, all from the same initial weights and the same official masks (see
``bench/step_providers.py``): ``official`` (the official code's step), ``pytorch`` (strong plain PyTorch, its own
modules), ``fastjepa`` (exactly the trainer's default step) and the opt-in ``fastjepa_shared``.

Reported per provider: images/s per GPU, median step time (p20/p80) and its breakdown by phase, peak memory, MFU
(matmul FLOPs from the real token counts of each step, over the device's dense bf16 peak and over the measured
matmul rate) and projected GPU-hours for 300 ImageNet-1k epochs on this GPU and, at the same MFU, on an A100.

    python -m bench.bench_step                      # ViT-H/14, ViT-L/16, ViT-B/16 at 128 images per GPU
    python -m bench.bench_step --models vit_huge_14 --providers official fastjepa
    python -m bench.bench_step --quick              # CPU smoke test: tiny model, two steps, no claims

Writes ``train_step.csv`` (appended), ``train_step.md`` and ``train_step.png`` (phases per provider) under
``bench/results/<device>/``; ``python -m bench --suite step`` runs the same through ``run(cfg)``.
"""

import argparse
import csv
import dataclasses
import datetime
import gc
import logging
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from fastjepa.kernels import set_backend
from fastjepa.mask_batch import Masks
from fastjepa.masks import MultiBlockMaskCollator, official_kwargs
from fastjepa.metrics import FlopModel, peak_flops
from fastjepa.spec import ModelSpec

from .common import RESULTS, BenchConfig, device_dir, git_commit, triton_version
from .plots import phase_chart
from .step_providers import PHASES, STEPS, PhaseTimer

IMAGENET_1K_IMAGES = 1_281_167
EPOCHS = 300
A100_BF16_PEAK = 312e12
PROVIDERS = tuple(STEPS)
FP8_PROVIDERS = {"fastjepa_fp8": "fp8=target", "fastjepa_torchao_fp8": "fp8=target, torchao's layers",
                 "fastjepa_fp8_all": "fp8=all"}
# The benchmark's models with the official in1k recipe's predictor (width 384, depth 12) and masks.
SETUPS = {
    "vit_huge_14": ModelSpec("vit_huge", 224, 14, 3, 384, 12),
    "vit_large_16": ModelSpec("vit_large", 224, 16, 3, 384, 12),
    "vit_base_16": ModelSpec("vit_base", 224, 16, 3, 384, 12),
    # CPU smoke test only: 6x6 patches, head dims 16 (encoder) and 8 (predictor).
    "quick": ModelSpec("vit_micro", 48, 8, 3, 32, 2, min_keep=2),
}


def step_flops(s: ModelSpec, batch: int, ctx_len: int, tgt_len: int, layout: str) -> dict[str, float]:
    """Matmul FLOPs of one training step by part (the trainer's FLOP model), official masks (one context length
    per batch), credited for what the layout executes."""
    model = FlopModel.from_spec(dataclasses.replace(s, layout=layout))
    return model.step(batch, ctx_len, tgt_len, s.num_pred_masks, s.num_enc_masks)


def quantile(values: list[float], q: float) -> float:
    return torch.tensor(values, dtype=torch.float64).quantile(q).item()


def matmul_rate(device: torch.device) -> float:
    """Measured dense matmul FLOP/s: bf16 8192^3 on a GPU (triton's do_bench median), fp32 512^3 on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
        return 2 * 8192**3 / (do_bench(lambda: a @ b, return_mode="median") * 1e-3)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    tic = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 512**3 / (time.perf_counter() - tic)


def make_inputs(s: ModelSpec, batch: int, device, rotations: int, seed: int = 0):
    """Normalised random images and official-recipe masks (parity mode), a few batches to rotate through."""
    collator = MultiBlockMaskCollator(**official_kwargs(s), mode="parity", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randn(batch, s.in_chans, s.img_size, s.img_size, generator=gen).to(device)
              for _ in range(min(rotations, 2))]
    masks = []
    for step in range(rotations):
        m = collator.sample(batch, step)
        masks.append(([t.to(device) for t in m.enc], [t.to(device) for t in m.pred]))
    return images, masks


def run_provider(name: str, s: ModelSpec, batch: int, device, amp_dtype, compile_backend, warmup: int, steps: int,
                 inputs, act_ckpt: bool = False) -> dict:
    images, masks = inputs
    gc.collect()  # what the previous provider left must not count against this one
    torch._dynamo.reset()
    counters.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    runner = STEPS[name](s, device, amp_dtype, None if name == "official" else compile_backend,
                         act_ckpt and name != "official", batch)
    if runner.takes_masks_value:  # the trainer hands one Masks value to the step, built once per batch
        masks = [(Masks.from_lists(enc, pred).to(device), None) for enc, pred in masks]
    timer = PhaseTimer(device)
    step_ms, phase_ms, flops = [], {p: [] for p in PHASES}, []
    for i in range(warmup + steps):
        img, (m_enc, m_pred) = images[i % len(images)], masks[i % len(masks)]
        timer.start()
        loss = runner.step(img, m_enc, m_pred, timer, momentum=0.996, index=i)
        phases = timer.phases_ms()
        if i < warmup:
            continue
        step_ms.append(sum(phases.values()))
        for p in PHASES:
            phase_ms[p].append(phases.get(p, 0.0))
        enc, pred = inputs[1][i % len(masks)]
        flops.append(sum(step_flops(s, batch, enc[0].shape[1], pred[0].shape[1], runner.layout).values()))
    loss = float(loss)
    target_ms = runner.target_forward_ms(images[0]) if hasattr(runner, "target_forward_ms") else float("nan")
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    set_backend("auto")
    del runner
    total_s = sum(step_ms) * 1e-3
    return {
        "provider": name,
        "step_ms": quantile(step_ms, 0.5),
        "step_ms_p20": quantile(step_ms, 0.2),
        "step_ms_p80": quantile(step_ms, 0.8),
        "images_per_s": batch * len(step_ms) / total_s,
        "flops_per_image": sum(flops) / (batch * len(flops)),
        "achieved_flops": sum(flops) / total_s,
        "peak_mem_gib": peak_mem,
        "loss": loss,
        "target_fwd_only_ms": target_ms,
        "graph_breaks": sum(counters["graph_break"].values()),
        "compiled_graphs": counters["stats"]["unique_graphs"],
        **{f"{p}_ms": quantile(v, 0.5) for p, v in phase_ms.items()},
    }


def finish_row(row: dict, name: str, s: ModelSpec, batch: int, device_name: str, peak: float | None, measured: float,
               dtype: str, compile_backend, act_ckpt: bool) -> dict:
    mfu = row["achieved_flops"] / peak if peak else float("nan")
    gpu_hours = IMAGENET_1K_IMAGES * EPOCHS / row["images_per_s"] / 3600
    a100_hours = (IMAGENET_1K_IMAGES * EPOCHS * row["flops_per_image"] / (mfu * A100_BF16_PEAK) / 3600
                  if peak else float("nan"))
    return {
        "op": "step", "model": name, "batch": batch, "img": s.img_size, "dtype": dtype,
        "compile": "off" if row["provider"] == "official" else (compile_backend or "off"),
        "act_ckpt": act_ckpt and row["provider"] != "official",
        **row,
        "mfu_peak": mfu, "mfu_measured": row["achieved_flops"] / measured, "matmul_rate_tflops": measured / 1e12,
        "gpu_hours_300ep": gpu_hours, "a100_hours_300ep_same_mfu": a100_hours,
        "device": device_name, "torch": torch.__version__, "triton": triton_version(), "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(rows: list[dict], out_dir: Path, quick: bool, command: str, append: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "train_step.csv", out_dir / "train_step.md", out_dir / "train_step.png"]
    if append:
        new = not paths[0].exists()
        with open(paths[0], "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    lines = [f"# Training step on {rows[0]['device']}", "",
             f"torch {rows[0]['torch']}, triton {rows[0]['triton']}, commit {rows[0]['commit']}, {rows[0]['date']}; "
             f"measured matmul rate {rows[0]['matmul_rate_tflops']:.3g} TFLOP/s", ""]
    if quick:
        lines += ["CPU smoke run of the script (tiny model, fp32): timings are not claims.", ""]
    lines += headline(rows) + ["", "| model | provider | img/s | step ms (p20-p80) | vs official | vs pytorch | "
                                   "MFU (peak) | MFU (measured) | peak GiB | GPU-h 300 ep | A100-h same MFU | "
                                   + " | ".join(PHASES) + " |", "|" + "---|" * (11 + len(PHASES))]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['provider']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} ({r['step_ms_p20']:.1f}"
            f"-{r['step_ms_p80']:.1f}) | {ratio(rows, r, 'official')} | {ratio(rows, r, 'pytorch')} | "
            f"{r['mfu_peak']:.1%} | {r['mfu_measured']:.1%} | {r['peak_mem_gib']:.1f} | {r['gpu_hours_300ep']:.0f} | "
            f"{r['a100_hours_300ep_same_mfu']:.0f} | " + " | ".join(f"{r[p + '_ms']:.1f}" for p in PHASES) + " |"
        )
    lines += ["", f"Command: `{command}`", ""]
    paths[1].write_text("\n".join(lines))
    phase_chart(rows, PHASES, paths[2])
    return [path for path in paths if path.exists()]


TEXT_FIELDS = ("op", "model", "dtype", "compile", "act_ckpt", "provider", "device", "torch", "triton", "commit",
               "date")


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``train_step.csv`` with their numbers as numbers (``--report``)."""
    if not path.is_file():
        raise SystemExit(f"bench_step --report: no {path}; run the providers with --out {path.parent} first")
    with path.open(newline="") as f:
        return [{k: v if k in TEXT_FIELDS else float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def same_model(rows: list[dict], row: dict, provider: str) -> dict | None:
    """The row of ``provider`` for ``row``'s model in the same run, or None."""
    return next((b for b in rows if b["model"] == row["model"] and b["provider"] == provider), None)


def ratio(rows: list[dict], row: dict, baseline: str) -> str:
    """images/s of ``row`` over the ``baseline`` provider's in the same run, or '-'."""
    base = same_model(rows, row, baseline)
    return f"{row['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"


def headline(rows: list[dict]) -> list[str]:
    """Per model: fastjepa against the two baselines measured in this run, its MFU, memory and GPU-hours."""
    lines = ["| model | fastjepa img/s | / official | / pytorch | MFU | peak GiB | GPU-h 300 ep (this GPU) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["provider"] == "fastjepa":
            lines.append(f"| {r['model']} | {r['images_per_s']:.1f} | {ratio(rows, r, 'official')} | "
                         f"{ratio(rows, r, 'pytorch')} | {r['mfu_peak']:.1%} | {r['peak_mem_gib']:.1f} | "
                         f"{r['gpu_hours_300ep']:.0f} |")
    fp8 = [r for r in rows if r["provider"] in FP8_PROVIDERS]
    if fp8:
        lines += ["", "| model | FP8 provider | img/s | / bf16 step | target forward ms | same, bf16 |",
                  "|---|---|---|---|---|---|"]
        for r in fp8:
            bf16 = same_model(rows, r, "fastjepa")
            bf16_ms = bf16["target_fwd_only_ms"] if bf16 else float("nan")
            lines.append(f"| {r['model']} | {FP8_PROVIDERS[r['provider']]} | {r['images_per_s']:.1f} | "
                         f"{ratio(rows, r, 'fastjepa')} | {r['target_fwd_only_ms']:.1f} | {bf16_ms:.1f} |")
    sigreg = [r for r in rows if r["provider"] == "fastjepa_sigreg"]
    if sigreg:
        lines += ["", "| model | with SIGReg img/s | / without | added step time |", "|---|---|---|---|"]
        for r in sigreg:
            base = same_model(rows, r, "fastjepa")
            added = base["images_per_s"] / r["images_per_s"] - 1 if base else float("nan")
            lines.append(f"| {r['model']} | {r['images_per_s']:.1f} | {ratio(rows, r, 'fastjepa')} | {added:.1%} |")
    return lines if len(lines) > 2 else []


def benchmark(models, providers, batch: int, warmup: int, steps: int, compile_backend: str | None, out: Path | None,
              quick: bool, command: str, act_ckpt: bool = False) -> list[dict]:
    """Run every (model, provider) and write the result files; returns the rows."""
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    if device.type != "cuda" and not quick:
        raise SystemExit("bench_step: no CUDA GPU; the full benchmark needs one (--quick runs the CPU smoke test)")
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device_dir("cpu")
    peak, measured = peak_flops(device), matmul_rate(device)
    rows = []
    for model in models:
        s = SETUPS[model]
        # Real runs rotate 4 mask draws (token counts change per step, as in training; compile sees it); the
        # smoke run keeps one, so the compile backend traces each block once.
        inputs = make_inputs(s, batch, device, rotations=1 if quick else 4)
        for provider in providers:
            row = run_provider(provider, s, batch, device, amp_dtype, compile_backend, warmup, steps, inputs,
                               act_ckpt)
            dtype = "bf16-autocast" if amp_dtype else "fp32"
            row = finish_row(row, model, s, batch, device_name, peak, measured, dtype, compile_backend, act_ckpt)
            rows.append(row)
            print(f"{model:13s} {provider:16s} {row['images_per_s']:9.1f} img/s  step {row['step_ms']:8.1f} ms  "
                  f"MFU {row['mfu_peak']:.1%} (of measured matmul rate {row['mfu_measured']:.1%})  "
                  f"peak {row['peak_mem_gib']:.1f} GiB  loss {row['loss']:.4f}  compiled graphs "
                  f"{row['compiled_graphs']}, graph breaks {row['graph_breaks']}", flush=True)
    out_dir = Path(out) if out else RESULTS / device_dir(str(device))
    for path in write_results(rows, out_dir, quick, command):
        print("wrote", path)
    return rows


QUICK = dict(models=["quick"], batch=4, warmup=1, steps=2)


def run(cfg: BenchConfig) -> list[dict]:
    """The ``step`` suite of ``python -m bench``: rows in bench.common's columns (one per model and provider,
    median step ms, speed-up over the official-style provider; a whole step has no bytes model, so its GB/s
    columns are 0). The full table (img/s, phases, MFU, memory, GPU-hours) goes to train_step.md."""
    sizes = QUICK if cfg.quick else dict(models=list(SETUPS)[:3], batch=128, warmup=5, steps=20)
    rows = benchmark(providers=list(PROVIDERS[:3]), compile_backend=cfg.compile_backend, out=cfg.out_dir,
                     quick=cfg.quick, command="python -m bench --suite step" + (" --quick" if cfg.quick else ""),
                     **sizes)
    out = []
    for r in rows:
        base = same_model(rows, r, "official")
        out.append({"op": "train_step", "provider": r["provider"], "mode": "fwd+bwd+opt+ema",
                    "shape": f"{r['model']} bs{r['batch']}", "dtype": r["dtype"], "median": r["step_ms"],
                    "p20": r["step_ms_p20"], "p80": r["step_ms_p80"], "unit": "ms", "gbps": 0.0,
                    "frac_of_copy": 0.0, "speedup_vs_reference": round(base["step_ms"] / r["step_ms"], 2),
                    **{k: r[k] for k in ("device", "torch", "triton", "commit", "date")}})
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SETUPS)[:3], choices=list(SETUPS)[:3])
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS[:3]), choices=PROVIDERS)
    ap.add_argument("--batch", type=int, default=128, help="images per GPU")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", default=None,
                    help="torch.compile backend for the blocks: 'none' = off; default inductor, aot_eager with --quick")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<device>/)")
    ap.add_argument("--act-ckpt", action="store_true",
                    help="activation checkpointing of the encoder and predictor blocks (not the official provider)")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke test: tiny model, batch 4, 1 warm-up + 2 timed steps, fp32")
    ap.add_argument("--report", action="store_true",
                    help="measure nothing: rewrite train_step.md/png from every row of --out's train_step.csv (the "
                         "providers run one process each, so that a crash loses no other row)")
    args = ap.parse_args(argv)
    command = "python -m bench.bench_step " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.report:
        out_dir = args.out or RESULTS / device_dir("cuda" if torch.cuda.is_available() else "cpu")
        rows = read_rows(out_dir / "train_step.csv")
        for path in write_results(rows, out_dir, rows[0]["device"] == device_dir("cpu"), command, append=False):
            print("wrote", path)
        return rows
    # the trainer's log lines (what attn_backend and block_impl auto chose, with their timings) in the stage's log
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sizes = QUICK if args.quick else dict(models=args.models, batch=args.batch, warmup=args.warmup, steps=args.steps)
    backend = args.compile or ("aot_eager" if args.quick else "inductor")
    return benchmark(providers=args.providers, compile_backend=None if backend == "none" else backend, out=args.out,
                     quick=args.quick, act_ckpt=args.act_ckpt, command=command, **sizes)


if __name__ == "__main__":
    main()
