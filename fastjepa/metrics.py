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

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s per device, by a substring of the device name: first match
# wins, so the more specific names come first.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("GH200", 989.4e12), ("H200", 989.4e12), ("H100", 989.4e12),
                   ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12))


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU, else None (MFU is then not reported; set ``train.peak_tflops``)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def block_flops(tokens, pairs, dim: int, hidden: int, query_tokens=None):
    """Matmul FLOPs of one ViT block's forward: k and v for ``tokens``; q, proj, fc1, fc2 for ``query_tokens``
    (all tokens by default; the target-only last predictor block has fewer); ``4 * dim`` per (query, key) pair
    for the scores and the weighted values. Works elementwise on tensors of counts."""
    queries = tokens if query_tokens is None else query_tokens
    return 2 * tokens * dim * 2 * dim + 2 * queries * dim * (2 * dim + 2 * hidden) + 4 * pairs * dim


@dataclass(frozen=True)
class FlopModel:
    """Matmul FLOPs of one I-JEPA training step (linear layers, patch embedding, attention scores and values),
    exact for the predictor layout and the real token counts of the step's masks, variable-length context
    included. Backward is twice the forward; the images need no gradient, so the patch embedding's backward is
    its weight gradient only. The one FLOP model of the trainer's MFU and of ``bench/bench_step.py``."""

    embed_dim: int
    depth: int
    mlp_hidden: int
    num_patches: int
    patch_dim: int  # in_chans * patch_size**2
    pred_dim: int
    pred_depth: int
    pred_mlp_hidden: int
    layout: str = "repeat"

    @classmethod
    def from_model(cls, model) -> "FlopModel":
        """From an ``IJEPA`` model (before any wrapping): its sizes and its predictor's layout."""
        enc, pred = model.encoder, model.predictor
        conv = enc.patch_embed.proj
        return cls(
            embed_dim=enc.embed_dim, depth=len(enc.blocks), mlp_hidden=enc.blocks[0].mlp.fc1.out_features,
            num_patches=enc.num_patches, patch_dim=conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1],
            pred_dim=pred.predictor_embed.out_features, pred_depth=len(pred.predictor_blocks),
            pred_mlp_hidden=pred.predictor_blocks[0].mlp.fc1.out_features, layout=pred.layout,
        )

    def step(self, batch: int, context_lengths, target_len: int, num_target_blocks: int,
             num_context_blocks: int = 1, packed: bool = False) -> dict[str, float]:
        """FLOPs by part (``target``, ``context``, ``predictor``) of a step on ``batch`` images whose nenc*B context
        sequences hold ``context_lengths`` tokens (one int when every context is cut to the same length, as the
        official collator does, else one value per sequence) and whose M target blocks hold ``target_len`` tokens
        each. ``packed``: the variable-length predictor path (every block on every token)."""
        d, n, m, kt, pd = self.embed_dim, self.num_patches, num_target_blocks, target_len, self.pred_dim
        lengths = torch.as_tensor(context_lengths, dtype=torch.float64).reshape(-1)
        if lengths.numel() == 1:
            lengths = lengths.repeat(num_context_blocks * batch)
        patch = 2.0 * n * self.patch_dim * d * batch
        target = patch + batch * self.depth * block_flops(n, n * n, d, self.mlp_hidden)
        blocks = block_flops(lengths, lengths**2, d, self.mlp_hidden).sum().item()
        context = 2 * patch + 3 * self.depth * blocks
        # predictor_embed on every context token once, predictor_proj on every prediction
        io = 2.0 * lengths.sum().item() * d * pd + 2.0 * m * len(lengths) * kt * pd * d
        hid, depth = self.pred_mlp_hidden, self.pred_depth
        if self.layout == "shared" and not packed:
            tokens = lengths + m * kt
            pred = depth * block_flops(tokens, lengths**2 + m * kt * (lengths + kt), pd, hid)
        else:
            tokens = lengths + kt
            full = block_flops(tokens, tokens**2, pd, hid)
            last = full if self.layout == "official" or packed else block_flops(tokens, kt * tokens, pd, hid, kt)
            pred = m * ((depth - 1) * full + last)
        return {"target": target, "context": context, "predictor": 3 * (pred.sum().item() + io)}

    def masks_step(self, masks) -> float:
        """Total FLOPs of a step with these ``fastjepa.masks.Masks`` (on the CPU: no device read)."""
        enc, pred = masks.enc, masks.pred
        lengths = masks.packed.cu_seqlens.diff() if masks.packed is not None else enc.shape[2]
        parts = self.step(enc.shape[1], lengths, pred.shape[2], pred.shape[0], enc.shape[0], masks.packed is not None)
        return sum(parts.values())

class StepAccumulator:
    """Per-step device scalars kept on the device until a log step reads them all at once (one host sync)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.bad: list[torch.Tensor] = []
        self.steps = 0
        self.images = 0
        self.flops = 0.0
        self.data_seconds = 0.0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, bad: torch.Tensor, images: int, flops: float,
            data_seconds: float):
        self.losses.append(loss.detach())
        self.grad_norms.append(grad_norm.detach())
        self.bad.append(bad)
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
