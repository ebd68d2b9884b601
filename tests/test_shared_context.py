"""Predictor layouts over the same weights: 'repeat' equals the official forward; 'shared' equals a dense masked
reference, agrees across its attention providers, and equals the official forward for a one-block predictor."""

import pytest
import torch
import torch.nn.functional as F

from fastjepa.kernels import fused_enabled, set_fused
from fastjepa.kernels.block_attention import block_attention_mask
from fastjepa.models import VisionTransformerPredictor
from fastjepa.models.shared_context import predictor_forward, set_predictor_layout, shared_context_tokens

GRID, EMBED, PRED, HEADS = (4, 4), 24, 32, 2


@pytest.fixture(autouse=True)
def reference_glue():
    """fp64 comparisons: the predictor's other ops (token building, gathers) on their PyTorch references, so the
    only difference between layouts is the layout; the 'triton' provider below is asked for explicitly."""
    was = fused_enabled()
    set_fused(False)
    yield
    set_fused(was)


def make(depth=2, batch=2, nenc=1, ctx_len=5, tgt_len=3, num_blocks=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    pred = VisionTransformerPredictor(GRID, embed_dim=EMBED, predictor_embed_dim=PRED, depth=depth, num_heads=HEADS,
                                      attn_backend="math").to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    n = GRID[0] * GRID[1]

    def idx(k):
        return torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(batch)])

    masks_enc = [idx(ctx_len) for _ in range(nenc)]
    masks_pred = [idx(tgt_len) for _ in range(num_blocks)]
    x = torch.randn(nenc * batch, ctx_len, EMBED, generator=gen).to(dtype).requires_grad_()
    return pred, x, masks_enc, masks_pred


def grads(out, pred, x, seed=2):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    params = [p for p in pred.parameters() if p.requires_grad]
    return torch.autograd.grad(out, [x, *params], grad_out)


def dense_shared_reference(pred, x, masks_enc, masks_pred):
    """The shared layout written densely: every block is a full ViT block with a boolean attention mask."""
    ctx_len, num_blocks, tgt_len = x.shape[1], len(masks_pred), masks_pred[0].shape[1]
    h = shared_context_tokens(pred, x, masks_enc, masks_pred)
    mask = block_attention_mask(ctx_len, tgt_len, num_blocks)
    for blk in pred.predictor_blocks:
        a = blk.attn
        q, k, v = a.qkv(blk.norm1(h)).reshape(h.shape[0], h.shape[1], 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + a.proj(o.transpose(1, 2).reshape(h.shape))
        h = h + blk.mlp(blk.norm2(h))
    h = h[:, ctx_len:].reshape(h.shape[0], num_blocks, tgt_len, -1).transpose(0, 1).reshape(-1, tgt_len, h.shape[-1])
    return pred.predictor_proj(pred.predictor_norm(h))


@pytest.mark.parametrize("nenc", [1, 2])
def test_repeat_layout_equals_official_forward(nenc):
    pred, x, masks_enc, masks_pred = make(nenc=nenc)
    ref = pred(x, masks_enc, masks_pred)
    out = predictor_forward(pred, x, masks_enc, masks_pred, layout="repeat")
    assert out.shape == ref.shape == (3 * nenc * 2, 3, EMBED)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, rg in zip(grads(out, pred, x), grads(ref, pred, x), strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("nenc", [1, 2])
def test_shared_layout_equals_dense_masked_reference(nenc):
    pred, x, masks_enc, masks_pred = make(nenc=nenc)
    out = predictor_forward(pred, x, masks_enc, masks_pred, layout="shared", provider="ref")
    ref = dense_shared_reference(pred, x, masks_enc, masks_pred)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_shared_layout_one_block_equals_official():
    # With one block the context tokens' updates never reach the output, so the two layouts coincide.
    pred, x, masks_enc, masks_pred = make(depth=1, nenc=2)
    torch.testing.assert_close(predictor_forward(pred, x, masks_enc, masks_pred, layout="shared", provider="ref"),
                               pred(x, masks_enc, masks_pred), rtol=1e-10, atol=1e-10)


def test_shared_layout_deeper_differs_from_official():
    pred, x, masks_enc, masks_pred = make(depth=2)
    diff = predictor_forward(pred, x, masks_enc, masks_pred, layout="shared", provider="ref") - pred(
        x, masks_enc, masks_pred)
    assert diff.abs().max() > 1e-6


def test_shared_layout_triton_matches_reference_fp32():
    pred, x, masks_enc, masks_pred = make(dtype=torch.float32)
    ref = predictor_forward(pred, x, masks_enc, masks_pred, layout="shared", provider="ref")
    out = predictor_forward(pred, x, masks_enc, masks_pred, layout="shared", provider="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads(out, pred, x), grads(ref, pred, x), strict=True):
        rel = ((g - rg).norm() / rg.norm()).item()
        assert rel < 1e-5, f"gradient rel error {rel:.2e}"


def test_set_predictor_layout_keeps_weights_and_switches_back():
    pred, x, masks_enc, masks_pred = make()
    keys = list(pred.state_dict())
    official = pred(x, masks_enc, masks_pred)
    set_predictor_layout(pred, "shared", provider="ref")
    assert list(pred.state_dict()) == keys
    shared = pred(x, masks_enc, masks_pred)
    torch.testing.assert_close(shared, predictor_forward(pred, x, masks_enc, masks_pred, "shared", "ref"))
    set_predictor_layout(pred, "official")
    torch.testing.assert_close(pred(x, masks_enc, masks_pred), official)
    with pytest.raises(ValueError, match="layout"):
        set_predictor_layout(pred, "packed")


@pytest.mark.parametrize("layout", ["repeat", "shared"])
def test_compiled_layout_blocks_match_eager(layout):
    pred, x, masks_enc, masks_pred = make(dtype=torch.float32)
    eager = predictor_forward(pred, x, masks_enc, masks_pred, layout, "ref")
    compiled = predictor_forward(pred, x, masks_enc, masks_pred, layout, "ref", compile_backend="eager")
    torch.testing.assert_close(compiled, eager)


def test_config_selects_the_predictor_layout():
    from fastjepa.config import ConfigError, load
    from fastjepa.models import build_models

    _, pred = build_models(load("configs/test_tiny.yaml"))
    assert pred.layout == "repeat"  # the default: official results, cheaper last block
    _, pred = build_models(load("configs/test_tiny.yaml", ["fastjepa.predictor_layout=shared"]))
    assert pred.layout == "shared"
    with pytest.raises(ConfigError, match="predictor_layout"):
        load("configs/test_tiny.yaml", ["fastjepa.predictor_layout=packed"])
