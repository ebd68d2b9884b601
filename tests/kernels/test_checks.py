"""Bad indices and shapes fail loudly on every path of every op: the Triton path (interpreter on CPU), the
PyTorch reference, compiled code (a device-side assert, no host synchronisation) and the drop-in modules.
Unchecked, index N + k read the next image's token k and -1 the previous image's last one."""

import pytest
import torch
from kernel_utils import random_masks

from fastjepa.kernels import (
    ema_update,
    masked_gather,
    predictor_tokens,
    set_backend,
    target_norm_gather,
    target_norm_smooth_l1,
    target_norm_smooth_l1_ref,
)
from fastjepa.modules import MaskedGather, PredictorTokens, TargetNormGather, TargetNormSmoothL1Loss

B, N, D, KC, KT, NENC, M = 2, 16, 8, 5, 3, 1, 2


@pytest.fixture(params=["auto", "reference"], ids=["triton", "reference"])
def backend(request):
    set_backend(request.param)
    yield request.param
    set_backend("auto")


def inputs(bad: int | None = None, where: str = "pred"):
    g = torch.Generator().manual_seed(0)
    masks_enc, masks_pred = random_masks(NENC, B, N, KC, g), random_masks(M, B, N, KT, g)
    if bad is not None:
        (masks_pred if where == "pred" else masks_enc)[0, 1, 2] = bad
    return {"tokens": torch.randn(B, N, D, generator=g), "pos": torch.randn(1, N, D, generator=g),
            "mask_token": torch.randn(1, 1, D, generator=g), "x": torch.randn(NENC * B, KC, D, generator=g),
            "pred": torch.randn(M * NENC * B, KT, D, generator=g), "enc": masks_enc, "targets": masks_pred}


OPS = {
    "masked_gather": lambda a: masked_gather(a["tokens"], a["targets"], a["pos"]),
    "target_norm_gather": lambda a: target_norm_gather(a["tokens"], a["targets"], NENC),
    "target_norm_smooth_l1": lambda a: target_norm_smooth_l1(a["pred"], a["tokens"], a["targets"], NENC),
    "predictor_tokens": lambda a: predictor_tokens(a["x"], a["enc"], a["targets"], a["mask_token"], a["pos"]),
}


@pytest.mark.parametrize("bad", [N, N + 3, -1, 2**40])
@pytest.mark.parametrize("op", list(OPS))
def test_an_index_outside_the_grid_raises_naming_op_mask_and_range(op, bad, backend):
    name = "masks" if op == "masked_gather" else "masks_pred"
    with pytest.raises(IndexError, match=rf"{op}: {name}\[0, 1, 2\] = {bad} is outside \[0, {N}\)"):
        OPS[op](inputs(bad))


def test_a_bad_context_index_names_masks_enc(backend):
    with pytest.raises(IndexError, match=r"predictor_tokens: masks_enc\[0, 1, 2\] = -1"):
        OPS["predictor_tokens"](inputs(-1, where="enc"))


@pytest.mark.parametrize("op", list(OPS))
def test_compiled_code_asserts_on_the_device_without_a_host_sync(op):
    """fullgraph=True fails on any host read, so a compile that traces proves the check needs none; the
    assert it leaves in the graph fires at run time."""
    fn = torch.compile(OPS[op], backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    fn(inputs())  # in range: traces and runs
    name = "masks" if op == "masked_gather" else "masks_pred"
    with pytest.raises(RuntimeError, match=rf"{op}: {name} holds a token index outside \[0, {N}\)"):
        fn(inputs(N))


def test_shape_checks_are_the_same_on_both_paths(backend):
    a = inputs()
    with pytest.raises(ValueError, match=r"masked_gather: masks has shape \(2, 1, 3\); expected \[M, B, K\].*B = 2"):
        masked_gather(a["tokens"], a["targets"][:, :1], a["pos"])  # a smaller mask batch
    with pytest.raises(ValueError, match="masked_gather: pos_embed has shape"):
        masked_gather(a["tokens"], a["targets"], a["pos"][:, :, :4])
    with pytest.raises(ValueError, match=r"target_norm_smooth_l1: pred has shape \(1, 3, 8\)"):
        target_norm_smooth_l1(a["pred"][:1], a["tokens"], a["targets"], NENC)  # would broadcast
    for nenc in (0, -1):
        with pytest.raises(ValueError, match="num_context_blocks"):
            target_norm_gather(a["tokens"], a["targets"], nenc)
    with pytest.raises(ValueError, match="predictor_tokens: x has shape"):
        predictor_tokens(a["x"][:, 1:], a["enc"], a["targets"], a["mask_token"], a["pos"])


def test_ema_refuses_shapes_that_would_broadcast(backend):
    target, online = [torch.zeros(4, 3)], [torch.ones(1, 3)]
    with pytest.raises(ValueError, match=r"tensor 0 has target shape \(4, 3\), online \(1, 3\)"):
        ema_update(target, online, 0.9)
    with pytest.raises(ValueError, match="lists must pair up"):
        ema_update([], online, 0.9)


def test_an_empty_target_block_gives_the_references_nan_not_a_crash(backend):
    a = inputs()
    empty, pred = a["targets"][:, :, :0], a["pred"][:, :0]
    loss = target_norm_smooth_l1(pred, a["tokens"], empty, NENC)
    assert torch.isnan(loss) and torch.isnan(target_norm_smooth_l1_ref(pred, a["tokens"], empty, NENC))


def test_drop_in_modules_check_like_the_functionals(backend):
    a = inputs(N)
    modules = [lambda: MaskedGather()(a["tokens"], a["targets"]),
               lambda: TargetNormGather()(a["tokens"], a["targets"], NENC),
               lambda: TargetNormSmoothL1Loss()(a["pred"], a["tokens"], a["targets"], NENC),
               lambda: PredictorTokens(N, D)(a["x"], a["enc"], a["targets"])]
    for module in modules:
        with pytest.raises(IndexError, match=f"outside \\[0, {N}\\)"):
            module()
