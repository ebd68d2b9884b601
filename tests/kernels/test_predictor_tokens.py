"""predictor_tokens: the fused predictor input (forward and backward) against the reference (interpreter on CPU)."""

import pytest
import torch
from kernel_utils import assert_matches, random_masks

from fastjepa.kernels import mask_index, predictor_tokens, predictor_tokens_ref
from fastjepa.kernels.predictor_tokens import predictor_tokens_bwd, predictor_tokens_fwd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name: (B, N, D, Kc, Kt, nenc, M)
CASES = {
    "vit_like": (2, 16, 32, 7, 3, 1, 4),
    "k1": (2, 16, 24, 1, 1, 2, 2),
    "kc_eq_n": (1, 16, 24, 16, 5, 1, 2),
    "d80_n69": (2, 69, 80, 13, 6, 1, 2),
    "d24_n113_nenc2": (2, 113, 24, 20, 9, 2, 3),
    "tail_d40_kt_gt_kc": (3, 9, 40, 2, 5, 1, 1),
}


def make(case, dtype, seed=0, pos_grad=False):
    batch, n, d, kc, kt, nenc, m = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nenc * batch, kc, d, generator=g).to(DEVICE, dtype).requires_grad_(True)
    mask_token = torch.randn(1, 1, d, generator=g).to(DEVICE, dtype).requires_grad_(True)
    pos = torch.randn(1, n, d, generator=g).to(DEVICE, dtype).requires_grad_(pos_grad)
    return x, random_masks(nenc, batch, n, kc, g, DEVICE), random_masks(m, batch, n, kt, g, DEVICE), mask_token, pos


def check_against_reference(case, dtype, pos_grad):
    x, masks_enc, masks_pred, mask_token, pos = make(case, dtype, pos_grad=pos_grad)
    inputs = [x, mask_token] + ([pos] if pos_grad else [])
    out = predictor_tokens(x, masks_enc, masks_pred, mask_token, pos)
    assert "PredictorTokens" in type(out.grad_fn).__name__
    plain = predictor_tokens_ref(x, masks_enc, masks_pred, mask_token, pos)
    inputs64 = [t.detach().double().requires_grad_(True) for t in (x, mask_token, pos)]
    exact = predictor_tokens_ref(inputs64[0], masks_enc, masks_pred, inputs64[1], inputs64[2])
    assert_matches(out, plain, exact, case)
    grad = torch.randn(out.shape).to(DEVICE, dtype)
    fused_grads = torch.autograd.grad(out, inputs, grad)
    plain_grads = torch.autograd.grad(plain, inputs, grad)
    exact_grads = torch.autograd.grad(exact, inputs64[: len(inputs)], grad.double())
    for name, f, p, e in zip(["x", "mask_token", "pos_embed"], fused_grads, plain_grads, exact_grads, strict=False):
        assert f.dtype == dtype and f.shape == e.shape
        assert_matches(f, p, e, f"{case} grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grad_match_reference(case, dtype):
    check_against_reference(case, dtype, pos_grad=False)


@pytest.mark.parametrize("case", ["vit_like", "d24_n113_nenc2"])
def test_positional_embedding_gradient(case):
    check_against_reference(case, torch.float32, pos_grad=True)


@pytest.mark.parametrize("case", ["k1", "d24_n113_nenc2", "tail_d40_kt_gt_kc"])
def test_every_element_written_forward_and_backward(case):
    x, masks_enc, masks_pred, mask_token, pos = make(case, torch.float32)
    batch = masks_enc[0].shape[0]
    idx_enc = mask_index(masks_enc, batch, pos.shape[1], "test")
    idx_pred = mask_index(masks_pred, batch, pos.shape[1], "test")
    ref = predictor_tokens_ref(x, masks_enc, masks_pred, mask_token, pos)
    out = torch.full(ref.shape, float("nan"), device=DEVICE)
    predictor_tokens_fwd(x.detach(), idx_enc, idx_pred, mask_token.detach(), pos, out=out)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn(ref.shape, device=DEVICE)
    dx = torch.full(x.shape, float("nan"), device=DEVICE)
    predictor_tokens_bwd(grad, batch, len(masks_enc), x.shape[1], x.dtype, dx=dx)
    (ref_dx,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(dx, ref_dx)


def test_x_that_does_not_match_masks_enc_is_a_clear_error():
    x, masks_enc, masks_pred, mask_token, pos = make("vit_like", torch.float32)
    with pytest.raises(ValueError, match="expected \\[nenc\\*B, Kc, D\\]"):
        predictor_tokens(x[:, 1:], masks_enc, masks_pred, mask_token, pos)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_on_gpu(case):
    check_against_reference(case, torch.bfloat16, pos_grad=False)
