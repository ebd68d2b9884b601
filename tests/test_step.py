"""The training step (fastjepa.step): the fused parameter update (AdamW + EMA + bf16 replica in one pass, Triton
interpreter on CPU) follows the two-step update's trajectory through the Stepper, and the update's choice."""

from pathlib import Path

import pytest
import torch
from kernel_utils import random_masks, rel_rms

from fastjepa import config, schedules
from fastjepa.ijepa import IJEPA
from fastjepa.mask_batch import Masks
from fastjepa.models import VisionTransformerPredictor, vit_tiny
from fastjepa.optim import build_optimizer
from fastjepa.step import Stepper, resolve_update_impl

ROOT = Path(__file__).resolve().parents[1]
GRID, PATCH, IMG, BATCH, STEPS = 4, 4, 16, 2, 3


def tiny_model() -> IJEPA:
    torch.manual_seed(0)
    enc = vit_tiny(patch_size=PATCH, img_size=IMG, depth=1, embed_dim=32, num_heads=2, attn_backend="math")
    pred = VisionTransformerPredictor((GRID, GRID), embed_dim=32, predictor_embed_dim=16, depth=1, num_heads=2,
                                      attn_backend="math")
    model = IJEPA(enc, pred)
    model.enable_target_replica(torch.float16)  # the replica the update writes in the same pass
    return model


def train(update_impl: str, reference_ops):
    model = tiny_model()
    sched = schedules.build(config.load(ROOT / "configs/test_tiny.yaml").optimization, 4)
    stepper = Stepper(model, model, build_optimizer(model.encoder, model.predictor), sched, bf16=False,
                      autocast={"device_type": "cpu", "enabled": False}, update_impl=update_impl)
    stepper.consecutive_bad = torch.zeros((), dtype=torch.int64)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(STEPS):
        images = torch.randn(BATCH, 3, IMG, IMG, generator=g)
        masks = Masks(random_masks(1, BATCH, GRID * GRID, 6, g), random_masks(3, BATCH, GRID * GRID, 3, g))
        losses.append(stepper(images, masks, step).loss.item())
    state = [t.detach().clone() for t in [*model.parameters(), *model.target_replica.parameters()]]
    moments = [s[k].clone() for s in stepper.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq", "step")]
    return losses, state, moments


def test_fused_update_follows_the_two_step_update(reference_ops):
    # reference_ops: the model's other ops run their references, so only the update differs between the runs.
    want, got = train("separate", reference_ops), train("fused", reference_ops)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    for name, a, b in (("weights, targets and replica", got[1], want[1]), ("AdamW state", got[2], want[2])):
        err = max(rel_rms(x, y) for x, y in zip(a, b, strict=True))
        assert err <= 1e-6, f"{name} after {STEPS} steps differ by relative RMS {err:.2e}"


def test_update_impl_resolves_without_timing_on_cpu():
    model = tiny_model()
    optimizer = build_optimizer(model.encoder, model.predictor)
    assert resolve_update_impl("auto", optimizer, model) == ("separate", {})
    assert resolve_update_impl("fused", optimizer, model) == ("fused", {})
    with pytest.raises(ValueError, match="update_impl='one_pass'"):
        resolve_update_impl("one_pass", optimizer, model)


def test_the_fused_update_with_fp8_targets_is_refused_when_the_config_is_read():
    with pytest.raises(ValueError, match=r"fastjepa.update_impl.*e4m3.*auto or separate"):
        config.load(ROOT / "configs/test_tiny.yaml", ["fastjepa.update_impl=fused", "fastjepa.fp8=target"])
