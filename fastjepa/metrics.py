"""Training metrics: the FLOP model behind MFU, a sync-free per-step accumulator, and the rank-0 sinks
(progress bar or log lines, ``metrics.jsonl``, TensorBoard when installed)."""

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastjepa.spec import ModelSpec, predictor_sequences

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


def block_matmuls(tokens, pairs, dim: int, hidden: int, query_tokens=None) -> dict:
    """Matmul FLOPs of one ViT block's forward, per matmul: k and v for ``tokens``; q, proj, fc1, fc2 for
    ``query_tokens`` (all tokens by default; the target-only last predictor block has fewer); ``4 * dim`` per
    (query, key) pair for the scores and the weighted values (``attention``). Works elementwise on arrays of
    counts."""
    queries = tokens if query_tokens is None else query_tokens
    return {"qkv": 2 * tokens * dim * 2 * dim + 2 * queries * dim * dim, "attention": 4 * pairs * dim,
            "proj": 2 * queries * dim * dim, "fc1": 2 * queries * dim * hidden, "fc2": 2 * queries * hidden * dim}


def block_flops(tokens, pairs, dim: int, hidden: int, query_tokens=None):
    """Matmul FLOPs of one ViT block's forward: the sum of ``block_matmuls``."""
    return sum(block_matmuls(tokens, pairs, dim, hidden, query_tokens).values())


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

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "FlopModel":
        """From a run's spec, without building its model."""
        return cls(embed_dim=spec.embed_dim, depth=spec.depth, mlp_hidden=int(spec.embed_dim * spec.mlp_ratio),
                   num_patches=spec.num_patches, patch_dim=spec.in_chans * spec.patch_size**2, pred_dim=spec.pred_dim,
                   pred_depth=spec.pred_depth, pred_mlp_hidden=int(spec.pred_dim * spec.mlp_ratio), layout=spec.layout)

    def step(self, batch: int, context_lengths, target_len: int, num_target_blocks: int,
             num_context_blocks: int = 1, packed: bool = False) -> dict[str, float]:
        """FLOPs by part (``target``, ``context``, ``predictor``) of a step on ``batch`` images whose nenc*B context
        sequences hold ``context_lengths`` tokens (one int when every context is cut to the same length, as the
        official collator does, else one value per sequence) and whose M target blocks hold ``target_len`` tokens
        each. ``packed``: the variable-length predictor path (every block on every token)."""
        d, n, m, kt, pd = self.embed_dim, self.num_patches, num_target_blocks, target_len, self.pred_dim
        # numpy, not torch: counting needs no tensor read (the trainer calls this between steps)
        lengths = np.asarray(context_lengths, dtype=np.float64).reshape(-1)
        if lengths.size == 1:
            lengths = np.repeat(lengths, num_context_blocks * batch)
        patch = 2.0 * n * self.patch_dim * d * batch
        target = patch + batch * self.depth * block_flops(n, n * n, d, self.mlp_hidden)
        blocks = float(block_flops(lengths, lengths**2, d, self.mlp_hidden).sum())
        context = 2 * patch + 3 * self.depth * blocks
        # predictor_embed on every context token once, predictor_proj on every prediction
        io = 2.0 * float(lengths.sum()) * d * pd + 2.0 * m * len(lengths) * kt * pd * d
        hid, depth = self.pred_mlp_hidden, self.pred_depth
        layout = "repeat" if packed else self.layout  # the packed path lays its sequences out as repeat does
        _, tokens = predictor_sequences(layout, len(lengths), lengths, kt, m)
        if layout == "shared":
            pred = depth * block_flops(tokens, lengths**2 + m * kt * (lengths + kt), pd, hid)
        else:
            full = block_flops(tokens, tokens**2, pd, hid)
            last = full if self.layout == "official" or packed else block_flops(tokens, kt * tokens, pd, hid, kt)
            pred = m * ((depth - 1) * full + last)
        return {"target": target, "context": context, "predictor": 3 * (float(pred.sum()) + io)}

    def masks_step(self, masks) -> float:
        """Total FLOPs of a step with these ``fastjepa.mask_batch.Masks`` (on the CPU: no device read)."""
        enc, pred = masks.enc, masks.pred
        lengths = np.diff(masks.packed.cu_seqlens.numpy()) if masks.packed is not None else enc.shape[2]
        parts = self.step(enc.shape[1], lengths, pred.shape[2], pred.shape[0], enc.shape[0], masks.packed is not None)
        return sum(parts.values())

