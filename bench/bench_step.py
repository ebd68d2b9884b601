"""Whole I-JEPA training step: target forward, context forward/backward, predictor forward/backward, optimizer, EMA.

Providers, side by side in one run, all from the same initial weights and the same official masks:

- ``official``: what facebookresearch/ijepa does (``fastjepa.compat.official_style``): naive attention with the
  softmax in fp32, ``apply_masks`` with a repeated int64 index, ``repeat_interleave_batch`` copies, bf16 autocast
  with a GradScaler, default AdamW, a per-parameter EMA loop, the per-step ``grad_logger`` norms and
  ``float(loss)`` host syncs (their own phase, ``logging``), no compile.
- ``pytorch``: strong plain PyTorch: SDPA, the reference gathers, bf16 autocast without a scaler, fused AdamW,
  ``torch._foreach_lerp_`` EMA, ``torch.compile`` per block.
- ``fastjepa``: fastjepa's modules and fused ops: timed ``auto`` attention, Triton gathers, the fused target
  norm + smooth-L1 loss, the fused EMA, fused AdamW, the target-only last predictor block, ``torch.compile`` per
  block.
- ``fastjepa_shared`` (opt-in, changes the method): as fastjepa with the shared-context predictor layout.

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
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import RESULTS, BenchConfig, device_dir, git_commit, triton_version
from fastjepa.compat import official_style as off
from fastjepa.ijepa import IJEPA
from fastjepa.kernels import set_backend
from fastjepa.kernels.target_norm_gather import target_norm_smooth_l1
from fastjepa.masks import MultiBlockMaskCollator
from fastjepa.metrics import FlopModel, peak_flops
from fastjepa.models import VisionTransformer, VisionTransformerPredictor
from fastjepa.parallel import apply_activation_checkpointing, apply_compile

IMAGENET_1K_IMAGES = 1_281_167
EPOCHS = 300
A100_BF16_PEAK = 312e12
PHASES = ("target_fwd", "context_fwd", "predictor_fwd", "backward", "optimizer", "ema", "logging")
PROVIDERS = ("official", "pytorch", "fastjepa", "fastjepa_shared")


@dataclasses.dataclass(frozen=True)
class Setup:
    """A model size and its recipe: encoder, predictor (official: width 384, depth 12), images, official masks."""

    name: str
    dim: int
    depth: int
    heads: int
    patch: int
    img: int
    pred_dim: int = 384
    pred_depth: int = 12
    mlp_ratio: float = 4.0
    in_chans: int = 3
    enc_mask_scale: tuple = (0.85, 1.0)
    pred_mask_scale: tuple = (0.15, 0.2)
    aspect_ratio: tuple = (0.75, 1.5)
    nenc: int = 1
    npred: int = 4
    min_keep: int = 10

    @property
    def grid(self) -> int:
        return self.img // self.patch


SETUPS = {
    "vit_huge_14": Setup("vit_huge_14", 1280, 32, 16, 14, 224),
    "vit_large_16": Setup("vit_large_16", 1024, 24, 16, 16, 224),
    "vit_base_16": Setup("vit_base_16", 768, 12, 12, 16, 224),
    # CPU smoke test only: 6x6 patches, head dims 16 (encoder) and 8 (predictor).
    "quick": Setup("quick", 64, 2, 4, 8, 48, pred_dim=32, pred_depth=2, min_keep=2),
}


def flop_model(s: Setup, layout: str) -> FlopModel:
    """The trainer's FLOP model (fastjepa.metrics) for a setup and the predictor layout a provider runs."""
    return FlopModel(s.dim, s.depth, int(s.dim * s.mlp_ratio), s.grid**2, s.in_chans * s.patch**2, s.pred_dim,
                     s.pred_depth, int(s.pred_dim * s.mlp_ratio), layout)


def step_flops(s: Setup, batch: int, ctx_len: int, tgt_len: int, layout: str) -> dict[str, float]:
    """Matmul FLOPs of one training step by part, official masks (one context length per batch)."""
    return flop_model(s, layout).step(batch, ctx_len, tgt_len, s.npred, s.nenc)


# ---------------------------------------------------------------------------------------------------------------
# Timing


