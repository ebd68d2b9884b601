"""bench/bench_step.py: the FLOP model against the design numbers, and the --quick CPU smoke run end to end."""

import csv

import pytest
import torch

from bench import bench_step


def test_flops_match_the_vith14_cost_model():
    # the cost model (bench/roofline.py): ViT-H/14 at 224 px, ~70 context and 4 x 44 target tokens:
    # ~333 / 264 / 61 GFLOP per image.
    f = bench_step.step_flops(bench_step.SETUPS["vit_huge_14"], 1, 70, 44, "official")
    assert f["target"] / 1e9 == pytest.approx(333, rel=0.02)
    assert f["context"] / 1e9 == pytest.approx(264, rel=0.02)
    assert f["predictor"] / 1e9 == pytest.approx(61, rel=0.05)


def test_cheaper_predictor_layouts_count_fewer_flops():
    s = bench_step.SETUPS["vit_huge_14"]
    full, last, shared = (bench_step.step_flops(s, 8, 70, 44, lay)["predictor"]
                          for lay in ("official", "repeat", "shared"))
    assert shared < last < full
    # The shared layout skips the M-1 repeated context computations of every predictor block, roughly.
    assert shared < 0.75 * full


@pytest.fixture
def one_thread():
    # The smoke model is tiny: threads only add contention on a shared CI box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_run_writes_results_and_providers_agree(tmp_path, one_thread):
    # dynamo traces every compiled block with the 'eager' backend (aot_eager/inductor would add 10+ s on CPU; the
    # block-attention op's AOT tracing is tested in tests/kernels/test_block_attention.py)
    rows = bench_step.main(["--quick", "--compile", "eager", "--out", str(tmp_path)])
    assert [r["provider"] for r in rows] == ["official", "pytorch", "fastjepa"]
    for r in rows:
        phases = sum(r[p + "_ms"] for p in bench_step.PHASES)
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["flops_per_image"] > 0
        assert phases == pytest.approx(r["step_ms"], rel=0.5)  # medians per phase vs median of the sums
        assert r["compile"] == ("off" if r["provider"] == "official" else "eager")
    # Same initial weights, masks and images, fp32: the three providers train the same model.
    losses = [r["loss"] for r in rows]
    assert max(losses) - min(losses) < 1e-3, losses
    with open(tmp_path / "train_step.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    md = (tmp_path / "train_step.md").read_text()
    assert "not claims" in md and md.count("| quick |") == 4  # the headline row and one row per provider
    fast = next(r for r in rows if r["provider"] == "fastjepa")
    ratios = [fast["images_per_s"] / r["images_per_s"] for r in rows[:2]]
    assert "| / official | / pytorch |" in md and f"| {ratios[0]:.2f}x | {ratios[1]:.2f}x |" in md
    assert (tmp_path / "train_step.png").stat().st_size > 0


def test_the_fp8_and_sigreg_providers_report_against_the_default_step(tmp_path, one_thread):
    rows = bench_step.main(["--quick", "--compile", "eager", "--providers", "fastjepa", "fastjepa_fp8",
                            "fastjepa_torchao_fp8", "fastjepa_fp8_all", "fastjepa_sigreg", "--out", str(tmp_path)])
    loss = {r["provider"]: r["loss"] for r in rows}
    for fp8 in ("fastjepa_fp8", "fastjepa_torchao_fp8", "fastjepa_fp8_all"):
        assert loss[fp8] == pytest.approx(loss["fastjepa"], rel=0.05)
        assert loss[fp8] != loss["fastjepa"]
    assert loss["fastjepa_sigreg"] != pytest.approx(loss["fastjepa"], rel=0.01)  # the regulariser is in the loss
    md = (tmp_path / "train_step.md").read_text()
    assert "| FP8 provider | img/s | / bf16 step | target forward ms |" in md and "| with SIGReg img/s |" in md
    assert all(f"| quick | {scope} |" in md for scope in ("fp8=target", "fp8=target, torchao's layers", "fp8=all"))
