"""The real trainer end to end on this machine: synthetic JPEGs written as WebDataset shards on the spot
(``fastjepa make-shards``), ``fastjepa train`` on them with a checkpoint at its last step, then the same command
with more steps, which must resume from that checkpoint. Reports images/s with data loading (decode, crops, masks,
host-to-device copies included), data wait per step, peak memory and the resume.

    python -m bench.train_check --out DIR                     # on a GPU: ViT-B/16, batch 128, 40 + 10 steps
    python -m bench.train_check --quick --out DIR             # CPU smoke run: tiny model, a few steps, no claims

Writes ``train_check.md``, ``train_check.csv``, ``train_check.log`` (both commands' output) and
``train_check_metrics.jsonl`` to ``--out`` (and keeps the images, shards and run folder under it with
``--keep``); exits 1 when a command fails or the second run did not resume where the first stopped.
"""

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastjepa.metrics import read_jsonl

from .common import git_commit

ROOT = Path(__file__).resolve().parents[1]
GPU = dict(model="vit_base", patch=16, crop=224, batch=128, images=2560, steps=40, more=10, workers=12,
           image_size=(320, 256))
QUICK = dict(model="vit_micro", patch=4, crop=32, batch=8, images=96, steps=4, more=2, workers=2,
             image_size=(48, 40))


def write_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """An ImageFolder of ``count`` JPEGs in two classes: smooth random colour fields (they compress and decode
    like photographs, unlike white noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(count):
        cls = folder / f"class_{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(cls / f"{i:06d}.jpg", quality=90)


def fastjepa(*args: str, log: Path) -> float:
    """Run ``python -m fastjepa ARGS`` (its output to ``log`` and this console); returns its seconds. A failure
    ends the check with the command's exit code."""
    cmd = [sys.executable, "-m", "fastjepa", *args]
    print("$", " ".join(cmd), flush=True)
    tic = time.perf_counter()
    with log.open("a") as f:
        run = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        f.write(run.stdout)
    print(run.stdout[-4000:], flush=True)
    if run.returncode:
        raise SystemExit(f"train_check: `{' '.join(args[:2])} ...` exited {run.returncode}; see {log}")
    return time.perf_counter() - tic


def train_args(size: dict, shards: Path, folder: Path, steps: int, device: str) -> list[str]:
    count = len(list(shards.glob("train-*.tar")))
    return ["train", "--config", "in1k_vith14_ep300", f"meta.model_name={size['model']}",
            f"mask.patch_size={size['patch']}", f"data.crop_size={size['crop']}", f"data.batch_size={size['batch']}",
            "data.source=webdataset", f"data.shards={shards}/train-{{000000..{count - 1:06d}}}.tar",
            f"data.num_workers={size['workers']}", "data.shuffle_buffer=256",
            f"logging.folder={folder}", f"train.max_steps={steps}", f"train.checkpoint_steps={size['steps']}",
            "train.log_every=5", "train.progress=lines", "train.export=false", f"train.device={device}",
            *(["meta.pred_depth=2", "meta.pred_emb_dim=32", "meta.use_bfloat16=false", "mask.min_keep=4"]
              if device == "cpu" else [])]


def check(size: dict, out: Path, device: str, keep: bool) -> dict:
    work = out / "train_check_run"
    images, shards, folder, log = work / "images", work / "shards", work / "run", out / "train_check.log"
    log.write_text("")
    tic = time.perf_counter()
    write_images(images, size["images"], size["image_size"])
    shard_s = fastjepa("make-shards", str(images), str(shards), "--shard-size", str(max(1, size["images"] // 8)),
                       "--workers", str(min(8, os.cpu_count() or 1)), "--quiet", log=log)
    print(f"{size['images']} images written and sharded in {time.perf_counter() - tic:.1f} s", flush=True)
    first_s = fastjepa(*train_args(size, shards, folder, size["steps"], device), log=log)
    total = size["steps"] + size["more"]
    second_s = fastjepa(*train_args(size, shards, folder, total, device), log=log)
    records = [r for r in read_jsonl(folder / "metrics.jsonl") if r.get("kind", "train") == "train"]
    steps = sorted(r["step"] for r in records)
    resumed = "resumed from" in log.read_text() and steps[-1] == total
    timed = [r for r in records if r["step"] > 10 and r["step"] <= size["steps"]] or records[-1:]
    row = {
        "model": f"{size['model']}/{size['patch']}", "batch": size["batch"], "crop": size["crop"],
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "img_per_s": statistics.median(r["img_per_s"] for r in timed),
        "data_wait_ms": 1e3 * statistics.median(r["data_time_s"] for r in timed),
        "peak_mem_gib": max(r["peak_mem_mb"] for r in records) / 1024,
        "first_run_s": round(first_s, 1), "second_run_s": round(second_s, 1), "shards_s": round(shard_s, 1),
        "last_step": steps[-1], "resumed": resumed,
        "torch": torch.__version__, "commit": git_commit(),
    }
    shutil.copy(folder / "metrics.jsonl", out / "train_check_metrics.jsonl")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def write_report(row: dict, out: Path, quick: bool, command: str) -> None:
    with (out / "train_check.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    lines = [f"# `fastjepa train` end to end on {row['device']}", "",
             *(["CPU smoke run (tiny model, fp32): timings are not claims.", ""] if quick else []),
             "| model | batch | img/s (with data) | data wait ms/step | peak GiB | first run s | resumed run s "
             "| resumed to step |", "|---|---|---|---|---|---|---|---|",
             f"| {row['model']} | {row['batch']} | {row['img_per_s']:.1f} | {row['data_wait_ms']:.1f} | "
             f"{row['peak_mem_gib']:.1f} | {row['first_run_s']} | {row['second_run_s']} | "
             f"{row['last_step']} ({'resumed' if row['resumed'] else 'NOT resumed'}) |", "",
             f"torch {row['torch']}, commit {row['commit']}. Command: `{command}`", ""]
    (out / "train_check.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("train_check_out"))
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model and data, a few steps")
    ap.add_argument("--steps", type=int, default=None, help="steps of the first run (the checkpoint's step)")
    ap.add_argument("--keep", action="store_true", help="keep the images, shards and checkpoints")
    args = ap.parse_args(argv)
    size = dict(QUICK if args.quick else GPU)
    if args.steps:
        size["steps"] = args.steps
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cpu" and not args.quick:
        raise SystemExit("train_check: no CUDA GPU; the full check needs one (--quick runs the CPU smoke run)")
    args.out.mkdir(parents=True, exist_ok=True)
    row = check(size, args.out, device, args.keep)
    command = "python -m bench.train_check " + " ".join(sys.argv[1:] if argv is None else argv)
    write_report(row, args.out, args.quick, command)
    return 0 if row["resumed"] else 1


if __name__ == "__main__":
    sys.exit(main())
