"""Helper of the multi-process tests: a worker script of tests/ under torchrun on 2 CPU processes (gloo)."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def torchrun(worker: str, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """Run ``tests/<worker>`` under torchrun; fails with both processes' output tails unless every rank exits 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(TESTS / worker), *args]
    proc = subprocess.run(cmd, cwd=TESTS.parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc
