"""Shared benchmark machinery: timing, the copy-bandwidth roof, result rows and their CSV / markdown / PNG files.

A benchmark script builds ``Case`` objects (an op at one shape, with ideal bytes per mode and one callable per
provider and mode) and hands them to ``run_cases``; ``write_results`` appends the rows to
``bench/results/<device>/<suite>.csv`` and rewrites ``<suite>.md`` and one PNG per op from this run's rows.
"""

import csv
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Results live next to the suite in a source checkout (bench/results/<device>/, committed for GPU runs); an
# installed suite writes to ./bench_results/<device>/ instead of its site-packages folder.
_HERE = Path(__file__).resolve().parent
RESULTS = _HERE / "results" if (_HERE.parent / "setup.py").is_file() else Path.cwd() / "bench_results"
CSV_COLUMNS = [
    "op", "provider", "mode", "shape", "dtype", "median", "p20", "p80", "unit", "gbps", "frac_of_copy",
    "speedup_vs_reference", "device", "torch", "triton", "commit", "date", "graph_ms", "host_ms",
]


@dataclass
class BenchConfig:
    """What one invocation of a suite runs: ``quick`` = tiny shapes for smoke tests."""

    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    quick: bool = False
    compile_backend: str = "inductor"
    out_dir: Path | None = None
    ops: list[str] = field(default_factory=list)


@dataclass
class Case:
    """One op at one shape. ``providers[name][mode]`` is a no-argument callable that does the work once;
    ``bytes_moved[mode]`` the ideal DRAM traffic of that work (what a perfect kernel reads and writes)."""

    op: str
    shape: str
    dtype: torch.dtype
    bytes_moved: dict[str, int]
    providers: dict[str, dict[str, Callable[[], object]]]


def random_masks(num_masks: int, batch: int, num_tokens: int, k: int, generator=None, device="cpu") -> torch.Tensor:
    """``[M, B, K]`` int64 indices, distinct and sorted within each row (like the multi-block collator's)."""
    rand = torch.rand(num_masks * batch, num_tokens, generator=generator)
    return rand.argsort(1)[:, :k].sort(1).values.reshape(num_masks, batch, k).to(device)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def device_dir(device: str) -> str:
    """Folder name for a device: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``; CPUs -> ``cpu-<arch>``."""
    name = device_name(device) if device.startswith("cuda") else f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    """The checkout's short hash, with ``-dirty`` when the working tree has uncommitted changes."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "-"


def time_fn(fn: Callable[[], object], device: str, quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn``. GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed
    between runs, warm-up excluded). CPU: wall clock after one warm-up call (smoke tests only)."""
    if device.startswith("cuda"):
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100,
                                                quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    fn()
    times = []
    for _ in range(2 if quick else 10):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[3]


def graph_time(fn: Callable[[], object], device: str, quick: bool = False) -> float | None:
    """Median ms of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``): the device's work
    alone, without Python, argument checks and launch gaps (and without an L2 flush between replays). ``time_fn``
    minus this is the per-call host overhead, which at small sizes can be most of a call. None on CPU or where
    ``fn`` cannot be captured (a host synchronisation inside)."""
    if not device.startswith("cuda"):
        return None
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=5 if quick else 20, return_mode="median")
    except Exception as e:  # noqa: BLE001 -- capture refused: the call has host work the device waits for
        print(f"  (no CUDA-graph time: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", flush=True)
        return None


_COPY_GBPS: dict[str, float] = {}


