"""masked_gather: the Triton kernels (interpreter on CPU) against the PyTorch reference, forward and backward."""

import pytest
import torch
from kernel_utils import assert_matches, random_masks

from fastjepa.kernels import mask_index, masked_gather, masked_gather_ref, set_backend
from fastjepa.kernels.masked_gather import masked_gather_bwd, masked_gather_fwd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name: (B, N, D, K, M, with pos_embed)
CASES = {
    "vit_like": (2, 16, 32, 7, 1, True),
    "k1": (2, 16, 24, 1, 2, False),
    "k_eq_n": (2, 16, 24, 16, 2, True),
    "d80_n69": (2, 69, 80, 13, 1, True),
    "d24_n113_m4": (3, 113, 24, 29, 4, False),
    "tail_d40": (1, 9, 40, 5, 3, True),
}


def make(case, dtype, seed=0):
    batch, n, d, k, m, with_pos = CASES[case]
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, n, d, generator=g).to(DEVICE, dtype)
    pos = torch.randn(1, n, d, generator=g).to(DEVICE, dtype) if with_pos else None
    return tokens, random_masks(m, batch, n, k, g, DEVICE), pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_into_nan_poisoned_output(case, dtype):
    tokens, masks, pos = make(case, dtype)
    idx = mask_index(masks, tokens.shape[0], tokens.shape[1], "test")
    out = torch.full((idx.shape[0] * idx.shape[1], idx.shape[2], tokens.shape[2]), float("nan"), dtype=dtype,
                     device=DEVICE)
    masked_gather_fwd(tokens, idx, pos, out=out)
    exact = masked_gather_ref(tokens.double(), masks, None if pos is None else pos.double())
    assert_matches(out, masked_gather_ref(tokens, masks, pos), exact, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_autograd_of_reference(case, dtype):
    tokens, masks, pos = make(case, dtype)
    tokens.requires_grad_(True)
    if pos is not None:
        pos.requires_grad_(True)
    inputs = [tokens] + ([pos] if pos is not None else [])
    grad = torch.randn(len(masks) * tokens.shape[0], masks[0].shape[1], tokens.shape[2]).to(DEVICE, dtype)

    out = masked_gather(tokens, masks, pos)
    fused = torch.autograd.grad(out, inputs, grad)
    plain = torch.autograd.grad(masked_gather_ref(tokens, masks, pos), inputs, grad)
    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    exact = torch.autograd.grad(
        masked_gather_ref(inputs64[0], masks, inputs64[1] if pos is not None else None), inputs64, grad.double()
    )
    assert out.grad_fn is not None and "MaskedGather" in type(out.grad_fn).__name__
    for name, f, p, e in zip(["tokens", "pos_embed"], fused, plain, exact, strict=False):
        assert f.dtype == dtype
        assert_matches(f, p, e, f"{case} grad {name}")


def test_backward_writes_every_element_of_the_gradient():
    tokens, masks, _ = make("d80_n69", torch.float32)
    idx = mask_index(masks, tokens.shape[0], tokens.shape[1], "test")
    grad = torch.randn(idx.shape[0] * idx.shape[1], idx.shape[2], tokens.shape[2], device=DEVICE)
    dx = torch.full_like(tokens, float("nan"))
    masked_gather_bwd(grad, idx, tokens.shape[1], dx.dtype, out=dx)
    ref = torch.autograd.grad(masked_gather_ref(tokens.requires_grad_(True), masks), tokens, grad)[0]
    torch.testing.assert_close(dx, ref, rtol=0, atol=0)


def test_switch_off_runs_the_reference():
    tokens, masks, pos = make("vit_like", torch.float32)
    set_backend("reference")
    try:
        out = masked_gather(tokens.requires_grad_(True), masks, pos)
    finally:
        set_backend("auto")
    assert "MaskedGather" not in type(out.grad_fn).__name__


def test_repeated_indices_add_their_gradients_like_torch_gather():
    tokens = torch.randn(2, 8, 24, device=DEVICE, requires_grad=True)
    masks = torch.tensor([[[1, 3, 3, 3, 0], [7, 7, 2, 5, 6]], [[3, 4, 5, 6, 1]] * 2], device=DEVICE)
    out = masked_gather(tokens, masks)
    grad = torch.randn_like(out)
    (fused,) = torch.autograd.grad(out, tokens, grad)
    (ref,) = torch.autograd.grad(masked_gather_ref(tokens, masks), tokens, grad)
    torch.testing.assert_close(fused, ref)


def test_bad_masks_name_the_problem_and_the_fix():
    tokens = torch.randn(2, 8, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"masks has shape \(2, 3\); expected \[M, B, K\] with B = 2"):
        masked_gather(tokens, torch.zeros(2, 3, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match=r"masks is a list; pass one \[M, B, K\] index tensor \(torch.stack"):
        masked_gather(tokens, [torch.zeros(2, 3, dtype=torch.long, device=DEVICE)])


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_on_gpu(case):
    tokens, masks, pos = make(case, torch.bfloat16)
    tokens.requires_grad_(True)
    out = masked_gather(tokens, masks, pos)
    grad = torch.randn_like(out)
    exact_in = tokens.detach().double().requires_grad_(True)
    exact = masked_gather_ref(exact_in, masks, None if pos is None else pos.double())
    assert_matches(out, masked_gather_ref(tokens, masks, pos), exact, case)
    (fused_grad,) = torch.autograd.grad(out, tokens, grad)
    (plain_grad,) = torch.autograd.grad(masked_gather_ref(tokens, masks, pos), tokens, grad)
    (exact_grad,) = torch.autograd.grad(exact, exact_in, grad.double())
    assert_matches(fused_grad, plain_grad, exact_grad, case)