class PhaseTimer:
    """Marks phase boundaries inside a step: CUDA events on a GPU (no host sync until read), clocks on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self):
        self.marks = [("start", self._now())]

    def mark(self, phase: str):
        self.marks.append((phase, self._now()))

    def phases_ms(self) -> dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()
        out = {}
        for (_, t0), (name, t1) in zip(self.marks, self.marks[1:], strict=False):
            out[name] = out.get(name, 0.0) + (t0.elapsed_time(t1) if self.cuda else (t1 - t0) * 1e3)
        return out


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


# ---------------------------------------------------------------------------------------------------------------
# Providers: each builds its models from the same seed and runs one step, marking the phases.


def build_models(s: Setup, backend: str, device, layout: str, seed: int = 0):
    torch.manual_seed(seed)
    enc = VisionTransformer(s.img, s.patch, s.in_chans, s.dim, s.depth, s.heads, s.mlp_ratio, attn_backend=backend)
    pred = VisionTransformerPredictor((s.grid, s.grid), s.dim, s.pred_dim, s.pred_depth, s.heads, s.mlp_ratio,
                                      attn_backend=backend, layout=layout)
    return IJEPA(enc, pred).to(device)


class OfficialStep:
    layout = "official"

    def __init__(self, s: Setup, device, amp_dtype, compile_backend, act_ckpt: bool = False):
        if act_ckpt:
            raise ValueError("the official-style provider has no activation checkpointing (the official code has none)")
        self.model = build_models(s, "math", device, self.layout)
        self.heads = s.heads
        self.enc = dict(self.model.encoder.named_parameters())
        self.pred = dict(self.model.predictor.named_parameters())
        self.tgt = dict(self.model.target_encoder.named_parameters())
        self.online = list(self.model.encoder.parameters())
        self.target = list(self.model.target_encoder.parameters())
        self.opt = torch.optim.AdamW(
            [p for p in [*self.model.encoder.parameters(), *self.model.predictor.parameters()] if p.requires_grad]
        )
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is not None)

    def step(self, images, masks_enc, masks_pred, timer: PhaseTimer, momentum: float):
        with torch.autocast(images.device.type, self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            with torch.no_grad():
                h = off.encoder_forward(self.tgt, images, self.heads)
                h = F.layer_norm(h, (h.size(-1),))
                h = off.repeat_interleave_batch(off.apply_masks(h, masks_pred), len(h), repeat=len(masks_enc))
            timer.mark("target_fwd")
            z = off.encoder_forward(self.enc, images, self.heads, masks_enc)
            timer.mark("context_fwd")
            z = off.predictor_forward(self.pred, z, masks_enc, masks_pred, self.heads)
            loss = F.smooth_l1_loss(z, h)
        timer.mark("predictor_fwd")
        self.scaler.scale(loss).backward()
        timer.mark("backward")
        self.scaler.step(self.opt)
        self.scaler.update()
        timer.mark("optimizer")
        # the official grad_logger: one host sync per weight matrix, every step
        grad_norms = [float(torch.norm(p.grad)) for n, p in self.model.encoder.named_parameters()
                      if p.grad is not None and not (n.endswith(".bias") or p.ndim == 1)]
        self.opt.zero_grad()
        timer.mark("logging")
        off.ema_update(self.target, self.online, momentum)
        timer.mark("ema")
        return loss.item(), grad_norms


def compile_blocks(model: IJEPA, backend: str | None):
    if backend is not None:
        apply_compile(model, backend)


class PyTorchStep:
    """Strong plain PyTorch: what a careful user gets without fastjepa's kernels or predictor layouts."""

    layout = "official"
    kernel_backend = "reference"
    backend = "sdpa"

    def __init__(self, s: Setup, device, amp_dtype, compile_backend, act_ckpt: bool = False):
        set_backend(self.kernel_backend)
        self.model = build_models(s, self.backend, device, self.layout)
        if act_ckpt:
            apply_activation_checkpointing(self.model)
        self.amp_dtype = amp_dtype
        self.online = list(self.model.encoder.parameters())
        self.target = list(self.model.target_encoder.parameters())
        params = [p for p in [*self.model.encoder.parameters(), *self.model.predictor.parameters()] if p.requires_grad]
        self.opt = torch.optim.AdamW(params, fused=device.type == "cuda", foreach=None if device.type == "cuda"
                                     else True)
        self.compile_backend = compile_backend

    def prepare(self, images, masks_enc, masks_pred):
        compile_blocks(self.model, self.compile_backend)

    def forward_phases(self, images, masks_enc, masks_pred, timer):
        model = self.model
        with torch.autocast(images.device.type, self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            h = model.targets(images, masks_enc, masks_pred)
            timer.mark("target_fwd")
            z = model.encoder(images, masks_enc)
            timer.mark("context_fwd")
            z = model.predictor(z, masks_enc, masks_pred)
            loss = F.smooth_l1_loss(z, h)
        timer.mark("predictor_fwd")
        return loss

    def ema(self, momentum):
        torch._foreach_lerp_(self.target, self.online, 1.0 - momentum)

    def step(self, images, masks_enc, masks_pred, timer: PhaseTimer, momentum: float):
        set_backend(self.kernel_backend)
        loss = self.forward_phases(images, masks_enc, masks_pred, timer)
        loss.backward()
        timer.mark("backward")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        timer.mark("optimizer")
        with torch.no_grad():
            self.ema(momentum)
        timer.mark("ema")
        return loss.detach(), None


class FastJepaStep(PyTorchStep):
    layout = "repeat"
    kernel_backend = "auto"
    backend = "auto"

    def __init__(self, s, device, amp_dtype, compile_backend, act_ckpt: bool = False):
        super().__init__(s, device, amp_dtype, compile_backend, act_ckpt)
        from fastjepa.optim import build_optimizer

        self.opt = build_optimizer(self.model.encoder, self.model.predictor)
        for group in self.opt.param_groups:
            group["lr"] = 1e-3

    def prepare(self, images, masks_enc, masks_pred):
        # One eager forward/backward first, so that 'auto' attention times its candidates outside compiled code.
        set_backend(self.kernel_backend)
        loss = self.forward_phases(images, masks_enc, masks_pred, PhaseTimer(images.device))
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        compile_blocks(self.model, self.compile_backend)

    def forward_phases(self, images, masks_enc, masks_pred, timer):
        # The fused loss reads the target encoder's output directly: normalised targets never reach memory.
        model = self.model
        with torch.autocast(images.device.type, self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            with torch.no_grad():
                h = model.target_encoder(images)
            timer.mark("target_fwd")
            z = model.encoder(images, masks_enc)
            timer.mark("context_fwd")
            z = model.predictor(z, masks_enc, masks_pred)
            loss = target_norm_smooth_l1(z, h, masks_pred, len(masks_enc))
        timer.mark("predictor_fwd")
        return loss

    def ema(self, momentum):
        self.model.update_target(momentum)


class FastJepaSharedStep(FastJepaStep):
    layout = "shared"


STEPS = {"official": OfficialStep, "pytorch": PyTorchStep, "fastjepa": FastJepaStep,
         "fastjepa_shared": FastJepaSharedStep}


# ---------------------------------------------------------------------------------------------------------------


def make_inputs(s: Setup, batch: int, device, rotations: int, seed: int = 0):
    """Normalised random images and official-recipe masks (parity mode), a few batches to rotate through."""
    collator = MultiBlockMaskCollator((s.img, s.img), s.patch, s.enc_mask_scale, s.pred_mask_scale, s.aspect_ratio,
                                      s.nenc, s.npred, s.min_keep, allow_overlap=False, mode="parity", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randn(batch, s.in_chans, s.img, s.img, generator=gen).to(device) for _ in range(min(rotations, 2))]
    masks = []
    for step in range(rotations):
        m = collator.sample(batch, step)
        masks.append(([t.to(device) for t in m.masks_enc], [t.to(device) for t in m.masks_pred]))
    return images, masks


def run_provider(name: str, s: Setup, batch: int, device, amp_dtype, compile_backend, warmup: int, steps: int,
                 inputs, act_ckpt: bool = False) -> dict:
    images, masks = inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    runner = STEPS[name](s, device, amp_dtype, None if name == "official" else compile_backend,
                         act_ckpt and name != "official")
    if hasattr(runner, "prepare"):
        runner.prepare(images[0], *masks[0])
    timer = PhaseTimer(device)
    step_ms, phase_ms, flops = [], {p: [] for p in PHASES}, []
    for i in range(warmup + steps):
        img, (m_enc, m_pred) = images[i % len(images)], masks[i % len(masks)]
        timer.start()
        loss, _ = runner.step(img, m_enc, m_pred, timer, momentum=0.996)
        phases = timer.phases_ms()
        if i < warmup:
            continue
        step_ms.append(sum(phases.values()))
        for p in PHASES:
            phase_ms[p].append(phases.get(p, 0.0))
        flops.append(sum(step_flops(s, batch, m_enc[0].shape[1], m_pred[0].shape[1], runner.layout).values()))
    loss = float(loss)
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
        **{f"{p}_ms": quantile(v, 0.5) for p, v in phase_ms.items()},
    }


def finish_row(row: dict, s: Setup, batch: int, device_name: str, peak: float | None, measured: float,
               dtype: str, compile_backend, act_ckpt: bool) -> dict:
    mfu = row["achieved_flops"] / peak if peak else float("nan")
    gpu_hours = IMAGENET_1K_IMAGES * EPOCHS / row["images_per_s"] / 3600
    a100_hours = (IMAGENET_1K_IMAGES * EPOCHS * row["flops_per_image"] / (mfu * A100_BF16_PEAK) / 3600
                  if peak else float("nan"))
    return {
        "op": "step", "model": s.name, "batch": batch, "img": s.img, "dtype": dtype,
        "compile": "off" if row["provider"] == "official" else (compile_backend or "off"),
        "act_ckpt": act_ckpt and row["provider"] != "official",
        **row,
        "mfu_peak": mfu, "mfu_measured": row["achieved_flops"] / measured, "matmul_rate_tflops": measured / 1e12,
        "gpu_hours_300ep": gpu_hours, "a100_hours_300ep_same_mfu": a100_hours,
        "device": device_name, "torch": torch.__version__, "triton": triton_version(), "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(rows: list[dict], out_dir: Path, quick: bool, command: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "train_step.csv", out_dir / "train_step.md", out_dir / "train_step.png"]
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
    lines += ["| model | provider | img/s | step ms (p20-p80) | vs official | MFU (peak) | MFU (measured) | peak GiB | "
              "GPU-h 300 ep | A100-h same MFU | " + " | ".join(PHASES) + " |",
              "|" + "---|" * (10 + len(PHASES))]
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["provider"] == "official"), None)
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        lines.append(
            f"| {r['model']} | {r['provider']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} ({r['step_ms_p20']:.1f}"
            f"-{r['step_ms_p80']:.1f}) | {ratio} | {r['mfu_peak']:.1%} | {r['mfu_measured']:.1%} | "
            f"{r['peak_mem_gib']:.1f} | {r['gpu_hours_300ep']:.0f} | {r['a100_hours_300ep_same_mfu']:.0f} | "
            + " | ".join(f"{r[p + '_ms']:.1f}" for p in PHASES) + " |"
        )
    lines += ["", f"Command: `{command}`", ""]
    paths[1].write_text("\n".join(lines))
    phase_chart(rows, paths[2])
    return paths


