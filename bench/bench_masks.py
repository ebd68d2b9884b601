"""Multi-block mask collator throughput on ONE CPU core: fastjepa (parity and fixed) vs the official collator.

    python -m bench.bench_masks                                  # fastjepa only, ViT-H/14 recipe, batch 128
    python -m bench.bench_masks --official /tmp/ijepa_official   # + the official collator, and the ratio

`--official PATH` is a checkout of facebookresearch/ijepa: `src.masks.multiblock.MaskCollator` is imported from
it. Each provider is called on a list of `batch` samples and returns (collated, masks_enc, masks_pred), as in a
DataLoader worker. Samples are integers by default, so the timing is the mask sampling (what differs between the
providers) plus a trivial default_collate; `--samples image` collates 3x224x224 uint8 images as well.
Repeats of the providers are interleaved so that load from other processes hits them alike; the median over
repeats is reported (warm-up excluded), as wall-clock time and as the thread's CPU time (what one core spends,
which load from other processes on a shared machine inflates less). Rows are appended to
bench/results/<device>/masks.csv.
"""

import os

if __name__ == "__main__":  # one core, numpy's BLAS included; set before numpy loads, and only when run as a script
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import argparse
import csv
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from fastjepa.config import load as load_config
from fastjepa.masks import MultiBlockMaskCollator, official_kwargs
from fastjepa.spec import ModelSpec

from .common import RESULTS, device_dir, device_name, git_commit

# the official ViT-H/14 recipe
H14 = official_kwargs(ModelSpec.from_config(load_config("in1k_vith14_ep300")))
CSV_COLUMNS = [
    "op",
    "provider",
    "mode",
    "shape",
    "clock",
    "median",
    "p20",
    "p80",
    "unit",
    "samples_per_s",
    "speedup_vs_official",
    "device",
    "torch",
    "commit",
    "date",
]


def official_collator(path):
    root = Path(path).resolve()
    if not (root / "src" / "masks" / "multiblock.py").is_file():
        raise SystemExit(
            f"--official {path}: no src/masks/multiblock.py there; pass a checkout of "
            f"facebookresearch/ijepa (the folder that holds src/)"
        )
    sys.path.insert(0, str(root))
    from src.masks.multiblock import MaskCollator

    return MaskCollator(**H14)


def time_batches(collator, batch, calls):
    """(wall, thread CPU) seconds per batch over `calls` consecutive calls."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        collator(batch)
    return (time.perf_counter() - wall) / calls, (time.thread_time() - cpu) / calls


def report(times: dict, batch: int, repeats: int, samples: str) -> list[dict]:
    """Print the wall- and CPU-clock tables and return their rows."""
    shape = f"H/14 224px patch14 B={batch} nenc=1 npred=4 samples={samples}"
    info = {
        "device": f"{device_name('cpu')} (1 thread)",
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    rows = []
    print(f"\n{shape}, one CPU thread, median of {repeats} repeats (p20-p80)")
    for clock, col in (("wall", 0), ("cpu", 1)):
        ms = {name: [1e3 * t[col] for t in ts] for name, ts in times.items()}
        official_ms = statistics.median(ms["official"]) if "official" in ms else None
        print(f"\n{clock} clock\n")
        print("| provider | ms / batch | us / sample | samples/s | vs official |")
        print("|---|---|---|---|---|")
        for name, values in ms.items():
            med = statistics.median(values)
            q = statistics.quantiles(values, n=5, method="inclusive")
            ratio = round(official_ms / med, 1) if official_ms else ""
            rows.append(
                {
                    "op": "mask_collator",
                    "provider": name.split("-")[0],
                    "mode": name.split("-")[-1],
                    "shape": shape,
                    "clock": clock,
                    "median": round(med, 4),
                    "p20": round(q[0], 4),
                    "p80": round(q[3], 4),
                    "unit": "ms",
                    "samples_per_s": round(1e3 * batch / med),
                    "speedup_vs_official": ratio,
                    **info,
                }
            )
            print(
                f"| {name} | {med:.3f} ({q[0]:.3f}-{q[3]:.3f}) | {1e3 * med / batch:.2f} | "
                f"{1e3 * batch / med:,.0f} | {f'{ratio}x' if ratio else '-'} |"
            )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per provider (median reported)")
    parser.add_argument("--official", default=None, help="checkout of facebookresearch/ijepa to time against")
    parser.add_argument(
        "--samples",
        choices=["index", "image"],
        default="index",
        help="index: int samples (mask cost only); image: also collate 3x224x224 uint8 images",
    )
    parser.add_argument("--no-csv", action="store_true", help="do not append rows to bench/results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    if args.samples == "image":
        batch = [(torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8), i) for i in range(args.batch)]
    else:
        batch = list(range(args.batch))
    providers = {f"fastjepa-{mode}": MultiBlockMaskCollator(**H14, mode=mode) for mode in ("parity", "fixed")}
    if args.official:
        providers["official"] = official_collator(args.official)

    # calls per repeat: about 0.2 s of work each, so timer and scheduling noise stay small
    calls = {}
    for name, collator in providers.items():
        warm, _ = time_batches(collator, batch, 3)
        calls[name] = max(1, int(0.2 / warm))
    times = {name: [] for name in providers}
    for _ in range(args.repeats):
        for name, collator in providers.items():
            times[name].append(time_batches(collator, batch, calls[name]))

    rows = report(times, args.batch, args.repeats, args.samples)
    if not args.no_csv:
        out = RESULTS / device_dir("cpu")
        out.mkdir(parents=True, exist_ok=True)
        path = out / "masks.csv"
        new_file = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerows(rows)
        print(f"\nrows appended to {path}")


if __name__ == "__main__":
    main()
