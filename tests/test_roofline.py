"""The step's roofline (bench/roofline.py): one block's FLOPs and bytes against hand-computed counts, the whole
step's FLOPs against the one FLOP model, and the report beside measured categories."""

import pytest

from bench.bench_step import SETUPS, step_flops
from bench.roofline import block_ops, floors, report, step_ops


def by_name(ops):
    return {op.name: op for op in ops}


def test_one_block_forward_counts_by_hand():
    # 2 sequences of 5 tokens, width 8, MLP 32: 10 tokens; bf16 activations and weights (2 bytes)
    ops = by_name(block_ops("b", rows=2, tokens=5, dim=8, hidden=32, count=1, grad=False))
    assert set(ops) == {"b norm1", "b qkv", "b attention", "b proj", "b residual1", "b norm2", "b fc1", "b gelu",
                        "b fc2", "b residual2"}
    want = {  # name: (FLOPs, bytes)
        "b norm1": (0, 10 * 8 * 2 * 2),
        "b qkv": (2 * 10 * 8 * 24, (10 * 8 + 8 * 24 + 10 * 24) * 2),
        "b attention": (4 * (2 * 5 * 5) * 8, (2 * 10 + 2 * 10) * 8 * 2),  # q, k, v read, out written; no scores
        "b proj": (2 * 10 * 8 * 8, (10 * 8 + 8 * 8 + 10 * 8) * 2),
        "b residual1": (0, 3 * 10 * 8 * 2),
        "b norm2": (0, 10 * 8 * 2 * 2),
        "b fc1": (2 * 10 * 8 * 32, (10 * 8 + 8 * 32 + 10 * 32) * 2),
        "b gelu": (0, 2 * 10 * 32 * 2),
        "b fc2": (2 * 10 * 32 * 8, (10 * 32 + 32 * 8 + 10 * 8) * 2),
        "b residual2": (0, 3 * 10 * 8 * 2),
    }
    for name, (flops, nbytes) in want.items():
        assert (ops[name].flops, ops[name].bytes) == (flops, nbytes), name


def test_one_block_backward_adds_dgrad_wgrad_and_twice_the_attention():
    fwd = block_ops("b", 2, 5, 8, 32, 1, grad=False)
    both = by_name(block_ops("b", 2, 5, 8, 32, 1, grad=True))
    assert sum(op.flops for op in both.values()) == 3 * sum(op.flops for op in fwd)
    assert both["b fc1 wgrad"].bytes == (10 * 8 + 10 * 32) * 2 + 8 * 32 * 4  # fp32 weight gradient
    assert both["b fc1 dgrad"].bytes == (10 * 32 + 8 * 32 + 10 * 8) * 2
    assert both["b gelu backward"].bytes == 3 * 10 * 32 * 2


def test_the_step_flops_are_the_flop_model_s():
    s = SETUPS["vit_huge_14"]
    ops = step_ops(s, 128, 70, 44)
    assert sum(op.flops * op.count for op in ops) == pytest.approx(sum(step_flops(s, 128, 70, 44, "repeat").values()),
                                                                   rel=1e-12)


def test_floors_take_the_slower_ceiling_and_the_report_sets_them_beside_the_measured():
    ops = step_ops(SETUPS["quick"], 4, 10, 4)
    cats = floors(ops, 1.0, 1.0)
    assert set(cats) == {"GEMM", "attention", "elementwise/norm", "fastjepa kernels", "optimizer", "EMA"}
    assert cats["GEMM"] == pytest.approx(sum(op.count * max(op.flops, op.bytes) for op in ops
                                             if op.category == "GEMM") / 1e12 * 1e3)
    lines = report(SETUPS["vit_huge_14"], 128, measured={"GEMM": 119.0, "attention": 27.0, "other": 1.0})
    gemm = next(ln for ln in lines if ln.startswith("| GEMM |")).split("|")
    assert float(gemm[3]) == 119.0 and float(gemm[4].strip().rstrip("x")) == pytest.approx(119.0 / float(gemm[2]),
                                                                                            abs=0.01)
    assert "| other | 0.00 | 1.00 | - |" in lines
