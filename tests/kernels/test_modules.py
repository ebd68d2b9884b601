"""The nn.Module drop-ins over the fused ops give the functionals' results (and the EMA updater the official loop's)."""

import copy

import pytest
import torch
from kernel_utils import random_masks
from torch import nn

from fastjepa.kernels import ema_update_ref, masked_gather_ref, predictor_tokens_ref, target_norm_gather_ref
from fastjepa.kernels.target_norm_gather import target_norm_smooth_l1_ref
from fastjepa.modules.ema import EMAUpdater
from fastjepa.modules.gather import MaskedGather, PredictorTokens, TargetNormGather, TargetNormSmoothL1Loss


def test_gather_modules_match_references():
    g = torch.Generator().manual_seed(0)
    tokens, pos = torch.randn(2, 16, 24, generator=g), torch.randn(16, 24, generator=g)
    masks = random_masks(2, 2, 16, 5, g)
    torch.testing.assert_close(MaskedGather()(tokens, masks, pos), masked_gather_ref(tokens, masks, pos))
    torch.testing.assert_close(TargetNormGather()(tokens, masks, 2), target_norm_gather_ref(tokens, masks, 2))
    pred = torch.randn(8, 5, 24, generator=g)
    torch.testing.assert_close(TargetNormSmoothL1Loss()(pred, tokens, masks, 2),
                               target_norm_smooth_l1_ref(pred, tokens, masks, 2))


def test_predictor_tokens_module_owns_a_learned_mask_token_and_a_frozen_table():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(16, 24, generator=g)
    module = PredictorTokens(16, 24, pos_embed=table)
    assert module.mask_token.requires_grad and not module.pos_embed.requires_grad
    x = torch.randn(2, 4, 24, generator=g)
    masks_enc, masks_pred = random_masks(1, 2, 16, 4, g), random_masks(3, 2, 16, 2, g)
    out = module(x, masks_enc, masks_pred)
    torch.testing.assert_close(out, predictor_tokens_ref(x, masks_enc, masks_pred, module.mask_token, table))
    out.sum().backward()
    assert module.mask_token.grad.shape == (1, 1, 24)


def test_ema_updater_follows_the_official_loop_and_fills_the_copy():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(12, 7), nn.LayerNorm(7))
    target = copy.deepcopy(online)
    for p in online.parameters():
        p.data.add_(torch.randn_like(p))
    expected = copy.deepcopy(target)
    replica = copy.deepcopy(target).half()
    EMAUpdater(target, online, copy_to=replica).update(0.9)
    ema_update_ref(list(expected.parameters()), list(online.parameters()), 0.9)
    for t, e, c in zip(target.parameters(), expected.parameters(), replica.parameters(), strict=True):
        torch.testing.assert_close(t, e, rtol=1.3e-6, atol=1e-7)
        torch.testing.assert_close(c, t.half(), rtol=0, atol=0)


def test_ema_updater_rejects_different_architectures():
    with pytest.raises(ValueError, match="parameters differ"):
        EMAUpdater(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3)))
