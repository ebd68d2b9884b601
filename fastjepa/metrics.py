"""Training metrics: the FLOP model behind MFU, a sync-free per-step accumulator, and the rank-0 sinks
(progress bar or log lines, ``metrics.jsonl``, TensorBoard when installed)."""

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("fastjepa")

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s per device, by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "V100": 125.0}


def detect_peak_tflops(device: torch.device) -> float:
    """Peak bf16 TFLOP/s of a known GPU, else 0 (MFU is then not reported; set ``train.peak_tflops``)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


@dataclass(frozen=True)
class IJEPAFlops:
    """Matmul FLOPs of one I-JEPA training step per image, from the real token counts of the step's masks.

    A transformer block on T tokens of width D with MLP hidden H costs 2*T*(4*D*D + 2*D*H) for the linears plus
    4*T*T*D for attention scores and values; backward is twice the forward.
    """

    embed_dim: int
    depth: int
    mlp_hidden: int
    num_patches: int
    patch_dim: int  # in_chans * patch_size**2
    pred_dim: int
    pred_depth: int
    pred_mlp_hidden: int

    @classmethod
    def from_model(cls, model) -> "IJEPAFlops":
        enc, pred = model.encoder, model.predictor
        conv = enc.patch_embed.proj
        return cls(
            embed_dim=enc.embed_dim, depth=len(enc.blocks), mlp_hidden=enc.blocks[0].mlp.fc1.out_features,
            num_patches=enc.num_patches, patch_dim=conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1],
            pred_dim=pred.predictor_embed.out_features, pred_depth=len(pred.predictor_blocks),
            pred_mlp_hidden=pred.predictor_blocks[0].mlp.fc1.out_features,
        )

    @staticmethod
    def _blocks(tokens: int, dim: int, hidden: int, depth: int) -> float:
        return depth * (2.0 * tokens * (4 * dim * dim + 2 * dim * hidden) + 4.0 * tokens * tokens * dim)

    def per_image(self, context_tokens: list[int], target_tokens: list[int]) -> float:
        """FLOPs per image for context blocks of ``context_tokens`` and target blocks of ``target_tokens``."""
        d, n = self.embed_dim, self.num_patches
        patchify = 2.0 * self.patch_dim * d
        target = patchify * n + self._blocks(n, d, self.mlp_hidden, self.depth)
        context = sum(patchify * n + self._blocks(k, d, self.mlp_hidden, self.depth) for k in context_tokens)
        predictor = 0.0
        for kc in context_tokens:
            for kt in target_tokens:
                predictor += 2.0 * kc * d * self.pred_dim + 2.0 * kt * self.pred_dim * d
                predictor += self._blocks(kc + kt, self.pred_dim, self.pred_mlp_hidden, self.pred_depth)
        return target + 3.0 * (context + predictor)


class StepAccumulator:
    """Per-step device scalars kept on the device until a log step reads them all at once (one host sync)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.steps = 0
        self.images = 0
        self.flops = 0.0
        self.data_seconds = 0.0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, images: int, flops: float, data_seconds: float):
        self.losses.append(loss.detach())
        self.grad_norms.append(grad_norm.detach())
        self.steps += 1
        self.images += images
        self.flops += flops
        self.data_seconds += data_seconds


class MetricsSink:
    """Where metrics go (rank 0 only): ``metrics.jsonl``, TensorBoard if importable, and a tqdm progress bar on a
    terminal or plain log lines otherwise."""

    def __init__(self, folder: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool | None = None, tensorboard: bool = True):
        self.enabled = enabled
        self.total_steps = total_steps
        if not enabled:
            return
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.folder / "metrics.jsonl", "a", buffering=1)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.folder / "tb"))
            except ImportError:
                pass
        self.bar = None
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: _short(record[k]) for k in ("loss", "lr", "img_per_s", "mfu") if k in record},
                                 refresh=False)
            self.bar.refresh()
        elif "loss" in record:
            fields = " ".join(f"{k}={_short(v)}" for k, v in record.items() if k not in ("step", "epoch"))
            eta = record.get("eta_s")
            logger.info(f"step {step}/{self.total_steps} {fields}" + (f" eta={_hms(eta)}" if eta else ""))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            logger.info(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl``; for a resumed run, the last record of each step wins (steps re-run after
    the last checkpoint replace the killed run's)."""
    by_step: dict[tuple, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[(rec.get("kind", "train"), rec["step"])] = rec
    return sorted(by_step.values(), key=lambda r: (r["step"], r.get("kind", "train")))
