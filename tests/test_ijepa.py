import copy

import pytest
import torch

from bench import official_style
from fastjepa.ijepa import IJEPA
from fastjepa.mask_batch import Masks
from fastjepa.models import VisionTransformerPredictor, vit_tiny
from fastjepa.optim import build_optimizer, param_groups

GRID, PATCH, IMG = 6, 4, 24  # 36 patches
# The fused ops have their own tests against these same references (tests/kernels/, test_fused_convergence.py).
pytestmark = pytest.mark.usefixtures("reference_ops")


def _tiny(backend="math", seed=0):
    torch.manual_seed(seed)
    enc = vit_tiny(patch_size=PATCH, img_size=IMG, depth=2, embed_dim=48, num_heads=3, attn_backend=backend)
    pred = VisionTransformerPredictor((GRID, GRID), embed_dim=48, predictor_embed_dim=24, depth=2, num_heads=3,
                                      attn_backend=backend)
    model = IJEPA(enc, pred)
    with torch.no_grad():  # a target that differs from the encoder, as after some EMA steps
        for p in model.target_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def _masks(B, counts, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.stack([torch.randperm(GRID * GRID, generator=g)[:k] for _ in range(B)]) for k in counts]


def _official_loss_and_grads(model, images, masks_enc, masks_pred):
    enc = dict(model.encoder.named_parameters())
    pred = dict(model.predictor.named_parameters())
    tgt = {k: v.detach() for k, v in model.target_encoder.named_parameters()}
    loss = official_style.loss(enc, pred, tgt, images, masks_enc, masks_pred, num_heads=3)
    params = [p for p in list(enc.values()) + list(pred.values()) if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("nenc,npred", [(1, 4), (2, 3)])
def test_loss_and_every_gradient_equal_the_official_computation(nenc, npred):
    model = _tiny("math")
    B = 3
    images = torch.randn(B, 3, IMG, IMG)
    masks_enc = _masks(B, [13] * nenc, seed=1)
    masks_pred = _masks(B, [5] * npred, seed=2)
    ref_loss, ref_grads = _official_loss_and_grads(model, images, masks_enc, masks_pred)
    loss = model(images, Masks.from_lists(masks_enc, masks_pred))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    assert len(grads) == len(ref_grads)
    torch.testing.assert_close(loss, ref_loss)  # fp32 defaults: rtol 1.3e-6, atol 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1.3e-6, atol=1e-7)


def test_sdpa_backend_matches_official_within_fp32_rounding():
    model = _tiny("sdpa")
    images = torch.randn(2, 3, IMG, IMG)
    masks_enc, masks_pred = _masks(2, [11], seed=3), _masks(2, [4] * 4, seed=4)
    ref_loss, ref_grads = _official_loss_and_grads(model, images, masks_enc, masks_pred)
    loss = model(images, Masks.from_lists(masks_enc, masks_pred))
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    for g, r in zip(grads, ref_grads, strict=True):
        rel_rms = (g - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-30)
        assert rel_rms < 1e-5


def test_target_encoder_gets_no_gradient_and_ema_follows_the_official_loop():
    model = _tiny("sdpa")
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    images = torch.randn(2, 3, IMG, IMG)
    model(images, Masks.from_lists(_masks(2, [10], 5), _masks(2, [4] * 2, 6))).backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    expected = copy.deepcopy(model.target_encoder)
    official_style.ema_update(list(expected.parameters()), list(model.encoder.parameters()), 0.996)
    model.update_target(0.996)
    for a, b in zip(model.target_encoder.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-7)
    model.update_target(0.0)  # momentum 0 copies the encoder
    for a, b in zip(model.target_encoder.parameters(), model.encoder.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_optimizer_groups_follow_the_official_order_and_exclusions():
    model = _tiny()
    groups = param_groups(model.encoder, model.predictor)
    names = {id(p): n for n, p in list(model.encoder.named_parameters()) + list(model.predictor.named_parameters())}
    assert [len(g["params"]) for g in groups] == [
        sum(1 for n, p in model.encoder.named_parameters() if "bias" not in n and p.ndim != 1),
        sum(1 for n, p in model.predictor.named_parameters() if "bias" not in n and p.ndim != 1),
        sum(1 for n, p in model.encoder.named_parameters() if "bias" in n or p.ndim == 1),
        sum(1 for n, p in model.predictor.named_parameters() if "bias" in n or p.ndim == 1),
    ]
    assert names[id(groups[0]["params"][0])] == "pos_embed"  # frozen params keep their official slots
    assert all(g.get("WD_exclude") and g["weight_decay"] == 0 for g in groups[2:])
    opt = build_optimizer(model.encoder, model.predictor)
    assert len(opt.param_groups) == 4


def test_training_steps_reduce_the_loss():
    model = _tiny("sdpa")
    opt = build_optimizer(model.encoder, model.predictor)
    for g in opt.param_groups:
        g["lr"] = 1e-3
    images = torch.randn(4, 3, IMG, IMG)
    masks_enc, masks_pred = _masks(4, [12], 7), _masks(4, [4] * 4, 8)
    losses = []
    for _ in range(15):
        loss = model(images, Masks.from_lists(masks_enc, masks_pred))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_target(0.996)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
