"""Run a benchmark suite: ``fastjepa bench --suite kernels [--quick] [--ops ema,...] [--out DIR]`` (also
``fastjepa-bench``, ``python -m fastjepa.bench``, and ``python -m bench`` in a source checkout).

A suite is a list of modules, each with ``run(cfg: BenchConfig) -> list[dict]`` (rows, see bench/common.py).
To add a suite, add an entry to ``SUITES``; ``all`` runs every suite.
"""

import argparse
import importlib
import os
import sys

import torch

SUITES: dict[str, list[str]] = {
    "kernels": [
        "bench_masked_gather",
        "bench_target_norm_gather",
        "bench_predictor_tokens",
        "bench_ema",
        "bench_block_ops",
        "bench_update",
    ],
    "step": ["bench_step"],
    "attention": ["bench_attention"],
    "data": ["bench_data"],
}


def suite_module(name: str):
    """A suite's module by its name in ``SUITES`` (a module of this package)."""
    return importlib.import_module(f".{name}", __package__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="fastjepa bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="kernels", choices=sorted(SUITES) + ["all"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (smoke test)")
    parser.add_argument("--ops", default="", help="comma-separated module names to keep, e.g. ema,masked_gather")
    parser.add_argument("--out", default=None, help="results folder (default: bench/results/<device>/ in a source "
                                                    "checkout, ./bench_results/<device>/ elsewhere)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compile provider (default: inductor; aot_eager for "
                             "CPU --quick, where inductor's compile time would dominate a smoke run)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and args.quick:
        # Without a GPU, the Triton provider runs through the interpreter (tiny shapes only); it must be on
        # before any kernel is defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .common import BenchConfig, write_results

    cfg = BenchConfig(quick=args.quick, out_dir=args.out,
                      compile_backend=args.compile_backend or ("inductor" if on_gpu or not args.quick else "aot_eager"))
    suites = sorted(SUITES) if args.suite == "all" else [args.suite]
    keep = {s.strip() for s in args.ops.split(",") if s.strip()}
    for suite in suites:
        modules = [m for m in SUITES[suite] if not keep or m.removeprefix("bench_") in keep]
        if not modules:
            print(f"--ops {args.ops!r} matches no module of suite {suite!r}: {SUITES[suite]}", file=sys.stderr)
            return 2
        rows = []
        for name in modules:
            rows += suite_module(name).run(cfg)
        out = write_results(rows, suite, cfg)
        print(f"{suite}: {len(rows)} rows -> {out}/{suite}.csv, {suite}.md, {suite}_<op>.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
