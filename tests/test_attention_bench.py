"""bench/bench_attention.py --quick: every provider runs and is timed, reference first."""

import torch

from bench import bench_attention
from bench.common import BenchConfig


def test_quick_attention_bench_rows(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = bench_attention.run(BenchConfig(device="cpu", quick=True, out_dir=tmp_path))
    finally:
        torch.set_num_threads(threads)
    by_op = {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(r)
        assert r["median"] > 0 and r["mode"] in ("fwd", "fwd+bwd")
    providers = [r["provider"] for r in by_op["vit_attention"] if r["mode"] == "fwd"]
    assert providers[0] == "reference" and {"sdpa", "sdpa_math"} <= set(providers)
    shared = [r["provider"] for r in by_op["predictor_attention"] if r["mode"] == "fwd"]
    assert shared[0] == "reference" and "shared_reference" in shared
    assert all(r["speedup_vs_reference"] != "" for r in rows)
