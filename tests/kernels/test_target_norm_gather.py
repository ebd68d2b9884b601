"""target_norm_gather and the fused target_norm_smooth_l1 loss against the references (interpreter on CPU)."""

import pytest
import torch
from kernel_utils import assert_matches, random_masks

from fastjepa.kernels import mask_index, target_norm_gather, target_norm_gather_ref
from fastjepa.kernels.target_norm_gather import (
    target_norm_gather_fwd,
    target_norm_smooth_l1,
    target_norm_smooth_l1_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name: (B, N, D, K, M target blocks, nenc)
CASES = {
    "vit_like": (2, 16, 32, 5, 4, 1),
    "k1_nenc2": (2, 16, 24, 1, 2, 2),
    "k_eq_n": (1, 16, 24, 16, 1, 1),
    "d80_n69": (2, 69, 80, 11, 2, 1),
    "d24_n113_nenc3": (2, 113, 24, 17, 3, 3),
    "tail_d40": (3, 9, 40, 3, 1, 2),
}


def make(case, dtype, seed=0):
    batch, n, d, k, m, nenc = CASES[case]
    g = torch.Generator().manual_seed(seed)
    # An offset and scale so that the normalisation does real work.
    h = (3.0 + 2.0 * torch.randn(batch, n, d, generator=g)).to(DEVICE, dtype)
    pred = torch.randn(m * nenc * batch, k, d, generator=g).to(DEVICE, dtype)
    return h, random_masks(m, batch, n, k, g, DEVICE), nenc, pred


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_targets_into_nan_poisoned_output(case, dtype):
    h, masks, nenc, pred = make(case, dtype)
    out = torch.full_like(pred, float("nan"))
    target_norm_gather_fwd(h, mask_index(masks, h.shape[0], h.shape[1], "test"), nenc, out=out)
    exact = target_norm_gather_ref(h.double(), masks, nenc)
    assert_matches(out, target_norm_gather_ref(h, masks, nenc), exact, case)
    assert_matches(target_norm_gather(h, masks, nenc), target_norm_gather_ref(h, masks, nenc), exact, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_loss_and_its_gradient(case, dtype):
    h, masks, nenc, pred = make(case, dtype)
    pred.requires_grad_(True)
    loss = target_norm_smooth_l1(pred, h, masks, nenc)
    assert "TargetNormSmoothL1" in type(loss.grad_fn).__name__
    (grad,) = torch.autograd.grad(2.5 * loss, pred)
    plain_loss = target_norm_smooth_l1_ref(pred, h, masks, nenc)
    (plain_grad,) = torch.autograd.grad(2.5 * plain_loss, pred)
    pred64 = pred.detach().double().requires_grad_(True)
    exact_loss = target_norm_smooth_l1_ref(pred64, h.double(), masks, nenc)
    (exact_grad,) = torch.autograd.grad(2.5 * exact_loss, pred64)
    assert loss.dtype == dtype
    assert_matches(loss.reshape(1), plain_loss.reshape(1), exact_loss.reshape(1), f"{case} loss")
    assert_matches(grad, plain_grad, exact_grad, f"{case} grad")


def test_fused_loss_under_autocast_is_fp32_like_the_reference():
    h, masks, nenc, pred = make("vit_like", torch.float16)
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss = target_norm_smooth_l1(pred, h, masks, nenc)
        ref = target_norm_smooth_l1_ref(pred, h, masks, nenc)
    exact = target_norm_smooth_l1_ref(pred.double(), h.double(), masks, nenc)
    assert loss.dtype == ref.dtype == torch.float32
    assert_matches(loss.reshape(1), ref.reshape(1), exact.reshape(1), "autocast loss")


def test_loss_exercises_both_branches_of_smooth_l1():
    h, masks, nenc, pred = make("vit_like", torch.float32)
    diff = pred - target_norm_gather_ref(h, masks, nenc)
    assert (diff.abs() < 1).any() and (diff.abs() > 1).any()


def test_reference_runs_when_h_needs_a_gradient():
    h, masks, nenc, _ = make("vit_like", torch.float32)
    out = target_norm_gather(h.requires_grad_(True), masks, nenc)
    assert out.grad_fn is not None


def test_pred_shape_mismatch_is_a_clear_error():
    h, masks, nenc, pred = make("k1_nenc2", torch.float32)
    with pytest.raises(ValueError, match="expected \\[M\\*nenc\\*B, K, D\\]"):
        target_norm_smooth_l1(pred[1:], h, masks, nenc)


@pytest.mark.gpu
def test_targets_under_cuda_autocast_are_fp32_like_the_reference():
    h, masks, nenc, _ = make("d80_n69", torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, ref = target_norm_gather(h, masks, nenc), target_norm_gather_ref(h, masks, nenc)
    assert out.dtype == ref.dtype == torch.float32
    assert_matches(out, ref, target_norm_gather_ref(h.double(), masks, nenc), "autocast targets")


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_on_gpu(case):
    h, masks, nenc, pred = make(case, torch.bfloat16)
    exact = target_norm_gather_ref(h.double(), masks, nenc)
    assert_matches(target_norm_gather(h, masks, nenc), target_norm_gather_ref(h, masks, nenc), exact, case)
    pred.requires_grad_(True)
    (grad,) = torch.autograd.grad(target_norm_smooth_l1(pred, h, masks, nenc), pred)
    (plain_grad,) = torch.autograd.grad(target_norm_smooth_l1_ref(pred, h, masks, nenc), pred)
    pred64 = pred.detach().double().requires_grad_(True)
    (exact_grad,) = torch.autograd.grad(target_norm_smooth_l1_ref(pred64, h.double(), masks, nenc), pred64)
    assert_matches(grad, plain_grad, exact_grad, case)


def final_norm(d, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    weight, bias = 1 + 0.5 * torch.randn(d, generator=g), torch.randn(d, generator=g)
    return weight.to(DEVICE, dtype), bias.to(DEVICE, dtype), 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["vit_like", "d80_n69", "d24_n113_nenc3"])
def test_the_encoders_final_norm_fused_on_the_gathered_rows(case, dtype):
    # h is the last block's output; the kernels apply the final LayerNorm (affine) and then the targets' own.
    h, masks, nenc, pred = make(case, dtype)
    norm = final_norm(h.shape[-1], dtype)
    norm64 = (norm[0].double(), norm[1].double(), norm[2])
    out = torch.full_like(pred, float("nan"))
    target_norm_gather_fwd(h, mask_index(masks, h.shape[0], h.shape[1], "test"), nenc, out=out, norm_weight=norm[0],
                           norm_bias=norm[1], norm_eps=norm[2])
    exact = target_norm_gather_ref(h.double(), masks, nenc, norm=norm64)
    assert_matches(out, target_norm_gather_ref(h, masks, nenc, norm=norm), exact, case)
    assert_matches(target_norm_gather(h, masks, nenc, norm=norm), target_norm_gather_ref(h, masks, nenc, norm=norm),
                   exact, case)
    pred.requires_grad_(True)
    loss = target_norm_smooth_l1(pred, h, masks, nenc, norm=norm)
    (grad,) = torch.autograd.grad(loss, pred)
    plain = target_norm_smooth_l1_ref(pred, h, masks, nenc, norm=norm)
    (plain_grad,) = torch.autograd.grad(plain, pred)
    pred64 = pred.detach().double().requires_grad_(True)
    exact_loss = target_norm_smooth_l1_ref(pred64, h.double(), masks, nenc, norm=norm64)
    (exact_grad,) = torch.autograd.grad(exact_loss, pred64)
    assert_matches(loss.reshape(1), plain.reshape(1), exact_loss.reshape(1), f"{case} loss")
    assert_matches(grad, plain_grad, exact_grad, f"{case} grad")


def test_a_final_norm_of_the_wrong_width_is_a_clear_error():
    h, masks, nenc, pred = make("vit_like", torch.float32)
    with pytest.raises(ValueError, match=r"final LayerNorm.*\[32\]"):
        target_norm_smooth_l1(pred, h, masks, nenc, norm=final_norm(31, torch.float32))
