"""Input-pipeline throughput: images/s of ONE worker process for decode + random-resized-crop + collate (+ masks).

    python -m bench.bench_data                      # 500x375 JPEGs at quality 90, 224 crops, batch 128
    python -m bench.bench_data --images 1024 --workers 2   # also the full DataLoader with 2 worker processes
    run(cfg) is the `python -m bench` suite entry (add "data": ["bench_data"] to bench/__main__.py SUITES)

Providers, run interleaved in the same process on the same generated ImageNet-sized JPEGs:
- `plain_pil`: the plain loop: Image.open -> convert RGB -> crop -> resize (bilinear) -> uint8 array, then
  stacked into a [B, C, H, W] batch (torchvision's RandomResizedCrop on PIL, minus the float conversion).
- `official_float`: the plain loop plus the official ToTensor + Normalize on the CPU (float32 batch).
- `fastjepa`: fastjepa.data's worker path, exactly what a DataLoader worker runs: per-sample seeded draws, JPEG
  decode (simplejpeg when installed, DCT-scaled where the crop allows it), torch's uint8 antialiased resize of
  the crop view, channels-last uint8 batch, multi-block masks.
- `fastjepa_pil_decode` (when simplejpeg is installed): the same with PIL decoding, what you get without it.
- `nvjpeg_gpu` (when torchvision and CUDA are importable): torchvision.io.decode_jpeg on the GPU + crop/resize
  with F.interpolate(antialias=True) per image.
Reported: images per CPU-second of the worker process (the per-core rate: cores per GPU x this = the input rate one
GPU can get; unlike wall time it holds on a shared machine), the ratio to plain_pil, and wall images/s.
"""

import argparse
import csv
import datetime
import io
import os
import resource
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastjepa.data import transforms
from fastjepa.data.loader import PretrainLoader
from fastjepa.data.sources import RandomAccessSource, RawSample, synthetic_jpeg
from fastjepa.data.transforms import DEFAULT_RATIO, PretrainTransform, random_resized_crop_params
from fastjepa.masks import MultiBlockMaskCollator
from fastjepa.spec import ModelSpec

from .common import RESULTS, device_dir, git_commit

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PoolSource(RandomAccessSource):
    """`n` samples cycling over a pool of encoded JPEGs (decode work is per sample, as with real data)."""

    def __init__(self, pool, n):
        self.pool, self.num_samples = pool, n

    def get(self, index):
        return RawSample(str(index), self.pool[index % len(self.pool)], index % 1000, "bench")


def plain_batches(pool, n, batch, crop, scale, official_float=False):
    rng = np.random.default_rng(0)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    for start in range(0, n, batch):
        images = []
        for i in range(start, start + batch):
            img = Image.open(io.BytesIO(pool[i % len(pool)])).convert("RGB")
            left, top, w, h = random_resized_crop_params(img.size[0], img.size[1], scale, DEFAULT_RATIO, rng)
            arr = np.asarray(img.crop((left, top, left + w, top + h)).resize((crop, crop), Image.BILINEAR))
            t = torch.from_numpy(arr).permute(2, 0, 1)
            images.append((t.float().div(255) - mean) / std if official_float else t)
        torch.stack(images)


def without_simplejpeg(fn):
    """Run fn with fastjepa's transforms falling back to PIL decoding (what a machine without simplejpeg gets)."""
    saved, transforms.simplejpeg = transforms.simplejpeg, None
    try:
        fn()
    finally:
        transforms.simplejpeg = saved


def nvjpeg_batches(pool, n, batch, crop, scale):
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    rng = np.random.default_rng(0)
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in pool]
    for start in range(0, n, batch):
        decoded = decode_jpeg([encoded[i % len(pool)] for i in range(start, start + batch)], device="cuda")
        crops = []
        for img in decoded:
            left, top, w, h = random_resized_crop_params(img.shape[2], img.shape[1], scale, DEFAULT_RATIO, rng)
            crops.append(F.interpolate(img[None, :, top:top + h, left:left + w].float(), size=(crop, crop),
                                       mode="bilinear", antialias=True, align_corners=False))
        torch.cat(crops).round_().clamp_(0, 255).to(torch.uint8)
    torch.cuda.synchronize()


def fastjepa_loader(pool, n, batch, crop, scale, num_workers=0):
    # the official mask recipe (ModelSpec's defaults) on crop x crop images in 16-pixel patches
    collator = MultiBlockMaskCollator.from_spec(ModelSpec("vit_base", crop, 16, 3, 384, 6))
    return PretrainLoader(PoolSource(pool, n), PretrainTransform(crop_size=crop, crop_scale=scale), collator, batch,
                          num_workers=num_workers, shuffle_buffer=0, max_bad_fraction=0.0)


def consume(loader):
    for _ in loader:
        pass


