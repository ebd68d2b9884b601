"""Learned representations at a fixed budget: pretrain the MNIST demo recipe once per variant and seed (same
config, steps and data), then linear-probe each target encoder as the demo does. The variants of a comparison are
config overrides: a named comparison below, or ad hoc with ``--variant``.

    python -m bench.bench_quality --compare fp8 --seeds 0 1 --test  # no FP8, FP8 targets, every GEMM in FP8
    python -m bench.bench_quality --compare layout --steps 234                   # repeat vs shared layout
    python -m bench.bench_quality --compare try --variant w05="fastjepa.sigreg.weight=0.05"  # a search step

Choosing a recipe reads only the validation accuracy (``val_top1``: the probe's L2 strength picked on 20% of the
probe's training digits, never the held-out test digits); ``--test`` also probes the held-out split, for the
report once the choice is made. The probe is the demo's (``fastjepa.demo.probe_all``: frozen target encoder,
average-pooled tokens). Writes ``<compare>.csv`` (appended) and ``<compare>.md`` (this run, with the command)
under ``bench/results/quality/`` (``--out`` to change).
"""

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch

from fastjepa import config, train
from fastjepa.demo import probe_all, reproducible_cpu
from fastjepa.metrics import read_jsonl

from .common import RESULTS, device_dir, git_commit

COMPARISONS = {
    # the predictor's attention layout: the official method vs the context computed once
    "layout": {"repeat": ["fastjepa.predictor_layout=repeat"], "shared": ["fastjepa.predictor_layout=shared"]},
    # FP8 matmuls: none (the run's precision: fp32 on CPU, bf16 on a GPU), the target forward's, every GEMM's
    "fp8": {"none": ["fastjepa.fp8=none"], "target": ["fastjepa.fp8=target"], "all": ["fastjepa.fp8=all"]},
}
NONE = float("nan")  # a probe that was not run (the test split without --test)


def run_one(config_file: str, overrides: list[str], steps: int, seed: int, folder: Path, test: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config.load(config_file, [*overrides, f"logging.folder={folder}", f"train.max_steps={steps}",
                                    "train.export=false", "train.resume=none", "train.progress=lines",
                                    "train.log_every=50", f"fastjepa.seed={seed}"])
    tic = time.time()
    result = train.run(cfg)
    train_s = time.time() - tic
    records = [r for r in read_jsonl(folder / "metrics.jsonl") if r.get("kind", "train") == "train"]
    rankme = [r["rankme"] for r in records if "rankme" in r]
    probes = probe_all(cfg, result.model.target_encoder, device)
    return {"seed": seed, "steps": result.step, "final_loss": records[-1]["loss"] if records else NONE,
            "rankme": rankme[-1] if rankme else NONE, "val_top1": probes["ijepa"]["val_top1"],
            "top1": probes["ijepa"]["top1"] if test else NONE,
            "random_top1": probes["random"]["top1"] if test else NONE, "train_s": round(train_s, 1),
            "config": config, "overrides": " ".join(overrides), "device": device_dir(str(device)),
            "commit": git_commit()}


def write(rows: list[dict], out: Path, compare: str, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    new = not (out / f"{compare}.csv").exists()
    with open(out / f"{compare}.csv", "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)

    def pct(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.1%}"

    lines = [f"# {compare} at the same budget ({rows[0]['device']}, commit {rows[0]['commit']})", "",
             "| variant | seed | steps | final loss | RankMe | val top-1 | test top-1 | random-init test | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['seed']} | {r['steps']} | {r['final_loss']:.4f} | {r['rankme']:.2f} | "
              f"{pct(r['val_top1'])} | {pct(r['top1'])} | {pct(r['random_top1'])} | {r['train_s']:.0f} |"
              for r in rows]
    lines += ["", "Overrides: " + "; ".join(sorted({f"{r['variant']}: `{r['overrides'] or '(none)'}`"
                                                    for r in rows})), "", f"Command: `{command}`", ""]
    (out / f"{compare}.md").write_text("\n".join(lines))


def variants(compare: str, extra: list[str]) -> dict[str, list[str]]:
    """The named comparison's variants, then ``NAME=OVERRIDE[ OVERRIDE...]`` ones from the command line."""
    found = dict(COMPARISONS.get(compare, {}))
    for text in extra:
        name, eq, overrides = text.partition("=")
        if not eq or not name:
            raise SystemExit(f"--variant {text!r}: write NAME=OVERRIDES, e.g. w05='fastjepa.sigreg.weight=0.05'")
        found[name] = overrides.split()
    if not found:
        raise SystemExit(f"--compare {compare}: not a named comparison ({', '.join(COMPARISONS)}); give --variant")
    return found


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", required=True, help=f"a named comparison ({', '.join(COMPARISONS)}) or, with "
                    "--variant, the name of the results file")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                    help="an extra variant: its config overrides, space-separated (repeatable)")
    ap.add_argument("--test", action="store_true", help="also probe the held-out test digits (the report)")
    ap.add_argument("--config", default="demo_mnist", help="a shipped config's name or a YAML file")
    ap.add_argument("--steps", type=int, default=234, help="training steps of every run (the demo's: 234)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--work", type=Path, default=Path("runs/quality"), help="trainer folders")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/quality/)")
    args = ap.parse_args(argv)
    train.configure_logging()
    runs = variants(args.compare, args.variant)
    reproducible_cpu()  # the demo's setting: the same numbers as the demo, on every run of a machine
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for seed in args.seeds:
        for name, overrides in runs.items():
            row = run_one(args.config, overrides, args.steps, seed, args.work / stamp / f"{name}_s{seed}", args.test)
            rows.append({"variant": name, **row})
            print(json.dumps(rows[-1]), flush=True)
    command = "python -m bench.bench_quality " + " ".join(sys.argv[1:] if argv is None else argv)
    write(rows, args.out or RESULTS / "quality", args.compare, command)
    return rows


if __name__ == "__main__":
    main()