def copy_bandwidth(device: str, quick: bool = False) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + written per second): the roof that
    memory-bound ops are reported against."""
    if device not in _COPY_GBPS:
        n = (16 if quick else 512) * 2**20 if device.startswith("cuda") else (4 if quick else 64) * 2**20
        src = torch.randn(n // 4, device=device)
        dst = torch.empty_like(src)
        ms, _, _ = time_fn(lambda: dst.copy_(src), device, quick)
        _COPY_GBPS[device] = 2 * n / ms / 1e6
    return _COPY_GBPS[device]


def grad_fn(make_out: Callable[[], torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor | None = None):
    """Callables for the backward alone (graph built once, kept) and forward + backward of ``make_out``."""
    out = make_out()
    grad = torch.randn_like(out) if grad is None else grad

    def bwd():
        return torch.autograd.grad(out, inputs, grad, retain_graph=True)

    def fwd_bwd():
        return torch.autograd.grad(make_out(), inputs, grad)

    return bwd, fwd_bwd


def run_cases(cases: list[Case], cfg: BenchConfig) -> list[dict]:
    """Time every provider and mode of every case; rows carry GB/s, the fraction of the copy roof and the
    speedup over the ``reference`` provider of the same mode."""
    roof = copy_bandwidth(cfg.device, cfg.quick)
    info = {
        "device": device_name(cfg.device), "torch": torch.__version__, "triton": triton_version(),
        "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    rows = []
    for case in cases:
        ref_ms = {}
        for provider, modes in case.providers.items():
            for mode, fn in modes.items():
                med, p20, p80 = time_fn(fn, cfg.device, cfg.quick)
                graph = graph_time(fn, cfg.device, cfg.quick)
                if provider == "reference":
                    ref_ms[mode] = med
                gbps = case.bytes_moved.get(mode, 0) / med / 1e6
                rows.append({
                    "op": case.op, "provider": provider, "mode": mode, "shape": case.shape,
                    "dtype": str(case.dtype).replace("torch.", ""), "median": round(med, 5), "p20": round(p20, 5),
                    "p80": round(p80, 5), "unit": "ms", "gbps": float(f"{gbps:.4g}"),
                    "frac_of_copy": float(f"{gbps / roof:.4g}"),
                    "speedup_vs_reference": round(ref_ms[mode] / med, 3) if mode in ref_ms else "",
                    **info,
                    "graph_ms": "" if graph is None else round(graph, 5),
                    "host_ms": "" if graph is None else round(max(med - graph, 0.0), 5),
                })
                print(f"{case.op:24s} {case.shape:34s} {provider:22s} {mode:16s} {med:10.4f} ms {gbps:9.1f} GB/s "
                      f"({gbps / roof:6.1%} of copy {roof:.3g} GB/s)", flush=True)
    return rows


def write_results(rows: list[dict], suite: str, cfg: BenchConfig) -> Path:
    """Append to ``<suite>.csv``; rewrite ``<suite>.md`` and ``<suite>_<op>.png`` from this run's rows."""
    out = Path(cfg.out_dir) if cfg.out_dir else RESULTS / device_dir(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{suite}.csv"
    new_file = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    (out / f"{suite}.md").write_text(markdown_table(rows, cfg))
    from .plots import bar_chart

    for op in dict.fromkeys(r["op"] for r in rows):
        bar_chart([r for r in rows if r["op"] == op], out / f"{suite}_{op}.png")
    return out


def markdown_table(rows: list[dict], cfg: BenchConfig) -> str:
    head = rows[0] if rows else {}
    lines = [
        f"# Benchmarks on {head.get('device', '?')}",
        "",
        f"torch {head.get('torch', '?')}, triton {head.get('triton', '?')}, commit {head.get('commit', '?')}, "
        f"{head.get('date', '?')}; copy roof {copy_bandwidth(cfg.device, cfg.quick):.3g} GB/s"
        + (" (CPU smoke run: timings are not claims)" if not cfg.device.startswith("cuda") else ""),
        "",
        "Per call: `median ms` as a training step calls the op (CUDA events around each call, L2 flushed); "
        "`graph ms` the same work replayed from a CUDA graph (the device time alone); `host ms` their difference, "
        "the Python, checks and launch latency the device waits for. GB/s and % of copy are from the median.",
        "",
        "| op | shape | dtype | mode | provider | median ms (p20-p80) | graph ms | host ms | GB/s | % of copy "
        "| vs reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
            f"{r['median']:.4f} ({_num(r['p20'])}-{_num(r['p80'])}) | {_num(r.get('graph_ms', ''))} | "
            f"{_num(r.get('host_ms', ''))} | {r['gbps']:.3g} | "
            f"{100 * r['frac_of_copy']:.1f} | "
            f"{r['speedup_vs_reference']}{'x' if r['speedup_vs_reference'] != '' else ''} |"
        )
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    """A percentile cell: suites that report only a median leave p20/p80 empty."""
    return "-" if value == "" else f"{value:.4f}"


def compiled(fn: Callable, cfg: BenchConfig) -> Callable:
    """``torch.compile`` of a reference (dynamic=False: shapes are fixed per case)."""
    return torch.compile(fn, backend=cfg.compile_backend, dynamic=False)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_available(cfg: BenchConfig) -> bool:
    """Triton is installed and runs: on a GPU, or on CPU through the interpreter (smoke runs only). Without it the
    Triton providers are skipped, with one line saying why."""
    from fastjepa.kernels._utils import HAVE_TRITON, TRITON_HINT

    if not HAVE_TRITON:
        if not _TRITON_HINT_SHOWN:
            print(f"triton providers skipped: triton is not installed ({TRITON_HINT})", file=sys.stderr, flush=True)
            _TRITON_HINT_SHOWN.append(True)
        return False
    return cfg.device.startswith("cuda") or interpreter_on()


_TRITON_HINT_SHOWN = []
