"""add_layer_norm and bias_gelu (the fused ViT block ops) against their references, forward and backward
(interpreter on CPU): odd sizes, a strided residual stream, NaN-poisoned outputs, and no graph break when compiled."""

import pytest
import torch
from kernel_utils import assert_matches

from fastjepa.kernels import add_layer_norm, add_layer_norm_ref, bias_gelu, bias_gelu_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, L, D): odd row counts and widths that are not powers of two (ViT-H's 1280 is not either).
SHAPES = [(2, 5, 24), (3, 7, 80), (1, 1, 40), (2, 33, 160)]


@pytest.fixture(autouse=True)
def nan_poisoned_outputs():
    """torch.empty fills float tensors with NaN: an element a kernel never writes shows up in the comparisons."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    was = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = was
    torch.use_deterministic_algorithms(False)


def tensors(shape, dtype, seed=0, *sizes):
    g = torch.Generator().manual_seed(seed)
    return [(1.5 + 2.0 * torch.randn(s, generator=g)).to(DEVICE, dtype).requires_grad_() for s in sizes]


def grads(fn, inputs, upstream):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    got = torch.autograd.grad(outs, inputs, upstream[:len(outs)])
    return [o.detach() for o in outs], got


def check(fn, ref, inputs, upstream, name):
    """fn's outputs and input gradients match ref's in the same dtype as closely as the fp64 oracle allows."""
    exact_in = [t.detach().double().requires_grad_() for t in inputs]
    outs, got = grads(fn, inputs, upstream)
    plain_outs, plain = grads(ref, inputs, upstream)
    exact_outs, exact = grads(ref, exact_in, [u.double() for u in upstream])
    for i, (o, p, e) in enumerate(zip(outs, plain_outs, exact_outs, strict=True)):
        assert_matches(o, p.to(o.dtype), e, f"{name} output {i}")
    for i, (o, p, e) in enumerate(zip(got, plain, exact, strict=True)):
        assert_matches(o, p, e, f"{name} gradient of input {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_layer_norm_forward_and_backward(shape, dtype):
    d = shape[-1]
    x, y, w, b = tensors(shape, dtype, 0, shape, shape, (d,), (d,))
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(2)]
    check(lambda *t: add_layer_norm(*t, eps=1e-6), lambda *t: add_layer_norm_ref(*t, eps=1e-6), [x, y, w, b],
          upstream, f"add_layer_norm {shape}")


def test_add_layer_norm_reads_a_strided_residual_in_place():
    # The block passes x[:, queries_from:]: rows strided across the batch; its gradient lands in those rows only.
    full, y, w, b = tensors((2, 9, 24), torch.float32, 2, (2, 9, 24), (2, 5, 24), (24,), (24,))
    upstream = [torch.randn(2, 5, 24, device=DEVICE) for _ in range(2)]
    check(lambda f, *t: add_layer_norm(f[:, 4:], *t), lambda f, *t: add_layer_norm_ref(f[:, 4:], *t),
          [full, y, w, b], upstream, "strided x")


def test_add_layer_norm_without_the_residual_gradient():
    # Only the normalised output is used downstream: ds is None in the backward.
    x, y, w, b = tensors((2, 5, 24), torch.float32, 3, (2, 5, 24), (2, 5, 24), (24,), (24,))
    _, out = add_layer_norm(x, y, w, b)
    got = torch.autograd.grad(out.sum(), (x, y, w, b))
    _, ref = add_layer_norm_ref(x, y, w, b)
    want = torch.autograd.grad(ref.sum(), (x, y, w, b))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 24), (3, 7, 96), (1, 3, 1100)])
def test_bias_gelu_forward_and_backward(shape, dtype):
    h, b = tensors(shape, dtype, 4, shape, (shape[-1],))
    upstream = [torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)]
    check(bias_gelu, bias_gelu_ref, [h, b], upstream, f"bias_gelu {shape}")


def test_bias_gelu_keeps_the_activation_dtype_with_fp32_bias():
    h = torch.randn(2, 3, 8, device=DEVICE, dtype=torch.float16)
    assert bias_gelu(h, torch.randn(8, device=DEVICE)).dtype == torch.float16


def test_shape_errors_name_the_parameter():
    x = torch.randn(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"parameter of shape \(7,\).*\[8\]"):
        add_layer_norm(x, x, torch.ones(7, device=DEVICE), torch.zeros(8, device=DEVICE))
    with pytest.raises(ValueError, match=r"x \(2, 3, 8\) and y \(2, 4, 8\)"):
        add_layer_norm(x, torch.randn(2, 4, 8, device=DEVICE), torch.ones(8, device=DEVICE),
                       torch.zeros(8, device=DEVICE))
    with pytest.raises(ValueError, match="bias_gelu"):
        bias_gelu(x, torch.zeros(3, device=DEVICE))


def test_compiles_without_graph_breaks():
    x, y, w, b = tensors((2, 5, 24), torch.float32, 6, (2, 5, 24), (2, 5, 24), (24,), (24,))
    h = torch.randn(2, 5, 24, device=DEVICE)

    def block_tail(x, y, w, b, h):
        s, out = add_layer_norm(x, y, w, b)
        return s + bias_gelu(out, b) + h

    compiled = torch.compile(block_tail, backend="aot_eager", fullgraph=True)
    got = compiled(x, y, w, b, h)
    want = block_tail(x, y, w, b, h)
    torch.testing.assert_close(got, want)
    got.sum().backward()


def test_fake_implementations_match_the_kernels():
    x, y, w, b = (t.detach() for t in tensors((2, 5, 24), torch.float32, 7, (2, 5, 24), (2, 5, 24), (24,), (24,)))
    s, out, mean, rstd = torch.ops.fastjepa.add_layer_norm_fwd(x, y, w, b, 1e-6, torch.float32)
    cases = {
        "add_layer_norm_fwd": (x, y, w, b, 1e-6, torch.float16),
        "add_layer_norm_bwd": (s, mean, rstd, w, out, s),
        "bias_gelu_fwd": (x, b),
        "bias_gelu_bwd": (x, b, y),
    }
    for op, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.fastjepa, op), args, test_utils=("test_schema", "test_faketensor"))


def under_autocast(fn, inputs, upstream):
    with torch.autocast("cuda", torch.bfloat16):
        return grads(fn, inputs, upstream)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 71, 1280), (16, 115, 384)])  # ViT-H/14 context and predictor widths
def test_bf16_under_autocast_on_gpu(shape):
    """As the step runs them: bf16 activations, fp32 parameters, autocast. Outputs in bf16 (what the next GEMM
    reads) and every gradient as close to fp64 as PyTorch's own ops under autocast are."""
    d = shape[-1]
    x, y = tensors(shape, torch.bfloat16, 8, shape, shape)
    w, b = tensors(shape, torch.float32, 9, (d,), (d,))
    (h,), (hb,) = tensors(shape, torch.bfloat16, 10, (*shape[:-1], 4 * d)), tensors(shape, torch.float32, 11, (4 * d,))
    for fused, ref, inputs in ((add_layer_norm, add_layer_norm_ref, [x, y, w, b]), (bias_gelu, bias_gelu_ref, [h, hb])):
        n_out = 2 if fused is add_layer_norm else 1
        upstream = [torch.randn(inputs[0].shape, device=DEVICE, dtype=torch.bfloat16) for _ in range(n_out)]
        outs, got = under_autocast(fused, inputs, upstream)
        plain_outs, plain = under_autocast(ref, inputs, upstream)
        exact_outs, exact = grads(ref, [t.detach().double().requires_grad_() for t in inputs],
                                  [u.double() for u in upstream])
        assert all(o.dtype == torch.bfloat16 for o in outs), [o.dtype for o in outs]
        for o, p, e in zip(outs, plain_outs, exact_outs, strict=True):
            assert_matches(o, p.to(o.dtype), e, f"{fused.__name__} output")
        for o, p, e in zip(got, plain, exact, strict=True):
            assert_matches(o, p, e, f"{fused.__name__} gradient")
