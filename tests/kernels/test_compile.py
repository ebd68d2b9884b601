"""torch.compile traces through the fused ops (registered torch.library ops with fake implementations): one
fullgraph compile of the I-JEPA glue (context gather, predictor input, targets, fused loss) equals eager."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_utils import KERNEL_FILES, random_masks

from fastjepa.kernels import mask_index, masked_gather, predictor_tokens, target_norm_gather
from fastjepa.kernels.target_norm_gather import target_norm_smooth_l1

B, N, D, KC, KT, NENC, M = 2, 16, 8, 5, 3, 2, 2
TESTS = Path(__file__).resolve().parents[1]  # where kernel_utils lives, under the repository root


def glue(tokens, pos, mask_token, h, masks_enc, masks_pred):
    ctx = masked_gather(tokens, masks_enc, pos)  # [nenc*B, Kc, D]
    z = predictor_tokens(ctx, masks_enc, masks_pred, mask_token, pos)[:, KC:]  # [M*nenc*B, Kt, D]
    return target_norm_smooth_l1(z, h, masks_pred, NENC) + target_norm_gather(h, masks_pred, NENC).mean() * 0.5


def inputs():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(B, N, D, generator=g, requires_grad=True)
    mask_token = torch.randn(1, 1, D, generator=g, requires_grad=True)
    pos, h = torch.randn(1, N, D, generator=g), torch.randn(B, N, D, generator=g)
    return tokens, pos, mask_token, h, random_masks(NENC, B, N, KC, g), random_masks(M, B, N, KT, g)


def test_fullgraph_compile_equals_eager():
    args = inputs()
    eager = glue(*args)
    eager_grads = torch.autograd.grad(eager, [args[0], args[2]])
    compiled = torch.compile(glue, backend="aot_eager", fullgraph=True)(*args)
    compiled_grads = torch.autograd.grad(compiled, [args[0], args[2]])
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for c, e in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["masked_gather_fwd", "target_norm_gather", "predictor_tokens_fwd"])
def test_fake_implementations_match_the_kernels(op):
    tokens, pos, mask_token, h, masks_enc, masks_pred = inputs()
    idx_enc, idx_pred = mask_index(masks_enc, B, N, "test"), mask_index(masks_pred, B, N, "test")
    args = {
        "masked_gather_fwd": (tokens.detach(), idx_enc, pos),
        "target_norm_gather": (h, idx_pred, NENC, 1e-5, torch.float32),
        "predictor_tokens_fwd": (torch.randn(NENC * B, KC, D), idx_enc, idx_pred, mask_token.detach(), pos),
    }[op]
    torch.library.opcheck(getattr(torch.ops.fastjepa, op), args, test_utils=("test_schema", "test_faketensor"))


def test_triton_kernels_compile_for_sm90_with_vector_accesses():
    """The GPU path, checked without a GPU: every kernel compiles to an sm_90 cubin, and its bulk loads and stores
    are 16-byte vectors (a regression here costs bandwidth on the device)."""
    code = ("import json; from kernel_utils import compile_kernels_for; "
            "print(json.dumps(compile_kernels_for(90)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and ("ptxas" in proc.stderr or "backend" in proc.stderr.lower()):
        pytest.skip(f"Triton cannot compile for CUDA here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    accesses = json.loads(proc.stdout.strip().splitlines()[-1])
    specs = {name for module in KERNEL_FILES
             for name in importlib.import_module(f"fastjepa.kernels.{module}").COMPILE_SPECS}
    assert set(accesses) == specs
    for name, ops in accesses.items():
        assert any(op.startswith("ld.global.v4") for op in ops), f"{name}: no vectorised loads in {ops}"
        if name != "target_norm_smooth_l1_fwd":  # writes one fp32 partial per program
            assert any(op.startswith("st.global.v") for op in ops), f"{name}: no vectorised stores in {ops}"
