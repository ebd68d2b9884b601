"""fastjepa.metrics: the metrics file stays valid JSON and readable after a kill, records hold what one log step
accumulated, and the console line shows what matters."""

import json

import pytest
import torch

from fastjepa.metrics import MetricsSink, StepAccumulator, console_line, read_jsonl


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 0.4}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1: not a JSON record"):
        read_jsonl(path)


def test_a_resumed_runs_records_replace_the_killed_runs_and_non_finite_values_are_null(tmp_path):
    sink = MetricsSink(tmp_path, 10, progress=False, tensorboard=False)
    for step, loss in ((1, 0.5), (2, float("nan")), (2, 0.4), (3, float("inf"))):
        sink.log({"step": step, "loss": loss, "lr": 1e-3, "img_per_s": 10.0, "grad_norm": 1.0, "peak_mem_mb": 1.0})
    sink.log({"step": 2, "kind": "eval", "knn_top1": 0.9})
    sink.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and "NaN" not in lines[1] and "Infinity" not in lines[3]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("kind", "train"), r.get("loss")) for r in records] == [
        (1, "train", 0.5), (2, "eval", None), (2, "train", 0.4), (3, "train", None)]


def test_a_disabled_sink_writes_nothing(tmp_path):
    sink = MetricsSink(tmp_path / "rank1", 10, enabled=False)
    sink.log({"step": 1, "loss": 0.5})
    sink.message("not shown")
    sink.close()
    assert not (tmp_path / "rank1").exists()


def test_the_accumulator_keeps_one_log_steps_scalars_on_the_device():
    window = StepAccumulator()
    for step in range(3):
        window.add(torch.tensor(float(step)), torch.tensor(2.0), torch.tensor(step == 1), images=8, flops=1e9,
                   data_seconds=0.01)
    assert window.steps == 3 and window.images == 24 and window.flops == 3e9
    assert torch.stack(window.losses).tolist() == [0.0, 1.0, 2.0] and int(torch.stack(window.bad).sum()) == 1
    window.reset()
    assert window.steps == 0 and window.losses == []


def test_the_console_line_shows_loss_rate_throughput_and_what_went_wrong():
    record = {"loss": 0.123456, "lr": 1e-3, "grad_norm": None, "img_per_s": 812.4, "mfu": 0.41,
              "peak_mem_mb": 2048.0, "skipped_steps": 2, "eta_s": 3725}
    assert console_line(record) == "loss 0.1235 lr 1.00e-03 grad nan 812 img/s mfu 41.0% mem 2.0G skipped 2 eta 1:02:05"
    assert console_line(record, short=True) == "loss 0.1235 lr 1.00e-03 grad nan 812 img/s mfu 41.0% skipped 2"
