"""The profile's split by category on a recorded table: the top kernels of one ViT-H/14 step on an H200
(tests/data/h200_profile_top_kernels.csv, from bench/results/nvidia-h200/profile.md), where the first version of
the split filed cuBLAS's ``nvjet_*`` GEMMs under "other" and summed the ``Optimizer.step#AdamW.step`` annotation
range beside the optimizer kernels it contains."""

import csv
import re
from pathlib import Path

import pytest

from bench.profile_step import category, table

RECORDED = Path(__file__).parent / "data" / "h200_profile_top_kernels.csv"


def recorded_rows():
    with RECORDED.open() as f:
        return [(r["name"], float(r["self_device_us"]), int(r["calls"]), False) for r in csv.DictReader(f)]


@pytest.mark.parametrize("name,want", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT", "GEMM"),
    ("fmha_cutlassB_bf16_aligned_128x128_k128_sm80(PyTorchMemEffAttention::AttentionBackwardKern", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1", "attention"),
    ("triton_poi_fused_gelu_gelu_backward_view_0", "elementwise/norm"),
    ("triton_red_fused__to_copy_add_native_layer_norm_view_1", "elementwise/norm"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous n", "optimizer"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
])
def test_kernels_land_in_their_category(name, want):
    assert category(name) == want


def test_the_recorded_h200_step_splits_into_gemm_attention_glue_and_optimizer():
    rows = recorded_rows()
    lines = table(rows, "recorded")
    split = {m.group(1): float(m.group(2)) for m in (re.match(r"\| ([^|`]+) \| ([\d.]+) \| [\d.]+% \|$", ln)
                                                   for ln in lines) if m}
    nvjet_ms = sum(us for name, us, _, _ in rows if name.startswith("nvjet")) / 1e3
    annotation_ms = sum(us for name, us, _, _ in rows if "#" in name) / 1e3
    assert annotation_ms == pytest.approx(5.42)  # the recorded Optimizer.step#AdamW.step range
    assert "other" not in split, split
    assert split["GEMM"] == pytest.approx(nvjet_ms, abs=0.01) and nvjet_ms == pytest.approx(98.52)
    assert split["optimizer"] == pytest.approx(5.30)  # the multi_tensor_apply kernels alone, not the range too
    total = float(next(ln for ln in lines if ln.startswith("total ")).split()[1])
    assert total == pytest.approx(sum(us for _, us, _, _ in rows) / 1e3 - annotation_ms, abs=0.05)
    assert not any("Optimizer.step#" in ln for ln in lines)


def test_a_flagged_user_annotation_is_left_out_whatever_its_name():
    lines = table([("my_region", 9000.0, 1, True), ("nvjet_sm90_x", 1000.0, 1, False)], "flagged")
    assert "total 1.0 ms" in lines and not any("my_region" in ln for ln in lines)
