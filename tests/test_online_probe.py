"""The online k-NN probe (the ``eval`` section): run on the target encoder every N epochs and at the end of
training, logged to metrics.jsonl (``kind: eval``) and TensorBoard (``eval/knn_top1``); bad evaluation data
refused before the model is built. Through the demo config, with its curves.png panel: tests/test_demo.py."""

import pytest
from test_eval import colour_images
from test_train import tiny_cfg

from fastjepa import train as fj_train
from fastjepa.metrics import MetricsSink, read_jsonl

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def image_folder(root, n: int, seed: int) -> str:
    for label, i, data in colour_images(n, seed=seed):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        (root / f"class{label}" / f"{i}.jpg").write_bytes(data)
    return str(root)


def test_the_online_probe_runs_every_epoch_and_at_the_end_on_an_image_folder(tmp_path):
    train, val = image_folder(tmp_path / "train", 12, 1), image_folder(tmp_path / "val", 5, 2)
    cfg = tiny_cfg(tmp_path / "run", "optimization.epochs=2", "train.max_steps=12", "eval.every_epochs=1",
                   "eval.data=imagefolder",
                   f"eval.train={train}", f"eval.val={val}", "eval.knn_k=5")
    fj_train.run(cfg)  # 8 steps per epoch: an evaluation at step 8 (epoch end) and at step 12 (the end)
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [8, 12], evals
    assert all(0.0 <= r["knn_top1"] <= 1.0 and r["eval_seconds"] > 0 for r in evals)
    # the colour classes are easy: the features of even a barely trained encoder separate them
    assert evals[-1]["knn_top1"] >= 0.6, evals


def test_eval_records_reach_tensorboard_under_their_own_tag(tmp_path):
    scalars = []

    class Writer:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

    sink = MetricsSink(tmp_path, 10, 0, progress=False, tensorboard=False)
    sink.tb = Writer()
    sink.log({"step": 4, "kind": "eval", "epoch": 0, "knn_top1": 0.75, "eval_seconds": 1.5})
    sink.log({"step": 4, "kind": "data", "bad": 2})
    assert ("eval/knn_top1", 0.75, 4) in scalars and ("data/bad", 2, 4) in scalars


def test_missing_evaluation_data_is_refused_before_the_model_is_built(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "eval.every_epochs=1", "eval.data=imagefolder", f"eval.train={tmp_path}/nope",
                   f"eval.val={tmp_path}/nope")
    with pytest.raises(fj_train.SetupError, match="nope"):
        fj_train.run(cfg)
    assert not (tmp_path / "run").exists()
