"""Variable-length (packed) attention and the untruncated-context encoder/predictor against per-image loops."""

import pytest
import torch
import torch.nn.functional as F

from fastjepa.ijepa import IJEPA
from fastjepa.mask_batch import Masks
from fastjepa.models import VisionTransformer, VisionTransformerPredictor
from fastjepa.modules import attention_backends as ab

LENGTHS = [5, 1, 9, 4]


# fp64 comparisons: the models' gathers on the PyTorch references.
pytestmark = pytest.mark.usefixtures("reference_ops")


def packed_qkv(dtype=torch.float64, heads=2, dim=16):
    gen = torch.Generator().manual_seed(0)
    total = sum(LENGTHS)
    cu = F.pad(torch.tensor(LENGTHS).cumsum(0), (1, 0))
    return [torch.randn(total, heads, dim, generator=gen).to(dtype).requires_grad_() for _ in range(3)], cu


def per_sequence(q, k, v, cu, scale):
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        outs.append(torch.softmax(qs @ ks.transpose(-1, -2) * scale, -1).matmul(vs).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_varlen_backends_match_per_sequence_attention(backend):
    (q, k, v), cu = packed_qkv()
    out = ab.varlen_attention(q, k, v, cu, max(LENGTHS), 0.25, backend)
    ref = per_sequence(q, k, v, cu, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    for g, rg in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(ref, (q, k, v), grad_out),
                     strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-10)


def test_varlen_flex_forward_matches():
    (q, k, v), cu = packed_qkv(torch.float32)
    q, k, v = (t.detach() for t in (q, k, v))
    out = ab.varlen_attention(q, k, v, cu, max(LENGTHS), 0.25, "flex")
    torch.testing.assert_close(out, per_sequence(q, k, v, cu, 0.25), rtol=1e-5, atol=1e-6)


def test_varlen_bad_inputs_are_named_without_reading_cu_seqlens():
    (q, k, v), cu = packed_qkv()
    with pytest.raises(ValueError, match="cu_seqlens"):
        ab.varlen_attention(q, k, v, cu.float(), 9, 0.25, "math")
    with pytest.raises(ValueError, match=r"q must be packed \[T, H, D\]"):
        ab.varlen_attention(q[None], k, v, cu, 9, 0.25, "math")
    # the values are checked where the packed context is built, on the CPU
    with pytest.raises(IndexError, match=r"context indices must lie in \[0, 16\)"):
        Masks.from_lists([torch.tensor([[0, 16, -1]])], [torch.tensor([[1, 2]])], 16)


GRID, DIM, HEADS = 4, 24, 2


def make_model(seed=0):
    torch.manual_seed(seed)
    enc = VisionTransformer(GRID * 4, 4, 3, DIM, 2, HEADS, attn_backend="math")
    pred = VisionTransformerPredictor((GRID, GRID), DIM, 16, 2, HEADS, attn_backend="math")
    return IJEPA(enc, pred).double()


def random_context(nenc, batch, seed=1):
    """bool ``[nenc, B, N]`` context tokens and the collator's untruncated lists of them (-1 padded)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.rand(nenc, batch, GRID * GRID, generator=gen) < 0.5
    tokens[..., 0] = True  # every context keeps at least one token
    order = torch.where(tokens, torch.arange(GRID * GRID), GRID * GRID).sort(-1).values
    return tokens, torch.where(order < GRID * GRID, order, -1)[..., : int(tokens.sum(-1).max())]


@pytest.mark.parametrize("nenc", [1, 2])
def test_packed_encoder_and_predictor_equal_per_image_runs(nenc):
    model, batch = make_model(), 3
    images = torch.randn(batch, 3, GRID * 4, GRID * 4, dtype=torch.float64)
    tokens, padded = random_context(nenc, batch)
    gen = torch.Generator().manual_seed(2)
    masks_pred = [torch.stack([torch.randperm(GRID * GRID, generator=gen)[:3].sort().values for _ in range(batch)])
                  for _ in range(2)]
    packed = Masks.from_lists(list(padded), masks_pred, GRID * GRID).packed
    z = model.encoder.forward_packed(images, packed)
    out = model.predictor.forward_packed(z, packed, torch.stack(masks_pred))
    assert out.shape == (2 * nenc * batch, 3, DIM)
    rows = out.reshape(2, nenc, batch, 3, DIM)
    for e in range(nenc):
        for b in range(batch):
            mask = [tokens[e, b].nonzero()[:, 0][None]]  # this context block alone, untruncated
            z_eb = model.encoder(images[b:b + 1], torch.stack(mask))
            s = e * batch + b
            torch.testing.assert_close(z[packed.cu_seqlens[s]:packed.cu_seqlens[s + 1]], z_eb[0])
            ref = model.predictor(z_eb, Masks.from_lists(mask, [m[b:b + 1] for m in masks_pred]))
            torch.testing.assert_close(rows[:, e, b], ref)


def test_varlen_loss_equals_official_loss_when_lengths_agree():
    model, batch = make_model(), 2
    images = torch.randn(batch, 3, GRID * 4, GRID * 4, dtype=torch.float64)
    idx = torch.stack([torch.randperm(GRID * GRID, generator=torch.Generator().manual_seed(b))[:6].sort().values
                       for b in range(batch)])
    masks_pred = [idx[:, :2].flip(0), idx[:, 2:4]]
    official = model(images, Masks.from_lists([idx], masks_pred))
    model.varlen_context = True
    torch.testing.assert_close(model(images, Masks.from_lists([idx], masks_pred, GRID * GRID)), official)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [24, 80])
def test_gpu_varlen_backends_bf16(head_dim):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(40, 120, (64,), generator=gen)
    cu = F.pad(lengths.cumsum(0), (1, 0)).cuda()
    q, k, v = (torch.randn(int(cu[-1]), 16, head_dim, generator=gen).cuda().bfloat16() for _ in range(3))
    grad_out = torch.randn_like(q)

    def run(backend, *t):
        t = [x.detach().requires_grad_() for x in t]
        out = ab.varlen_attention(*t, cu, int(lengths.max()), head_dim**-0.5, backend)
        return (out, *torch.autograd.grad(out, t, grad_out.to(out.dtype)))

    ref = run("math", q.double(), k.double(), v.double())
    low = run("math", q, k, v)
    backends = ["sdpa", "flex", "auto"] + (["flash_attn"] if ab.installed("flash_attn") else [])
    for backend in backends:
        for got, m, r in zip(run(backend, q, k, v), low, ref, strict=True):
            err, base = ((got.double() - r).norm() / r.norm()).item(), ((m.double() - r).norm() / r.norm()).item()
            assert err <= 2 * base + 1e-4, (backend, err, base)
