"""Evaluation: RankMe on matrices of known rank, the linear probe on separable and unlearnable data, feature
extraction (pooling, raw pixels), and the probe CLI on a checkpoint and on an exported encoder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastjepa import config
from fastjepa.checkpoint import CheckpointManager
from fastjepa.data.mnist import load_mnist_5k
from fastjepa.eval import extract_features, linear_probe, rankme, tensor_batches
from fastjepa.eval.knn import knn_top1
from fastjepa.eval.linear_probe import resized, to_float_images
from fastjepa.ijepa import build_ijepa
from fastjepa.optim import build_optimizer
from fastjepa.spec import ModelSpec

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
ROOT = Path(__file__).resolve().parents[1]


def with_singular_values(values, n=64, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, len(values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, len(values), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("values, expected", [([1.0] * 16, 16.0), ([3.0] * 5, 5.0), ([2.0], 1.0)])
def test_rankme_of_equal_singular_values_is_their_count(values, expected):
    assert rankme(with_singular_values(values)) == pytest.approx(expected, rel=1e-4)


def test_rankme_decreases_as_the_spectrum_concentrates():
    flat, skewed = with_singular_values([1.0] * 8), with_singular_values([10.0] + [0.1] * 7)
    assert rankme(skewed) < 2.0 < 7.9 < rankme(flat)
    with pytest.raises(ValueError, match=r"\[n>=2, d\]"):
        rankme(torch.zeros(5))


def test_linear_probe_separates_blobs_and_stays_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 20, generator=g) * 3
    y = torch.randint(0, 5, (600,), generator=g)
    x = centers[y] + torch.randn(600, 20, generator=g)
    assert linear_probe(x[:400], y[:400], x[400:], y[400:])["top1"] > 0.97
    noise = torch.randn(600, 20, generator=g)
    assert linear_probe(noise[:400], y[:400], noise[400:], y[400:])["top1"] < 0.35


def test_extract_features_average_pools_tokens_and_flattens_pixels():
    images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(10)

    class Tokens(torch.nn.Module):
        def forward(self, x):  # [B, 1, 4, 4] -> [B, 4 tokens, 4]
            return x.reshape(len(x), 4, 4)

    feats, ys = extract_features(Tokens(), tensor_batches(images, labels, 3), preprocess=lambda x: x.float())
    torch.testing.assert_close(feats, images.float().reshape(10, 4, 4).mean(1))
    assert torch.equal(ys, labels)
    pixels, _ = extract_features(None, tensor_batches(images, labels, 4), preprocess=lambda x: x.float() / 255)
    torch.testing.assert_close(pixels, images.float().flatten(1) / 255)


def test_probe_cli_on_a_checkpoint_and_on_an_exported_encoder(tmp_path):
    cfg = config.load(ROOT / "configs/demo_mnist.yaml", [f"logging.folder={tmp_path}"])
    cfg.dump(tmp_path / "config.yaml")
    torch.manual_seed(3)
    model = build_ijepa(ModelSpec.from_config(cfg))
    CheckpointManager(tmp_path).save(1, model, build_optimizer(model.encoder, model.predictor), {"step": 1})
    torch.save(model.target_encoder.state_dict(), tmp_path / "target_encoder.pt")
    images, labels = load_mnist_5k()
    data = {"train": (images[:300], labels[:300]), "test": (images[300:400], labels[300:400])}
    torch.save(data, tmp_path / "digits.pt")

    from fastjepa.data import mean_std

    mean, std = mean_std(cfg)
    feats = [extract_features(model.target_encoder, tensor_batches(*data[s], 256),
                              preprocess=lambda x: resized(to_float_images(x, mean, std), cfg.data.crop_size))
             for s in ("train", "test")]
    expected = linear_probe(*feats[0], *feats[1])["top1"]
    expected_knn = knn_top1(*feats[0], *feats[1], k=20, temperature=0.07)
    for checkpoint in (tmp_path, tmp_path / "target_encoder.pt"):
        out = subprocess.run([sys.executable, "-m", "fastjepa.eval.probe", "--checkpoint", str(checkpoint),
                              "--data", str(tmp_path / "digits.pt"), "--config", str(tmp_path / "config.yaml"),
                              "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["encoder"]["linear_top1"] == expected and result["encoder"]["knn_top1"] == expected_knn
        assert (result["train_samples"], result["val_samples"]) == (300, 100)
    bad = subprocess.run([sys.executable, "-m", "fastjepa.eval.probe", "--checkpoint", str(tmp_path / "nope"),
                          "--data", "mnist", "--config", str(tmp_path / "config.yaml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


def test_knn_votes_with_temperature_weighted_cosine_neighbours():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[2.0, 0.1], [0.2, 3.0], [1.0, 0.2]])  # cosine, so the scale does not matter
    assert knn_top1(train, labels, test, torch.tensor([0, 1, 0]), k=3) == 1.0
    assert knn_top1(train, labels, test, torch.tensor([1, 0, 1]), k=3) == 0.0
    # one close neighbour of class 1 outvotes two far ones of class 0 at a low temperature, not at a high one
    train, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]]), torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.3]])
    assert knn_top1(train, labels, query, torch.tensor([1]), k=3, temperature=0.07) == 1.0
    assert knn_top1(train, labels, query, torch.tensor([0]), k=3, temperature=100.0) == 1.0


def colour_images(n_per_class: int, classes: int = 3, size: int = 40, seed: int = 0):
    """JPEGs whose colour gives the class, with noise."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)][:classes]
    for label, colour in enumerate(palette):
        for i in range(n_per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size + i % 7, size, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG", quality=90)
            yield label, i, buf.getvalue()


@pytest.mark.parametrize("source", ["imagefolder", "webdataset"])
def test_probe_cli_on_an_image_folder_and_on_shards(tmp_path, source):
    cfg = config.load(ROOT / "configs/test_tiny.yaml", ["meta.model_name=vit_micro", f"logging.folder={tmp_path}"])
    cfg.dump(tmp_path / "config.yaml")
    torch.manual_seed(0)
    torch.save(build_ijepa(ModelSpec.from_config(cfg)).target_encoder.state_dict(), tmp_path / "target_encoder.pt")
    locations = {}
    for split, n in (("train", 12), ("val", 5)):
        samples = list(colour_images(n, seed=len(split)))
        if source == "imagefolder":
            for label, i, data in samples:
                (tmp_path / split / f"class{label}").mkdir(parents=True, exist_ok=True)
                (tmp_path / split / f"class{label}" / f"{i}.jpg").write_bytes(data)
            (tmp_path / split / "class0" / "broken.jpg").write_bytes(b"not a jpeg")  # skipped, counted
            locations[split] = str(tmp_path / split)
        else:
            from test_data import write_shards

            locations[split] = write_shards(tmp_path / split, [{"jpg": d, "cls": str(y).encode()}
                                                               for y, _, d in samples], 8)
    encoder = str(tmp_path / "target_encoder.pt")
    out = subprocess.run([sys.executable, "-m", "fastjepa", "probe", "--checkpoint", encoder, "--data", source,
                          "--train", locations["train"], "--val", locations["val"], "--device", "cpu",
                          "--batch-size", "8", "--workers", "2", "--pixels", "--out", str(tmp_path / "r.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["train_samples"], result["val_samples"]) == (36, 15)
    assert result["encoder"]["knn_top1"] >= 0.8 and result["encoder"]["linear_top1"] >= 0.8, result
    assert 0 <= result["pixels"]["linear_top1"] <= 1
    if source == "imagefolder":
        assert result["skipped"] == {"train": {"not_image": 1}, "val": {"not_image": 1}}
    # not on a terminal: plain progress lines instead of silence, one done line per pass
    assert "fastjepa probe: encoder train: done, 36 img" in out.stderr and "pixels val: done" in out.stderr
