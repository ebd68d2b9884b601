import math

import pytest
import torch

from fastjepa.mask_batch import Masks
from fastjepa.models import VIT_SIZES, VisionTransformer, VisionTransformerPredictor, vit_tiny
from fastjepa.models.pos_embed import sincos_2d
from fastjepa.modules import Attention


def _official_sincos(dim: int, side: int) -> torch.Tensor:
    """The official numpy construction, restated: meshgrid(w, h), first half from grid[0] (the column)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    gw, gh = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy")
    return torch.cat([one_d(dim // 2, gw), one_d(dim // 2, gh)], dim=1).float()


@pytest.mark.parametrize("dim,side", [(192, 7), (384, 16), (80, 5)])
def test_sincos_matches_official_layout(dim, side):
    torch.testing.assert_close(sincos_2d(dim, side, side), _official_sincos(dim, side), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(VIT_SIZES))
def test_official_sizes_build_on_meta(name):
    dim, depth, heads, mlp_ratio = VIT_SIZES[name]
    with torch.device("meta"):
        model = VisionTransformer(img_size=224, patch_size=14, embed_dim=dim, depth=depth, num_heads=heads,
                                  mlp_ratio=mlp_ratio)
    assert len(model.blocks) == depth and model.num_patches == 256
    assert model.blocks[0].mlp.fc1.out_features == int(dim * mlp_ratio)
    assert all(p.is_meta for p in model.parameters())


def test_vit_huge_parameter_count():
    with torch.device("meta"):
        from fastjepa.models import vit_huge
        model = vit_huge(patch_size=14)
    # 32 blocks of (4*1280^2 + 8*1280^2 weights + biases + norms) + patch embed + final norm (+ frozen pos_embed).
    per_block = 12 * 1280 * 1280 + (3 * 1280 + 1280 + 4 * 1280 + 1280) + 4 * 1280
    expected = 32 * per_block + (3 * 14 * 14 * 1280 + 1280) + 2 * 1280 + 256 * 1280
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("img,patch", [(32, 4), ((32, 48), 8), (28, 7)])
def test_encoder_shapes(img, patch):
    model = vit_tiny(patch_size=patch, img_size=img, depth=2)
    h, w = (img, img) if isinstance(img, int) else img
    x = torch.randn(3, 3, h, w)
    n = (h // patch) * (w // patch)
    assert model(x).shape == (3, n, 192)
    masks = [torch.randint(0, n, (3, 5)), torch.randint(0, n, (3, 5))]
    assert model(x, torch.stack(masks)).shape == (6, 5, 192)


def test_encoder_rejects_wrong_resolution():
    model = vit_tiny(patch_size=4, img_size=32, depth=1)
    with pytest.raises(ValueError, match="built for 64"):
        model(torch.randn(1, 3, 36, 36))
    with pytest.raises(ValueError, match="not divisible"):
        vit_tiny(patch_size=5, img_size=32)


def test_predictor_shapes_with_several_context_blocks():
    pred = VisionTransformerPredictor((4, 4), embed_dim=64, predictor_embed_dim=32, depth=1, num_heads=2)
    B, nenc, M = 3, 2, 4
    masks_enc = [torch.randint(0, 16, (B, 6)) for _ in range(nenc)]
    masks_pred = [torch.randint(0, 16, (B, 3)) for _ in range(M)]
    out = pred(torch.randn(nenc * B, 6, 64), Masks.from_lists(masks_enc, masks_pred))
    assert out.shape == (M * nenc * B, 3, 64)


def test_official_initialisation_statistics():
    torch.manual_seed(0)
    model = vit_tiny(patch_size=16, img_size=224)
    w = model.blocks[5].attn.proj.weight
    # The official init_model re-initialises every Linear after the depth rescaling: std 0.02 everywhere.
    assert math.isclose(w.std().item(), 0.02, rel_tol=0.05)
    assert math.isclose(model.blocks[0].mlp.fc2.weight.std().item(), 0.02, rel_tol=0.05)
    assert model.blocks[3].attn.qkv.bias.abs().max() == 0 and model.norm.weight.eq(1).all()
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("n", [5, 69])
def test_sdpa_matches_math(n):
    torch.manual_seed(0)
    sdpa = Attention(48, 3, backend="sdpa")
    math_ = Attention(48, 3, backend="math")
    math_.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, n, 48, dtype=torch.float64)
    sdpa, math_ = sdpa.double(), math_.double()
    torch.testing.assert_close(sdpa(x), math_(x), rtol=1e-12, atol=1e-12)
    # fp32: the two orderings differ by rounding only.
    x32 = x.float()
    ref = math_(x)
    err_sdpa = (sdpa.float()(x32).double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    assert err_sdpa < 1e-6


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown attention backend"):
        Attention(32, 2, backend="flash3000")
