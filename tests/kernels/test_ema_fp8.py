"""ema_update_fp8: the EMA of the FP8 target's Linear weights writing their e4m3 rows and scales in the same pass,
against the EMA followed by the FP8 forward's own quantisation (interpreter on CPU, bit for bit on a GPU)."""

import copy

import pytest
import torch
from kernel_utils import assert_matches

from fastjepa.ijepa import IJEPA
from fastjepa.kernels import ema_update_fp8, ema_update_ref
from fastjepa.kernels.ema_fp8 import E4M3, quantize_rowwise
from fastjepa.models import VisionTransformer, VisionTransformerPredictor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 40), (7, 129), (1, 5)]  # odd rows and columns, a row wider than a power of two


def weights(seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes: each row's scale must be its own
    return [(torch.randn(s, generator=g) * torch.logspace(-3, 2, s[0])[:, None]).to(DEVICE) for s in shapes]


def buffers(shapes=SHAPES, copy_dtype=torch.float16):
    nan = float("nan")
    return ([torch.full(s, nan, device=DEVICE).to(E4M3) for s in shapes],
            [torch.full((s[0], 1), nan, device=DEVICE) for s in shapes],
            [torch.full(s, nan, device=DEVICE, dtype=copy_dtype) for s in shapes])


def interpreter_binade_slips(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Where the Triton interpreter's e4m3 cast is wrong: a value that rounds up to a power of two comes out at half
    of it (31.9 -> 16). Empty on a GPU."""
    if DEVICE == "cuda":
        return torch.zeros_like(want, dtype=torch.bool)
    w = want.float().abs()
    power_of_two = (w > 0) & (torch.log2(w) == torch.log2(w).round())
    return power_of_two & (got.float() == want.float() / 2)


def test_targets_copies_scales_and_e4m3_rows_match_the_ema_then_quantisation():
    target, online = weights(0), weights(1)
    plain, exact = copy.deepcopy(target), [t.double() for t in target]
    q, scale, copies = buffers()
    ema_update_fp8(target, online, 0.996, q, scale, copy=copies)
    ema_update_ref(plain, online, 0.996)
    ema_update_ref(exact, [o.double() for o in online], 0.996)
    for i, t in enumerate(target):
        assert_matches(t, plain[i], exact[i], f"target {i}")
        torch.testing.assert_close(copies[i], t.to(copies[i].dtype), rtol=0, atol=0)
        want_q, want_scale = quantize_rowwise(t)  # the FP8 forward's quantisation of the new target
        torch.testing.assert_close(scale[i], want_scale, rtol=0, atol=0)
        slips = interpreter_binade_slips(q[i], want_q)
        assert slips.float().mean() < 0.05, f"weight {i}: {int(slips.sum())} elements slipped"
        assert torch.equal(q[i].float()[~slips], want_q.float()[~slips]), f"weight {i}: e4m3 rows differ"


def test_bad_buffers_are_refused_naming_the_weight():
    target, online = weights(0), weights(1)
    q, scale, _ = buffers()
    with pytest.raises(ValueError, match=r"weight 1 has target \(7, 129\).*scale \(7, 2\)"):
        ema_update_fp8(target, online, 0.9, q, [scale[0], torch.zeros(7, 2, device=DEVICE), scale[2]])
    with pytest.raises(ValueError, match="3 target weights but 2 weight_e4m3"):
        ema_update_fp8(target, online, 0.9, q[:2], scale)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_fp8(target, online, 1.5, q, scale)


def test_the_fp8_target_keeps_its_e4m3_weights_through_the_ema(reference_ops):
    """IJEPA with an FP8 target replica: after updates (and a reload of the target), every FP8 layer holds the
    quantisation of its fp32 target weight, so the forward quantises no weight."""
    torch.manual_seed(0)
    model = IJEPA(VisionTransformer(16, 4, 3, 32, 2, 4), VisionTransformerPredictor((4, 4), 32, 16, 1, 4))
    model.enable_target_replica(torch.bfloat16, fp8=True)
    layers = model.held_fp8_layers()
    assert len(layers) == 8  # qkv, proj, fc1 and fc2 of both blocks
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    for _ in range(2):
        model.update_target(0.9)
    source = dict(zip(map(id, model.target_replica.parameters()), model.target_encoder.parameters(), strict=True))
    for layer in layers:
        want_q, want_scale = quantize_rowwise(source[id(layer.weight)])
        assert torch.equal(layer.weight_e4m3.float(), want_q.float()) and torch.equal(layer.weight_scale, want_scale)
    model.target_encoder.load_state_dict(model.encoder.state_dict())  # e.g. a checkpoint loaded into the target
    model.sync_target_replica()
    assert torch.equal(layers[0].weight_e4m3.float(), quantize_rowwise(model.encoder.blocks[0].attn.qkv.weight)[0]
                       .float())


@pytest.mark.gpu
def test_bf16_copy_and_e4m3_rows_bit_for_bit_on_gpu():
    target, online = weights(0), weights(1)
    q, scale, copies = buffers(copy_dtype=torch.bfloat16)
    plain = copy.deepcopy(target)
    ema_update_fp8(target, online, 0.996, q, scale, copy=copies)
    ema_update_ref(plain, online, 0.996)
    for i, t in enumerate(target):
        want_q, want_scale = quantize_rowwise(t)
        assert torch.equal(q[i].float(), want_q.float()) and torch.equal(scale[i], want_scale)
        assert torch.equal(copies[i], t.bfloat16())
