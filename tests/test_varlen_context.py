"""Variable-length context end to end: the collator's untruncated lists, the objective on them, the trainer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastjepa.config import ConfigError, load
from fastjepa.ijepa import IJEPA
from fastjepa.mask_batch import Masks
from fastjepa.masks import MultiBlockMaskCollator
from fastjepa.models import VisionTransformerPredictor
from fastjepa.models.vit import vit_micro
from fastjepa.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
CROWDED = dict(input_size=32, patch_size=4, enc_mask_scale=(0.5, 0.7), pred_mask_scale=(0.15, 0.2),
               aspect_ratio=(0.75, 1.5), nenc=2, npred=3, min_keep=3, allow_overlap=False, mode="fixed")
pytestmark = pytest.mark.usefixtures("reference_ops")


def test_untruncated_context_keeps_every_token_padded_with_minus_one():
    truncated = MultiBlockMaskCollator(**CROWDED).sample(16, step=3)
    full = MultiBlockMaskCollator(**CROWDED, truncate_context=False).sample(16, step=3)
    assert all(torch.equal(a, b) for a, b in zip(truncated.pred, full.pred, strict=True))
    lengths = torch.stack([(whole >= 0).sum(1) for whole in full.enc])  # [nenc, B]
    assert torch.equal(lengths, torch.as_tensor(full.context_counts))  # every kept token, not the batch minimum
    for cut, whole in zip(truncated.enc, full.enc, strict=True):
        assert whole.shape[1] == lengths.max() > cut.shape[1] == lengths.min()
        assert torch.equal(whole[:, : cut.shape[1]], cut)  # same tokens, same row-major order, then padding
        assert all((row[n:] == -1).all() and (row[:n].diff() > 0).all()
                   for row, n in zip(whole, (whole >= 0).sum(1), strict=True))


def test_untruncated_context_is_a_fixed_mode_option():
    with pytest.raises(ValueError, match="fixed"):
        MultiBlockMaskCollator(**{**CROWDED, "mode": "parity"}, truncate_context=False)
    with pytest.raises(ConfigError, match="fastjepa.mode=fixed"):
        load(ROOT / "configs/test_tiny.yaml", ["fastjepa.varlen_context=true"])
    cfg = load(ROOT / "configs/test_tiny.yaml", ["fastjepa.varlen_context=true", "fastjepa.mode=fixed"])
    assert not MultiBlockMaskCollator.from_spec(ModelSpec.from_config(cfg)).truncate_context


def test_varlen_loss_weighs_every_image_as_the_official_loss_does():
    """Target blocks have one size per batch, so the loss over the packed batch is the mean of the per-image
    losses, each image run alone on its whole context (nothing cut)."""
    torch.manual_seed(0)
    enc = vit_micro(patch_size=4, img_size=32, depth=2)
    model = IJEPA(enc, VisionTransformerPredictor(enc.grid, 64, 32, depth=2, num_heads=4), varlen_context=True)
    model = model.double()
    masks = MultiBlockMaskCollator(**{**CROWDED, "nenc": 1}, truncate_context=False).sample(4, step=0)
    assert len({int((m >= 0).sum()) for m in masks.enc[0]}) > 1  # the images' contexts differ in length
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    loss = model(images, masks)  # packed by the collator
    model.varlen_context = False
    per_image = [model(images[b:b + 1], Masks.from_lists([m[b:b + 1, : int((m[b] >= 0).sum())] for m in masks.enc],
                                                         [m[b:b + 1] for m in masks.pred])) for b in range(4)]
    torch.testing.assert_close(loss, torch.stack(per_image).mean())


def test_trainer_runs_with_variable_length_context(tmp_path):
    cmd = [sys.executable, "-m", "fastjepa.train", "--config", "configs/test_tiny.yaml", "fastjepa.mode=fixed",
           "fastjepa.varlen_context=true", "meta.model_name=vit_micro", "train.max_steps=2", "train.device=cpu",
           f"logging.folder={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("kind", "train") == "train"]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
