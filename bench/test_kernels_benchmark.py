"""The kernel suite under pytest-benchmark: ``pytest bench/test_kernels_benchmark.py --benchmark-only``
(``--benchmark-autosave`` / ``--benchmark-compare`` keep and compare JSON histories; ``FASTJEPA_BENCH_FULL=1``
for the ViT-H/ViT-B shapes, tiny shapes otherwise).

pytest-benchmark times with the host clock, so each GPU call is followed by a synchronize; the CUDA-event median
from ``triton.testing.do_bench`` and the GB/s against the copy roof go into ``extra_info`` of every result.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton provider runs through the interpreter without a GPU; it must be on before kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .__main__ import SUITES, suite_module  # noqa: E402
from .common import BenchConfig, copy_bandwidth, time_fn  # noqa: E402

pytest.importorskip("pytest_benchmark")

CFG = BenchConfig(quick=os.environ.get("FASTJEPA_BENCH_FULL", "0") != "1",
                  compile_backend="inductor" if torch.cuda.is_available() else "aot_eager")
CASES = [case for name in SUITES["kernels"] for case in suite_module(name).cases(CFG)]
PARAMS = [
    pytest.param(case, provider, mode, id=f"{case.op}-{case.shape.split()[0]}-{provider}-{mode}")
    for case in CASES for provider, modes in case.providers.items() for mode in modes
]


@pytest.mark.parametrize("case,provider,mode", PARAMS)
def test_kernel(benchmark, case, provider, mode):
    fn = case.providers[provider][mode]
    on_gpu = CFG.device.startswith("cuda")

    def call():
        fn()
        if on_gpu:
            torch.cuda.synchronize()

    med, p20, p80 = time_fn(fn, CFG.device, CFG.quick)
    gbps = case.bytes_moved.get(mode, 0) / med / 1e6
    benchmark.group = f"{case.op} {case.shape} {mode}"
    benchmark.extra_info.update({"median_ms": med, "p20_ms": p20, "p80_ms": p80, "gbps": gbps,
                                 "frac_of_copy": gbps / copy_bandwidth(CFG.device, CFG.quick)})
    benchmark.pedantic(call, rounds=3 if CFG.quick else 20, warmup_rounds=1)
