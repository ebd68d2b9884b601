"""Predictor layouts over the same weights: 'repeat' equals the official forward; 'shared' equals a dense masked
reference, agrees across its block-attention backends, and equals the official forward for a one-block predictor;
every layout runs every block through its module, so activation checkpointing and compile wrap all of them."""

import pytest
import torch
import torch.nn.functional as F

from fastjepa.ijepa import IJEPA
from fastjepa.kernels.block_attention import block_attention_mask
from fastjepa.mask_batch import Masks
from fastjepa.models import VisionTransformer, VisionTransformerPredictor
from fastjepa.parallel import apply_activation_checkpointing, apply_compile

GRID, EMBED, PRED, HEADS = (4, 4), 24, 32, 2

# fp64 comparisons: the predictor's other ops (token building, gathers) on their PyTorch references, so the only
# difference between layouts is the layout; the 'triton' block-attention backend below is asked for explicitly.
pytestmark = pytest.mark.usefixtures("reference_ops")


def make(depth=2, batch=2, nenc=1, context_len=5, target_len=3, num_target_blocks=3, dtype=torch.float64, seed=0,
         layout="repeat", block_attn_backend="reference"):
    torch.manual_seed(seed)
    pred = VisionTransformerPredictor(GRID, embed_dim=EMBED, predictor_embed_dim=PRED, depth=depth, num_heads=HEADS,
                                      attn_backend="math", layout=layout,
                                      block_attn_backend=block_attn_backend).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    n = GRID[0] * GRID[1]

    def idx(k, count):
        return torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(count * batch)]).reshape(
            count, batch, k)

    masks_enc, masks_pred = idx(context_len, nenc), idx(target_len, num_target_blocks)
    x = torch.randn(nenc * batch, context_len, EMBED, generator=gen).to(dtype).requires_grad_()
    return pred, x, masks_enc, masks_pred


def grads(out, pred, x, seed=2):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    params = [p for p in pred.parameters() if p.requires_grad]
    return torch.autograd.grad(out, [x, *params], grad_out)


def dense_shared_reference(pred, x, masks_enc, masks_pred):
    """The shared layout written densely: every block is a full ViT block with a boolean attention mask."""
    context_len, (num_target_blocks, _, target_len) = x.shape[1], masks_pred.shape
    h = pred.shared_tokens(x, masks_enc, masks_pred)
    mask = block_attention_mask(context_len, target_len, num_target_blocks)
    for blk in pred.predictor_blocks:
        a = blk.attn
        q, k, v = a.qkv(blk.norm1(h)).reshape(h.shape[0], h.shape[1], 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + a.proj(o.transpose(1, 2).reshape(h.shape))
        h = h + blk.mlp(blk.norm2(h))
    h = h[:, context_len:].reshape(h.shape[0], num_target_blocks, target_len, -1).transpose(0, 1)
    h = h.reshape(-1, target_len, h.shape[-1])
    return pred.predictor_proj(pred.predictor_norm(h))


@pytest.mark.parametrize("nenc", [1, 2])
def test_repeat_layout_equals_official_forward(nenc):
    pred, x, masks_enc, masks_pred = make(nenc=nenc)
    ref = pred.forward_official(x, masks_enc, masks_pred)
    out = pred(x, Masks(masks_enc, masks_pred))
    assert out.shape == ref.shape == (3 * nenc * 2, 3, EMBED)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, rg in zip(grads(out, pred, x), grads(ref, pred, x), strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-10)


def test_predictor_takes_one_masks_value_and_names_the_converter():
    pred, x, masks_enc, masks_pred = make(nenc=2)
    with pytest.raises(TypeError, match=r"one Masks value.*Masks\.from_lists"):
        pred(x, list(masks_enc))
    official = Masks.from_lists(list(masks_enc), list(masks_pred))  # the official lists, converted once
    torch.testing.assert_close(pred(x, official), pred(x, Masks(masks_enc, masks_pred)), rtol=0, atol=0)


@pytest.mark.parametrize("nenc", [1, 2])
def test_shared_layout_equals_dense_masked_reference(nenc):
    pred, x, masks_enc, masks_pred = make(nenc=nenc, layout="shared")
    out = pred(x, Masks(masks_enc, masks_pred))
    torch.testing.assert_close(out, dense_shared_reference(pred, x, masks_enc, masks_pred), rtol=1e-10, atol=1e-10)


def test_shared_layout_one_block_equals_official():
    # With one block the context tokens' updates never reach the output, so the two layouts coincide.
    pred, x, masks_enc, masks_pred = make(depth=1, nenc=2, layout="shared")
    torch.testing.assert_close(pred(x, Masks(masks_enc, masks_pred)), pred.forward_official(x, masks_enc, masks_pred),
                               rtol=1e-10, atol=1e-10)


def test_shared_layout_deeper_differs_from_official():
    pred, x, masks_enc, masks_pred = make(depth=2, layout="shared")
    diff = pred(x, Masks(masks_enc, masks_pred)) - pred.forward_official(x, masks_enc, masks_pred)
    assert diff.abs().max() > 1e-6


def test_shared_layout_triton_matches_reference_fp32():
    pred, x, masks_enc, masks_pred = make(dtype=torch.float32, layout="shared")
    triton_pred, *_ = make(dtype=torch.float32, layout="shared", block_attn_backend="triton")
    ref, out = pred(x, Masks(masks_enc, masks_pred)), triton_pred(x, Masks(masks_enc, masks_pred))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads(out, triton_pred, x), grads(ref, pred, x), strict=True):
        rel = ((g - rg).norm() / rg.norm()).item()
        assert rel < 1e-5, f"gradient rel error {rel:.2e}"


