"""The main job: pretrain a tiny ViT with I-JEPA on the 5,000 bundled MNIST digits, then linear-probe it.

    python -m fastjepa.demo [--config configs/demo_mnist.yaml] [key=value ...]

Pretraining uses the trainer (``fastjepa.train.run``) in this process, on the GPU when there is one. The probe
compares three frozen feature sets on the same held-out split (labels are never used in pretraining): the
I-JEPA target encoder (average-pooled tokens), the same architecture at random initialisation, and raw pixels.
It ends with the line ``probe: ijepa=<acc> random=<acc> pixels=<acc>`` and writes a loss/RankMe curve PNG when
matplotlib is installed.
"""

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch

from fastjepa import config
from fastjepa.choices import VIT_SIZES
from fastjepa.data import mean_std
from fastjepa.data.mnist import mnist_split
from fastjepa.eval.linear_probe import extract_features, linear_probe, resized, tensor_batches, to_float_images
from fastjepa.metrics import read_jsonl
from fastjepa.models import build_models
from fastjepa.progress import counted
from fastjepa.spec import ModelSpec
from fastjepa.train import SetupError, configure_logging, run

logger = logging.getLogger("fastjepa")

DEMO_THREADS = 2  # CPU threads of the demo (the machine the README's numbers come from has 2 cores)


def reproducible_cpu() -> None:
    """On a CPU, the same result on every run of the same machine kind: a fixed thread count (reductions split
    the same way) and deterministic kernels."""
    if not torch.cuda.is_available():
        torch.set_num_threads(DEMO_THREADS)
        torch.use_deterministic_algorithms(True, warn_only=True)


def probe_all(cfg, trained_encoder: torch.nn.Module, device: torch.device) -> dict[str, dict]:
    """Linear-probe accuracies of the trained encoder, a random-init twin and raw pixels on MNIST-5k."""
    data = mnist_split()
    mean, std = mean_std(cfg)
    torch.manual_seed(cfg.fastjepa.seed)
    random_encoder = build_models(ModelSpec.from_config(cfg))[0].to(device)
    def at_crop_size(x: torch.Tensor) -> torch.Tensor:
        # the encoders see the digits at the pretraining resolution (bilinear, as the training crops are resized)
        return resized(to_float_images(x, mean, std), cfg.data.crop_size)

    results = {}
    for name, encoder in (("ijepa", trained_encoder), ("random", random_encoder), ("pixels", None)):
        preprocess = at_crop_size if encoder is not None else (lambda x: to_float_images(x, mean, std))
        feats = {}
        for split, (images, labels) in data.items():
            batches = counted(tensor_batches(images, labels, 500), f"demo probe: {name} {split}", len(images))
            feats[split] = extract_features(encoder, batches, device=device, preprocess=preprocess)
        results[name] = linear_probe(*feats["train"], *feats["test"])
        logger.info(f"demo probe: {name} linear probe top-1 {results[name]['top1']:.4f}")
    return results


def plot_curves(folder: Path, width: int, accs: dict[str, dict]) -> Path | None:
    """The run's story in one picture: the loss, RankMe against its maximum (the embedding width) and the three
    probe accuracies; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_jsonl(folder / "metrics.jsonl")
    train = [r for r in records if r.get("kind", "train") == "train"]
    online = [r for r in records if r.get("kind") == "eval"]  # the eval section's k-NN probe, when on
    rank = [r for r in train if "rankme" in r]
    ratios = [1.2, 1.2, 0.8] + ([1.0] if online else [])
    fig, axes = plt.subplots(1, len(ratios), figsize=(4.7 * len(ratios), 3.8), gridspec_kw={"width_ratios": ratios})
    if online:
        axes[3].plot([r["step"] for r in online], [r["knn_top1"] for r in online], marker="o", color="tab:green")
        axes[3].set(xlabel="step", ylabel="k-NN top-1", ylim=(0, 1.05), title="online k-NN probe (target encoder)")
    axes[0].plot([r["step"] for r in train], [math.nan if r["loss"] is None else r["loss"] for r in train])
    axes[0].set(xlabel="step", ylabel="smooth-L1 loss", title="I-JEPA pretraining loss")
    axes[1].plot([r["step"] for r in rank], [r["rankme"] for r in rank], marker="o", label="RankMe")
    axes[1].axhline(width, color="grey", linestyle="--", label=f"maximum: width {width}")
    axes[1].set(xlabel="step", ylabel="effective rank", yscale="log", title="target-encoder RankMe")
    axes[1].legend(fontsize=8)
    names = list(accs)
    bars = axes[2].bar(names, [accs[n]["top1"] for n in names], color=["tab:blue", "tab:gray", "tab:orange"])
    axes[2].bar_label(bars, [f"{accs[n]['top1']:.3f}" for n in names])
    axes[2].set(ylabel="linear-probe top-1", ylim=(0, 1.05), title="held-out digits")
    fig.tight_layout()
    path = folder / "curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastjepa demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="demo_mnist", help="a shipped config's name or a YAML file")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. optimization.epochs=2")
    args = p.parse_args(argv)
    try:
        cfg = config.load(args.config, overrides=args.overrides)
    except config.ConfigError as e:
        print(f"demo: config error: {e}", file=sys.stderr)
        return 2
    configure_logging()
    reproducible_cpu()
    # A fresh run folder per invocation, so a previous demo's checkpoints are never resumed or overwritten.
    cfg.logging.folder = str(Path(cfg.logging.folder) / time.strftime("%Y%m%d-%H%M%S"))
    cfg.train.resume = "none"

    t0 = time.perf_counter()
    try:
        result = run(cfg)
    except SetupError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    t_train = time.perf_counter() - t0
    device = next(result.model.target_encoder.parameters()).device
    accs = probe_all(cfg, result.model.target_encoder, device)
    t_total = time.perf_counter() - t0
    curves = plot_curves(result.folder, VIT_SIZES[cfg.meta.model_name][0], accs)
    print(f"run folder: {result.folder} ({result.step} steps, pretraining {t_train:.0f} s, total {t_total:.0f} s, "
          f"device {device.type}, {torch.get_num_threads()} threads)")
    for name, r in accs.items():
        print(f"  {name:>6}: top-1 {r['top1']:.4f} (L2 {r['l2']:g} picked on a validation slice: {r['val_top1']:.4f})")
    print(f"curves: {curves}" if curves else "curves: matplotlib is not installed; pip install matplotlib for the PNG")
    print(f"probe: ijepa={accs['ijepa']['top1']:.4f} random={accs['random']['top1']:.4f} "
          f"pixels={accs['pixels']['top1']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