def nvjpeg_available():
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def timed(fn, n):
    """-> (images per CPU-second of this process and its finished children, images per wall second). CPU time
    is the per-core figure: it does not drop when other jobs share the cores, wall time does."""
    cpu0, child0, wall0 = time.process_time(), _children_cpu(), time.perf_counter()
    fn()
    cpu = time.process_time() - cpu0 + _children_cpu() - child0
    return n / cpu, n / (time.perf_counter() - wall0)


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(pool, n, batch, crop, scale, repeats=3, workers=0):
    """-> [(provider, images per CPU-second, images per wall second)], providers run interleaved."""
    torch.set_num_threads(1)  # one worker process = one core
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # plain loop: read-only
    providers = {
        "plain_pil": lambda: plain_batches(pool, n, batch, crop, scale),
        "official_float": lambda: plain_batches(pool, n, batch, crop, scale, official_float=True),
        "fastjepa": lambda: consume(fastjepa_loader(pool, n, batch, crop, scale)),
    }
    if transforms.simplejpeg is not None:
        providers["fastjepa_pil_decode"] = lambda: without_simplejpeg(
            lambda: consume(fastjepa_loader(pool, n, batch, crop, scale)))
    if nvjpeg_available():
        providers["nvjpeg_gpu"] = lambda: nvjpeg_batches(pool, n, batch, crop, scale)
    else:
        print("nvjpeg_gpu: skipped (needs torchvision and CUDA)")
    for fn in providers.values():  # warm-up: imports, allocator, page cache
        fn()
    rates = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            rates[name].append(timed(fn, n))
    rows = [(name, statistics.median(c for c, _ in r), statistics.median(w for _, w in r)) for name, r in rates.items()]
    if workers:
        loader = fastjepa_loader(pool, n * workers, batch, crop, scale, num_workers=workers)

        def epoch(e):
            loader.set_epoch(e)
            consume(loader)

        epoch(0)
        runs = [timed(lambda e=e: epoch(e), n * workers) for e in range(1, repeats + 1)]
        # CPU time of the main process + its workers (reaped at the end of each epoch), per worker wall rate
        rows.append((f"fastjepa_dataloader_{workers}workers", statistics.median(c for c, _ in runs),
                     statistics.median(w for _, w in runs) / workers))
    return rows


def run(cfg):
    """`python -m bench` suite entry: rows in bench.common's CSV columns (median = ms of CPU per image)."""
    from .common import device_name, triton_version

    n, batch = (128, 64) if cfg.quick else (512, 128)
    pool = [synthetic_jpeg(np.random.default_rng(i), (500, 375), 90) for i in range(8 if cfg.quick else 32)]
    rows = measure(pool, n, batch, 224, (0.3, 1.0), repeats=1 if cfg.quick else 3)
    plain = dict((r[0], r[1]) for r in rows)["plain_pil"]
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info = {"op": "data_pipeline", "mode": "decode+rrc+collate", "shape": f"500x375q90->224 b{batch}",
            "dtype": "uint8", "p20": "", "p80": "", "unit": "ms_cpu/img", "gbps": 0, "frac_of_copy": 0,
            "device": device_name("cpu"), "torch": torch.__version__, "triton": triton_version(),
            "commit": git_commit(), "date": date}
    return [{**info, "provider": name, "median": round(1e3 / cpu, 4), "speedup_vs_reference": round(cpu / plain, 3)}
            for name, cpu, _ in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512, help="images per timed run of each provider")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per provider; the median is reported")
    p.add_argument("--size", default="500x375", help="generated JPEG width x height")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--pool", type=int, default=32, help="distinct generated JPEGs")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--crop-scale", default="0.3,1.0")
    p.add_argument("--workers", type=int, default=0, help="also time the DataLoader with this many worker "
                                                          "processes (total and per-worker images/s)")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<device>/)")
    args = p.parse_args(argv)
    width, height = map(int, args.size.split("x"))
    scale = tuple(float(v) for v in args.crop_scale.split(","))
    rng = np.random.default_rng(0)
    pool = [synthetic_jpeg(rng, (width, height), args.quality) for _ in range(args.pool)]
    n = args.images // args.batch * args.batch
    if n == 0:
        p.error(f"--images {args.images} is smaller than --batch {args.batch}")
    print(f"{len(pool)} JPEGs {width}x{height} q{args.quality} (mean {np.mean([len(d) for d in pool]) / 1e3:.0f} kB), "
          f"crop {args.crop} scale {scale}, batch {args.batch}, {n} images per run, {args.repeats} runs; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = measure(pool, n, args.batch, args.crop, scale, args.repeats, args.workers)
    plain = dict((r[0], r[1]) for r in rows)["plain_pil"]
    print(f"\n{'provider':34s} {'images per CPU-second':>22s} {'vs plain_pil':>13s} {'images/s wall':>14s}")
    for name, cpu, wall in rows:
        print(f"{name:34s} {cpu:22.0f} {cpu / plain:12.2f}x {wall:14.0f}")
    write_rows(rows, plain, args)


def write_rows(rows, plain, args):
    out = Path(args.out) if args.out else RESULTS / device_dir("cpu")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "data.csv"
    new = not path.exists()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["provider", "images_per_cpu_s", "vs_plain_pil", "images_per_wall_s", "jpeg", "crop", "batch",
                        "cores", "load", "commit", "date"])
        for name, cpu, wall in rows:
            w.writerow([name, round(cpu), round(cpu / plain, 3), round(wall), f"{args.size}q{args.quality}", args.crop,
                        args.batch, os.cpu_count(), round(os.getloadavg()[0], 1), git_commit(), date])
    print(f"-> {path}")


if __name__ == "__main__":
    main()