def test_layout_is_a_constructor_argument_over_the_same_state_dict():
    repeat, x, masks_enc, masks_pred = make()
    shared, *_ = make(layout="shared", seed=5)
    assert list(shared.state_dict()) == list(repeat.state_dict())
    shared.load_state_dict(repeat.state_dict())
    torch.testing.assert_close(shared.forward_repeat(x, masks_enc, masks_pred), repeat(x, Masks(masks_enc, masks_pred)))
    with pytest.raises(ValueError, match="layout"):
        VisionTransformerPredictor(GRID, EMBED, PRED, layout="packed")


def with_encoder(pred: VisionTransformerPredictor) -> IJEPA:
    """The predictor inside an I-JEPA model, as the trainer wraps it."""
    return IJEPA(VisionTransformer(16, 4, 3, EMBED, 1, HEADS), pred).to(next(pred.parameters()).dtype)


def count_block_calls(pred, wrapper_type=None):
    """Calls of each predictor block's own forward (and, with ``wrapper_type``, of each wrapper's)."""
    calls = {"inner": 0, "wrapper": 0}

    def inner_hook(*_):
        calls["inner"] += 1

    for blk in pred.predictor_blocks:
        inner = getattr(blk, "_checkpoint_wrapped_module", getattr(blk, "_orig_mod", blk))
        inner.register_forward_pre_hook(inner_hook)
        if wrapper_type is not None:
            assert isinstance(blk, wrapper_type), type(blk)
    return calls


@pytest.mark.parametrize("layout", ["official", "repeat", "shared"])
def test_activation_checkpointing_recomputes_every_predictor_block(layout):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    pred, x, masks_enc, masks_pred = make(depth=3, layout=layout)
    ref = pred(x, Masks(masks_enc, masks_pred))
    ref_grads = grads(ref, pred, x)
    apply_activation_checkpointing(with_encoder(pred))
    calls = count_block_calls(pred, CheckpointWrapper)
    out = pred(x, Masks(masks_enc, masks_pred))
    assert calls["inner"] == 3  # every block, the last one of 'repeat' included
    out_grads = grads(out, pred, x)
    assert calls["inner"] == 6  # each recomputed once in the backward
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for g, rg in zip(out_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["official", "repeat", "shared"])
def test_every_predictor_block_runs_compiled(layout):
    from torch._dynamo.utils import counters

    pred, x, masks_enc, masks_pred = make(depth=3, layout=layout, dtype=torch.float32)
    eager = pred(x, Masks(masks_enc, masks_pred))
    torch._dynamo.reset()
    counters.clear()
    apply_compile(with_encoder(pred), backend="eager")
    frames = []
    for blk in pred.predictor_blocks:
        blk.register_forward_pre_hook(lambda m, a, k: frames.append(torch.compiler.is_compiling()), with_kwargs=True)
    compiled = pred(x, Masks(masks_enc, masks_pred))
    torch.testing.assert_close(compiled, eager)
    assert len(frames) == 3 and all(frames)  # every block's forward ran inside a compiled region
    assert sum(counters["graph_break"].values()) == 0
