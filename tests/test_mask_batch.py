"""fastjepa.mask_batch: one Masks value per batch, built by the collator; Masks.from_lists is the one converter of
the official lists, and the models take nothing else."""

import dataclasses

import pytest
import torch

from fastjepa.ijepa import IJEPA
from fastjepa.mask_batch import Masks
from fastjepa.masks import MultiBlockMaskCollator
from fastjepa.models import VisionTransformer, VisionTransformerPredictor

COLLATOR = dict(input_size=32, patch_size=4, enc_mask_scale=(0.6, 0.8), pred_mask_scale=(0.1, 0.2), min_keep=2,
                mode="fixed")


def tiny_model(varlen_context=False) -> IJEPA:
    torch.manual_seed(0)
    enc = VisionTransformer(32, 4, 3, 32, 1, 2)
    return IJEPA(enc, VisionTransformerPredictor(enc.grid, 32, 16, 1, 2), varlen_context=varlen_context)


def test_from_lists_stacks_the_official_lists():
    enc = [torch.tensor([[0, 1, 2], [3, 4, 5]])]
    pred = [torch.tensor([[6, 7], [8, 9]]), torch.tensor([[10, 11], [12, 13]])]
    masks = Masks.from_lists(enc, pred)
    assert masks.enc.shape == (1, 2, 3) and masks.pred.shape == (2, 2, 2) and masks.packed is None
    assert torch.equal(masks.pred[1], pred[1])


@pytest.mark.parametrize("enc,pred,match", [
    ([torch.zeros(2, 3, dtype=torch.long)], [torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)],
     r"masks_pred\[1\] has shape \(2, 3\), masks_pred\[0\] \(2, 2\)"),
    (torch.zeros(1, 2, 3, dtype=torch.long), [torch.zeros(2, 2, dtype=torch.long)],
     r"masks_enc: pass the official non-empty list .* got a tensor of shape \(1, 2, 3\)"),
    ([torch.zeros(2, 3, dtype=torch.long)], [], r"masks_pred: .* got an empty list"),
])
def test_from_lists_names_the_bad_mask(enc, pred, match):
    with pytest.raises(ValueError, match=match):
        Masks.from_lists(enc, pred)


def test_the_model_takes_one_masks_value_and_names_the_converter():
    model, images = tiny_model(), torch.randn(2, 3, 32, 32)
    enc, pred = [torch.tensor([[0, 1, 2], [3, 4, 5]])], [torch.tensor([[6, 7], [8, 9]])]
    with pytest.raises(TypeError, match=r"IJEPA takes one Masks value, got list.*Masks\.from_lists"):
        model(images, enc)
    loss = model(images, Masks.from_lists(enc, pred))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_the_model_refuses_masks_packed_otherwise_than_its_context():
    masks = MultiBlockMaskCollator(**COLLATOR, truncate_context=False).sample(2, step=0)
    assert masks.packed is not None
    with pytest.raises(ValueError, match="varlen_context is False but the masks are packed"):
        tiny_model()(torch.randn(2, 3, 32, 32), masks)
    with pytest.raises(ValueError, match="varlen_context is True but the masks are not packed"):
        tiny_model(varlen_context=True)(torch.randn(2, 3, 32, 32), dataclasses.replace(masks, packed=None))


def test_the_collator_packs_variable_length_context_as_from_lists_does():
    masks = MultiBlockMaskCollator(**COLLATOR, truncate_context=False).sample(3, step=5)
    again = Masks.from_lists(list(masks.enc), list(masks.pred), packed_num_patches=64)
    for field in dataclasses.fields(again.packed):
        mine, theirs = getattr(masks.packed, field.name), getattr(again.packed, field.name)
        assert torch.equal(mine, theirs) if isinstance(mine, torch.Tensor) else mine == theirs, field.name
    assert MultiBlockMaskCollator(**COLLATOR).sample(3, step=5).packed is None  # truncated context: not packed


def test_masks_move_with_every_packed_tensor():
    masks = MultiBlockMaskCollator(**COLLATOR, truncate_context=False).sample(2, step=1).to("meta")
    assert masks.enc.is_meta and masks.pred.is_meta
    assert all(getattr(masks.packed, f.name).is_meta for f in dataclasses.fields(masks.packed)
               if isinstance(getattr(masks.packed, f.name), torch.Tensor))