def phase_chart(rows: list[dict], path: Path) -> None:
    """Stacked bars: median ms per phase for each (model, provider), drawn with Pillow."""
    from PIL import Image, ImageDraw

    width, bar_h, label_w = 1000, 18, 260
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
    img = Image.new("RGB", (width, 50 + bar_h * len(rows) + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((5, 5), f"training step, median ms per phase ({rows[0]['device']})", fill="black")
    for i, p in enumerate(PHASES):
        draw.rectangle([5 + 130 * i, 22, 15 + 130 * i, 32], fill=palette[i])
        draw.text((19 + 130 * i, 21), p, fill="black")
    top = max(r["step_ms"] for r in rows) or 1.0
    for j, r in enumerate(rows):
        y = 45 + j * bar_h
        draw.text((5, y + 3), f"{r['model']} {r['provider']}"[:40], fill="black")
        x = float(label_w)
        for i, p in enumerate(PHASES):
            w = (width - label_w - 120) * r[p + "_ms"] / top
            draw.rectangle([int(x), y + 2, int(x + w), y + bar_h - 2], fill=palette[i])
            x += w
        draw.text((int(x) + 4, y + 3), f"{r['step_ms']:.1f} ms, {r['images_per_s']:.0f} img/s", fill="black")
    img.save(path)


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
            row = finish_row(row, s, batch, device_name, peak, measured, "bf16-autocast" if amp_dtype else "fp32",
                             compile_backend, act_ckpt)
            rows.append(row)
            print(f"{model:13s} {provider:16s} {row['images_per_s']:9.1f} img/s  step {row['step_ms']:8.1f} ms  "
                  f"MFU {row['mfu_peak']:.1%} (of measured matmul rate {row['mfu_measured']:.1%})  "
                  f"peak {row['peak_mem_gib']:.1f} GiB  loss {row['loss']:.4f}", flush=True)
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
        base = next(b for b in rows if b["model"] == r["model"] and b["provider"] == "official")
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
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else dict(models=args.models, batch=args.batch, warmup=args.warmup, steps=args.steps)
    backend = args.compile or ("aot_eager" if args.quick else "inductor")
    command = "python -m bench.bench_step " + " ".join(sys.argv[1:] if argv is None else argv)
    return benchmark(providers=args.providers, compile_backend=None if backend == "none" else backend, out=args.out,
                     quick=args.quick, act_ckpt=args.act_ckpt, command=command, **sizes)


if __name__ == "__main__":
    main()
