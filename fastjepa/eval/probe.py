"""Linear-probe a pretrained encoder from the command line.

    python -m fastjepa.eval.probe --checkpoint runs/demo_mnist/<run> --data mnist
    python -m fastjepa.eval.probe --checkpoint runs/x/step_00001000 --data features.pt --config runs/x/config.yaml

``--checkpoint``: a run folder (its latest checkpoint), a ``step_XXXXXXXX`` checkpoint directory, or an exported
``target_encoder.pt`` state dict; the probed encoder is the target encoder (the I-JEPA evaluation protocol).
``--data``: ``mnist`` (the bundled 5,000 digits, the demo's held-out split) or a ``.pt`` file holding
``{"train": (images, labels), "test": (images, labels)}`` with uint8 ``[N, C, H, W]`` images (resized to the
encoder's resolution, ``data.crop_size``, bilinearly). Prints ``probe: top1=<acc>`` (and ``pixels=<acc>`` for
raw pixels with ``--pixels``).
"""

import argparse
import sys
from pathlib import Path

import torch

from fastjepa import config as fj_config
from fastjepa.checkpoint import CheckpointManager, load_model_weights
from fastjepa.eval.linear_probe import extract_features, linear_probe, resized, tensor_batches, to_float_images


def load_encoder(checkpoint: Path, cfg) -> torch.nn.Module:
    from fastjepa.models import build_models

    encoder = build_models(cfg)[0]
    if checkpoint.is_file():
        encoder.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        return encoder
    step_dir = checkpoint if (checkpoint / "meta.json").is_file() else CheckpointManager(checkpoint).latest()
    if step_dir is None:
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no complete checkpoint there (no meta.json, no "
                                "step_XXXXXXXX directories)")
    load_model_weights(step_dir, encoder, prefix="target_encoder.")
    return encoder


def load_data(data: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if data == "mnist":
        from fastjepa.data.mnist import mnist_split

        return mnist_split()
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {data}: not 'mnist' and not a file")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or {"train", "test"} - payload.keys():
        raise ValueError(f"--data {data}: expected a dict with 'train' and 'test' (images, labels) pairs")
    return {k: payload[k] for k in ("train", "test")}


def find_config(checkpoint: Path, config: str | None):
    if config is not None:
        return fj_config.load(config)
    for folder in (checkpoint.parent, checkpoint.parent.parent, checkpoint):
        if (folder / "config.yaml").is_file():
            return fj_config.load(folder / "config.yaml")
    raise FileNotFoundError(f"no config.yaml next to {checkpoint}; pass --config (the run's YAML)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastjepa.eval.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, help="'mnist' or a .pt file with train/test (images, labels)")
    p.add_argument("--config", default=None, help="the run's YAML (default: config.yaml of the run folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pixels", action="store_true", help="also probe raw pixels as a baseline")
    args = p.parse_args(argv)
    try:
        cfg = find_config(args.checkpoint, args.config)
        encoder = load_encoder(args.checkpoint, cfg).to(args.device)
        data = load_data(args.data)
    except (fj_config.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"probe: {e}", file=sys.stderr)
        return 2
    from fastjepa.data import mean_std

    mean, std = mean_std(cfg)
    results = {}
    for name, model in (("top1", encoder), ("pixels", None)) if args.pixels else (("top1", encoder),):
        # the encoder sees the images at its training resolution; raw pixels stay as stored
        size = cfg.data.crop_size if model is not None else None
        feats = [extract_features(model, tensor_batches(*data[split], 256), device=args.device,
                                  preprocess=lambda x, s=size: resized(to_float_images(x, mean, std), s) if s
                                  else to_float_images(x, mean, std)) for split in ("train", "test")]
        results[name] = linear_probe(*feats[0], *feats[1])["top1"]
    print("probe: " + " ".join(f"{k}={v:.4f}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