def estimate_training_memory(spec: ModelSpec, shards: int = 1, bf16: bool = False,
                             activation_checkpointing: bool = False, online_target: bool = False) -> dict[str, float]:
    """Bytes one rank needs to train ``spec``: weights, gradients and AdamW moments (sharded over ``shards`` ranks
    under FSDP2/HSDP) plus the activations the backward keeps (Korthikanti et al.'s per-layer count,
    34*s*h + 5*a*s^2 bytes in 16-bit, doubled in fp32; the scores term only with the ``math`` attention backend;
    one block's worth with activation checkpointing). An estimate to refuse hopeless runs early, not a
    measurement."""
    trained, target = spec.parameter_counts()
    target = 0 if online_target else target
    states = (trained * (4 + 4 + 8) + target * (4 + 2 * bf16)) / shards
    unit = 1 if bf16 else 2  # the count is in 16-bit bytes
    ctx, tgt = spec.expected_tokens()
    scores = spec.attn_backend == "math"

    def layers(seqs: int, tokens: int, width: int, num: int) -> float:
        per_layer = seqs * (34 * tokens * width + 5 * spec.num_heads * tokens**2 * scores) * unit
        if activation_checkpointing:
            return seqs * tokens * width * 2 * unit * num + per_layer
        return per_layer * num

    pred_seqs, pred_tokens = spec.predictor_sequences(ctx, tgt)
    contexts = spec.batch_size * spec.num_enc_masks
    activations = (layers(contexts, ctx, spec.embed_dim, spec.depth)
                   + layers(pred_seqs, pred_tokens, spec.pred_dim, spec.pred_depth)
                   # the target encoder's widest transient (the MLP hidden)
                   + spec.batch_size * spec.num_patches * 4 * spec.embed_dim * 2 * unit)
    return {"weights_and_optimizer": states, "activations": activations, "total": states + activations}


def device_memory_bytes(device: torch.device, local_ranks: int = 1) -> float:
    """Memory one rank can use: the GPU's total, or this machine's RAM shared by its ranks."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[1])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, local_ranks)


class StepAccumulator:
    """Per-step device scalars kept on the device until a log step reads them all at once (one host sync)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.bad: list[torch.Tensor] = []
        self.terms: tuple[torch.Tensor, torch.Tensor] | None = None  # the last step's loss terms (SIGReg runs)
        self.steps = 0
        self.images = 0
        self.flops = 0.0
        self.data_seconds = 0.0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, bad: torch.Tensor, images: int, flops: float,
            data_seconds: float, terms: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.terms = terms
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
        self.jsonl.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
        if "loss" not in record:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(console_line(record, short=True), refresh=False)
            self.bar.refresh()
        else:
            logger.info(f"step {step}/{self.total_steps} {console_line(record)}")

    def finish_progress(self) -> None:
        """End the progress bar once training steps are over (a later message then starts its own line)."""
        if self.enabled and self.bar is not None:
            self.bar.close()
            self.bar = None

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


def console_line(record: dict, short: bool = False) -> str:
    """The console's view of a training record, about 90 characters (the full record is in metrics.jsonl):
    loss, lr, gradient norm, throughput, MFU and memory, RankMe when computed, skipped steps, ETA."""
    def num(value) -> str:
        return "nan" if value is None else f"{value:.4g}"

    parts = [f"loss {num(record['loss'])}", f"lr {record['lr']:.2e}", f"grad {num(record.get('grad_norm'))}",
             f"{record['img_per_s']:.0f} img/s"]
    if "mfu" in record:
        parts.append(f"mfu {record['mfu']:.1%}")
    if not short:
        parts.append(f"mem {record['peak_mem_mb'] / 1024:.1f}G")
    if "sigreg" in record and not short:
        parts.append(f"sigreg {num(record['sigreg'])}")
    if "rankme" in record:
        parts.append(f"rankme {record['rankme']:.1f}")
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']}")
    if not short and record.get("eta_s") is not None:
        parts.append(f"eta {_hms(record['eta_s'])}")
    return " ".join(parts)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _json_safe(value):
    """Non-finite floats as null: ``metrics.jsonl`` stays valid JSON (no bare NaN or Infinity tokens)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl``; for a resumed run, the last record of each step wins (steps re-run after
    the last checkpoint replace the killed run's). A torn last line (a run killed while writing it) is skipped; a
    non-finite value reads as None."""
    by_step: dict[tuple, dict] = {}
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            if number == len(lines):
                logger.warning(f"{path}: skipping its torn last line ({len(line)} characters)")
                continue
            raise ValueError(f"{path}:{number}: not a JSON record ({e})") from None
        by_step[(rec.get("kind", "train"), rec["step"])] = rec
    return sorted(by_step.values(), key=lambda r: (r["step"], r.get("kind", "train")))
