"""Evaluate a pretrained encoder from the command line: linear-probe top-1 and k-NN top-1 of its frozen features.

    fastjepa probe --checkpoint runs/h14 --data imagefolder --train /data/in1k/train --val /data/in1k/val
    fastjepa probe --checkpoint runs/h14 --data webdataset --train '/shards/train-{000000..001281}.tar' \\
        --val '/shards/val-{000000..000049}.tar'
    fastjepa probe --checkpoint runs/demo_mnist/<run> --data mnist          # the demo's held-out split
    fastjepa probe --checkpoint runs/x/target_encoder.pt --data split.pt --config runs/x/config.yaml

``--checkpoint``: a run folder (its latest checkpoint), a ``step_XXXXXXXX`` checkpoint directory, or an exported
``target_encoder.pt`` state dict; the probed encoder is the target encoder (the I-JEPA evaluation protocol).
``--data``: ``imagefolder`` or ``webdataset`` (``--train``/``--val`` sources, read and decoded as in training, each
image's centre crop at the training resolution), ``mnist`` (the bundled digits), or a ``.pt`` file holding
``{"train": (images, labels), "test": (images, labels)}`` with uint8 ``[N, C, H, W]`` images. Features are the
average-pooled tokens, extracted in batches on ``--device``; the linear probe is a logistic regression (L2 picked
on a slice of the training features), the k-NN DINO's (k=20, cosine, temperature 0.07). Prints one JSON object.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from fastjepa import config
from fastjepa.checkpoint import CheckpointError, CheckpointManager, load_model_weights, read_meta
from fastjepa.data import mean_std
from fastjepa.data.mnist import mnist_split
from fastjepa.data.transforms import EvalTransform
from fastjepa.eval.data import eval_batches, eval_source
from fastjepa.eval.knn import knn_top1
from fastjepa.eval.linear_probe import extract_features, linear_probe, resized, tensor_batches, to_float_images
from fastjepa.models import build_models
from fastjepa.progress import counted
from fastjepa.spec import ModelSpec


def load_encoder(checkpoint: Path, cfg) -> torch.nn.Module:
    encoder = build_models(ModelSpec.from_config(cfg))[0]
    if checkpoint.is_file():
        encoder.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        return encoder
    step_dir = checkpoint if (checkpoint / "meta.json").is_file() else CheckpointManager(checkpoint).latest()
    if step_dir is None:
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no complete checkpoint there (no meta.json, no "
                                "step_XXXXXXXX directories)")
    # the encoder the targets came from: the EMA target, or the encoder itself in a teacher-free run
    online = read_meta(step_dir).get("target_encoder") == "online"
    load_model_weights(step_dir, encoder, prefix="encoder." if online else "target_encoder.")
    return encoder


def find_config(checkpoint: Path, config_file: str | None):
    if config_file is not None:
        return config.load(config_file)
    for folder in (checkpoint.parent, checkpoint.parent.parent, checkpoint):
        if (folder / "config.yaml").is_file():
            return config.load(folder / "config.yaml")
    raise FileNotFoundError(f"no config.yaml next to {checkpoint}; pass --config (the run's YAML)")


def tensor_data(data: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """In-memory splits: ``mnist`` or a ``.pt`` file."""
    if data == "mnist":
        return mnist_split()
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {data}: not imagefolder, webdataset, mnist, or a .pt file")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or {"train", "test"} - payload.keys():
        raise ValueError(f"--data {data}: expected a dict with 'train' and 'test' (images, labels) pairs")
    return {k: payload[k] for k in ("train", "test")}


def split_batches(args, cfg, skipped: dict[str, Counter]):
    """``{split: (batches of uint8 images and labels, whether they need resizing)}`` for the chosen data."""
    if args.data in ("imagefolder", "webdataset"):
        if not (args.train and args.val):
            raise ValueError(f"--data {args.data} needs --train and --val (a folder or a shard pattern each)")
        transform = EvalTransform(cfg.data.crop_size, "L" if cfg.fastjepa.in_chans == 1 else "RGB")
        sources = {"train": eval_source(args.data, args.train, args.train_index),
                   "val": eval_source(args.data, args.val, args.val_index)}
        return {split: (eval_batches(source, transform, args.batch_size, args.workers, skipped[split]), False)
                for split, source in sources.items()}
    data = tensor_data(args.data)  # a .pt file's (and the digits') held-out split is "test"
    return {split: (tensor_batches(*data[key], args.batch_size), True) for split, key in (("train", "train"),
                                                                                            ("val", "test"))}


def probe(args) -> dict:
    cfg = find_config(args.checkpoint, args.config)
    encoder = load_encoder(args.checkpoint, cfg).to(args.device)
    mean, std = mean_std(cfg)
    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    results = {"checkpoint": str(args.checkpoint), "data": args.data}
    for name, model in (("encoder", encoder), ("pixels", None)) if args.pixels else (("encoder", encoder),):
        feats, skipped = {}, {"train": Counter(), "val": Counter()}
        for split, (batches, resize) in split_batches(args, cfg, skipped).items():
            size = cfg.data.crop_size if resize and model is not None else None

            def preprocess(x, size=size):
                x = to_float_images(x, mean, std)
                return resized(x, size) if size else x

            feats[split] = extract_features(model, counted(batches, f"fastjepa probe: {name} {split}"), device=device,
                                            preprocess=preprocess, autocast_dtype=amp)
        linear = linear_probe(*feats["train"], *feats["val"])
        results[name] = {"linear_top1": linear["top1"], "linear_l2": linear["l2"],
                         "knn_top1": knn_top1(*feats["train"], *feats["val"], k=args.knn_k,
                                              temperature=args.knn_temperature, device=device)}
        results.update(train_samples=len(feats["train"][0]), val_samples=len(feats["val"][0]))
        # every pass reads the same samples: the skips are the first pass's
        results.setdefault("skipped", {split: dict(counts) for split, counts in skipped.items()})
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, each checked before any data is read or model built (argparse's exit 2 with the fix)."""
    p = argparse.ArgumentParser(prog="fastjepa probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a run folder (its latest checkpoint), a step_XXXXXXXX directory, or a target_encoder.pt")
    p.add_argument("--data", required=True, help="imagefolder, webdataset, mnist, or a .pt file")
    p.add_argument("--train", help="imagefolder: the training split's folder; webdataset: its shard pattern")
    p.add_argument("--val", help="the evaluation split, like --train")
    p.add_argument("--train-index", help="webdataset: the index.json of the train shards (default: next to them)")
    p.add_argument("--val-index", help="webdataset: the index.json of the val shards (default: next to them)")
    p.add_argument("--config", default=None, help="the run's YAML (default: config.yaml of the run folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where features are extracted: cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    p.add_argument("--batch-size", type=int, default=256, help="images per feature-extraction batch (default 256)")
    p.add_argument("--workers", type=int, default=4, help="data workers decoding images")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours of the k-NN classifier (default 20)")
    p.add_argument("--knn-temperature", type=float, default=0.07,
                   help="temperature of the k-NN's similarity weights (default 0.07, DINO's)")
    p.add_argument("--pixels", action="store_true", help="also probe raw pixels as a baseline")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--knn-k", args.knn_k, 1)):
        if value < low:
            p.error(f"{flag} {value}: must be at least {low}")
    if not args.knn_temperature > 0:
        p.error(f"--knn-temperature {args.knn_temperature}: must be positive (e.g. 0.07)")
    if not args.checkpoint.exists():
        p.error(f"--checkpoint {args.checkpoint}: not found (a run folder, a step_XXXXXXXX directory or a "
                "target_encoder.pt)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is visible here (torch {torch.__version__}); use --device cpu")
    if args.data == "imagefolder":
        for flag, folder in (("--train", args.train), ("--val", args.val)):
            if folder is not None and not Path(folder).is_dir():
                p.error(f"{flag} {folder}: no such folder (an ImageFolder: {flag} DIR with DIR/<class>/<image>)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = probe(args)
    except (config.ConfigError, FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"fastjepa probe: {e}", file=sys.stderr)
        return 2
    text = json.dumps(results)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
