"""Quality effect of the shared-context predictor at a fixed budget: pretrain the MNIST demo once per predictor
layout (same config, seed and number of steps), then linear-probe each target encoder on the same held-out split.

    python -m bench.bench_layout_quality [--steps 150] [--seeds 0 1] [--config configs/demo_mnist.yaml]

Layouts are ``fastjepa.predictor_layout`` values (``fastjepa.models.predictor``): "repeat" is the official method;
"shared" (context tokens attend to the context only, block m's mask tokens to the context
and block m), through the dense reference attention on CPU and the Triton kernel on a GPU. The probe is the demo's
(``fastjepa.demo.probe_all``: frozen target encoder, average-pooled tokens, the same held-out split), reported next
to the random-init encoder's.
Writes ``layout_quality.csv`` (appended) and ``layout_quality.md`` under ``bench/results/<device>/``.
"""

import argparse
import csv
import json
import time
from pathlib import Path

import torch

import fastjepa.train as train
from fastjepa import config as fj_config
from fastjepa.demo import probe_all

from .common import RESULTS, device_dir, git_commit

LAYOUTS = ("repeat", "shared")


def run_one(config: str, layout: str, steps: int, seed: int, folder: Path) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = fj_config.load(config, [f"logging.folder={folder / f'{layout}_s{seed}'}", f"train.max_steps={steps}",
                                  "train.export=false", "train.resume=none", "train.progress=lines",
                                  "train.log_every=50", f"fastjepa.seed={seed}", f"fastjepa.predictor_layout={layout}"])
    tic = time.time()
    result = train.run(cfg)
    train_s = time.time() - tic
    losses = [v for _, v in sorted(result.losses.items())]
    probes = probe_all(cfg, result.model.target_encoder, device)
    return {"layout": layout, "seed": seed, "steps": result.step, "final_loss": losses[-1] if losses else float("nan"),
            "train_s": round(train_s, 1), "top1": probes["ijepa"]["top1"], "random_top1": probes["random"]["top1"],
            "config": config, "model": cfg.meta.model_name, "pred_depth": cfg.meta.pred_depth,
            "device": device_dir(str(device)), "commit": git_commit()}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(fj_config.CONFIG_DIR / "demo_mnist.yaml"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--work", type=Path, default=Path("runs/layout_quality"), help="trainer folders")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<device>/)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # a tiny model on a shared CPU: threads only add contention
    rows = [run_one(args.config, layout, args.steps, seed, args.work) for seed in args.seeds for layout in args.layouts]
    out = args.out or RESULTS / rows[0]["device"]
    out.mkdir(parents=True, exist_ok=True)
    new = not (out / "layout_quality.csv").exists()
    with open(out / "layout_quality.csv", "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    lines = ["| layout | seed | steps | final loss | probe top-1 | random-init top-1 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['seed']} | {r['steps']} | {r['final_loss']:.2e} | {r['top1']:.1%} | "
              f"{r['random_top1']:.1%} |" for r in rows]
    (out / "layout_quality.md").write_text("\n".join(lines) + "\n")
    for r in rows:
        print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()
