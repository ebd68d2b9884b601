"""The default (``auto``) kernel choice on a GPU is the measured table, and the table is what the H200 measured:
a Triton kernel is the default for an op and size only where it beat every other implementation timed there
(bench/results/nvidia-h200/kernels.md)."""

from pathlib import Path

import pytest
import torch

from fastjepa.kernels import MEASURED_WINNERS, kernel_backend
from fastjepa.kernels._utils import measured_winner, use_triton

KERNELS_MD = Path(__file__).resolve().parents[2] / "bench/results/nvidia-h200/kernels.md"
# the mode each op is judged by: what a training step runs
MODE = {"masked_gather": "fwd+bwd", "predictor_tokens": "fwd+bwd", "target_norm_gather": "fwd",
        "target_norm_smooth_l1": "fwd+bwd", "ema": "update+copy"}
# implementations a step could use instead (a flat parameter buffer is not one: parameters live apart)
ALTERNATIVES = {"reference": "reference", "compile": "compile", "foreach_lerp": "foreach"}


def measured() -> dict[tuple[str, str], dict[str, float]]:
    """(op, model) -> {provider: median ms} in each op's judged mode."""
    table = {}
    for line in KERNELS_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] in MODE and cells[3] == MODE[cells[0]]:
            table.setdefault((cells[0], cells[1].split()[0]), {})[cells[4]] = float(cells[5].split()[0])
    return table


def size_of(op: str, model: str) -> int:
    """The table's size for a measured shape: the op's main input elements (the EMA: parameters)."""
    return {("ema", "vit_h14"): 630_800_000, ("ema", "vit_b16"): 85_800_000,
            ("predictor_tokens", "vit_h14"): 128 * 70 * 384, ("predictor_tokens", "vit_b16"): 128 * 60 * 384,
            }.get((op, model), 128 * 256 * 1280 if model == "vit_h14" else 128 * 196 * 768)


def test_every_winner_is_the_fastest_implementation_measured_at_that_size():
    table = measured()
    assert {op for op, _ in table} == set(MEASURED_WINNERS) == set(MODE)
    for (op, model), times in table.items():
        size = size_of(op, model)
        assert size in [s for s, _ in MEASURED_WINNERS[op]], (op, model)
        fastest = min(times, key=times.get)
        if fastest == "triton":
            assert measured_winner(op, size) == "triton", (op, model, times)
        else:
            # the kernel lost to some implementation: never the default; the fastest usable alternative is
            best = min((p for p in times if p in ALTERNATIVES), key=times.get)
            assert measured_winner(op, size) == ALTERNATIVES[best] or (
                best == "compile" and measured_winner(op, size) == "reference"), (op, model, times)
            assert measured_winner(op, size) != "triton", (op, model, times)


def test_the_nearest_measured_size_decides():
    vit_b, vit_h = 128 * 196 * 768, 128 * 256 * 1280
    assert measured_winner("target_norm_smooth_l1", vit_b // 4) == "reference"
    assert measured_winner("target_norm_smooth_l1", vit_h * 4) == "triton"
    assert measured_winner("target_norm_smooth_l1", int((vit_b * vit_h) ** 0.5) + 10**5) == "triton"
    assert measured_winner("ema", 300_000_000) == "triton" and measured_winner("ema", 5_000_000) == "foreach"


@pytest.mark.parametrize("backend,want", [("auto", True), ("triton", True), ("reference", False)])
def test_on_the_cpu_the_interpreter_runs_triton_unless_the_reference_is_asked_for(backend, want):
    """``auto`` consults the table on CUDA tensors only: under the interpreter every kernel runs (how they are
    tested), whatever the table says of the op on a GPU."""
    x = torch.zeros(2, 3)
    with kernel_backend(backend):
        assert use_triton(x, op="masked_gather", size=x.numel()) is want
