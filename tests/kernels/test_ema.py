"""ema_update: the fused multi-tensor EMA (interpreter on CPU) against the official per-parameter loop."""

import copy

import pytest
import torch
from kernel_utils import assert_matches, one_process_mesh

from fastjepa.kernels import ema_update, ema_update_ref, set_backend
from fastjepa.kernels.ema import _TABLES, _groups, build_chunk_table, ema_update_fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Odd sizes, a scalar-like tensor, one that spans several chunks (65536 elements per chunk under the interpreter).
SHAPES = [(1,), (69,), (113, 3), (7, 80), (24,), (70000,)]


def params(dtype, seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(DEVICE, dtype) for s in shapes]


def check(dtype, copy_dtype=None, momentum=0.996):
    target, online = params(dtype, 0), params(dtype, 1)
    plain = copy.deepcopy(target)
    exact = [t.double() for t in target]
    copies = None if copy_dtype is None else [torch.full_like(t, float("nan"), dtype=copy_dtype) for t in target]
    ema_update(target, online, momentum, copy=copies)
    ema_update_ref(plain, online, momentum)
    ema_update_ref(exact, [o.double() for o in online], momentum)
    for i, (t, p, e) in enumerate(zip(target, plain, exact, strict=True)):
        assert_matches(t, p, e, f"tensor {i} {tuple(t.shape)}")
        if copies is not None:
            assert copies[i].dtype == copy_dtype
            torch.testing.assert_close(copies[i], t.to(copy_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_official_loop(dtype):
    check(dtype)


def test_writes_the_low_precision_copy_in_the_same_pass():
    check(torch.float32, copy_dtype=torch.float16)


def test_momentum_zero_copies_online_exactly():
    target, online = params(torch.float32, 0), params(torch.float32, 1)
    ema_update(target, online, 0.0)
    for t, o in zip(target, online, strict=True):
        torch.testing.assert_close(t, o, rtol=0, atol=0)


def test_mixed_dtypes_are_grouped_one_launch_per_dtype():
    target = params(torch.float32, 0, [(5,), (9,)]) + params(torch.float16, 2, [(33,)])
    online = params(torch.float32, 1, [(5,), (9,)]) + params(torch.float16, 3, [(33,)])
    groups, rest = _groups(target, online, None)
    assert len(groups) == 2 and not rest
    plain, exact = copy.deepcopy(target), [t.double() for t in target]
    ema_update_fused(target, online, 0.9)
    ema_update_ref(plain, online, 0.9)
    ema_update_ref(exact, [o.double() for o in online], 0.9)
    for t, p, e in zip(target, plain, exact, strict=True):
        assert_matches(t, p, e, str(t.dtype))


def test_chunk_table_covers_every_element_once():
    target, online = params(torch.float32, 0), params(torch.float32, 1)
    table, _ = build_chunk_table(target, online, [None] * len(target), chunk=1000)
    table = table.cpu()
    base = target[0].data_ptr()
    for t in target:
        rows = table[table[:, 0] == (t.data_ptr() - base) // 4]
        spans = sorted(zip(rows[:, 3].tolist(), rows[:, 4].tolist(), strict=True))
        assert spans[0][0] == 0 and spans[-1][1] == t.numel()
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_unaligned_views_are_updated_correctly():
    flat_t, flat_o = torch.randn(200, device=DEVICE), torch.randn(200, device=DEVICE)
    sizes = [3, 69, 5, 123]  # views at element offsets 0, 3, 72, 77: not multiples of 4
    target, online = list(flat_t.split(sizes)), list(flat_o.split(sizes))
    assert not build_chunk_table(target, online, [None] * 4, chunk=1000)[1]
    exact = [t.double() for t in target]
    plain = [t.clone() for t in target]
    ema_update(target, online, 0.95)
    ema_update_ref(plain, online, 0.95)
    ema_update_ref(exact, [o.double() for o in online], 0.95)
    for t, p, e in zip(target, plain, exact, strict=True):
        assert_matches(t, p, e)


def test_table_is_cached_across_steps():
    target, online = params(torch.float32, 0), params(torch.float32, 1)
    ema_update(target, online, 0.99)
    n = len(_TABLES.tables)
    ema_update(target, online, 0.98)
    assert len(_TABLES.tables) == n


def test_shape_mismatch_names_the_tensor():
    target, online = params(torch.float32, 0), params(torch.float32, 1)
    online[2] = online[2].reshape(-1)
    with pytest.raises(ValueError, match="tensor 2"):
        ema_update(target, online, 0.99)


def test_switch_off_runs_the_reference():
    target, online = params(torch.float32, 0), params(torch.float32, 1)
    plain = copy.deepcopy(target)
    set_backend("reference")
    try:
        ema_update(target, online, 0.99)
    finally:
        set_backend("auto")
    ema_update_ref(plain, online, 0.99)
    for t, p in zip(target, plain, strict=True):
        torch.testing.assert_close(t, p, rtol=0, atol=0)


@pytest.mark.gpu
def test_bf16_copy_on_gpu():
    check(torch.float32, copy_dtype=torch.bfloat16)
    check(torch.bfloat16)


@pytest.mark.gpu
def test_cuda_extension_matches_triton():
    pytest.importorskip("fastjepa._C")
    target, online = params(torch.float32, 0), params(torch.float32, 1)
    twin = copy.deepcopy(target)
    copies = [torch.full_like(t, float("nan"), dtype=torch.bfloat16) for t in target]
    twin_copies = copy.deepcopy(copies)
    ema_update_fused(target, online, 0.99, copy=copies, backend="triton")
    ema_update_fused(twin, online, 0.99, copy=twin_copies, backend="cuda")
    for a, b, ca, cb in zip(target, twin, copies, twin_copies, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ca, cb, rtol=0, atol=0)


def test_dtensor_parameters_update_their_local_shards():
    from torch.distributed.tensor import Shard, distribute_tensor

    with one_process_mesh() as mesh:
        target_full, online_full = params(torch.float32, 0), params(torch.float32, 1)
        target = [distribute_tensor(t.cpu().clone(), mesh, [Shard(0)]) for t in target_full]
        online = [distribute_tensor(o.cpu(), mesh, [Shard(0)]) for o in online_full]
        ema_update(target, online, 0.99)
        ema_update_ref(target_full, online_full, 0.99)
        for t, ref in zip(target, target_full, strict=True):
            torch.testing.assert_close(t.to_local(), ref.cpu(), rtol=1e-6, atol=1e-7)


def test_tensors_the_kernel_cannot_take_fall_back_to_the_loop():
    target, online = params(torch.float32, 0), params(torch.float32, 1)
    target[3], online[3] = target[3].t(), online[3].t()  # non-contiguous views
    target.append(torch.randn(5, dtype=torch.float64, device=DEVICE))  # a dtype the kernel does not take
    online.append(torch.randn(5, dtype=torch.float64, device=DEVICE))
    groups, rest = _groups(target, online, None)
    assert len(rest) == 2 and sum(len(ts) for ts, _, _ in groups.values()) == len(target) - 2
    exact = [t.double() for t in target]
    ema_update(target, online, 0.9)
    ema_update_ref(exact, [o.double() for o in online], 0.9)
    for t, e in zip(target, exact, strict=True):
        torch.testing.assert_close(t.double(), e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum", [2.0, -0.1, float("nan")])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_momentum_outside_0_1_is_refused_on_every_path(momentum, backend):
    target, online = params(torch.float32, 0), params(torch.float32, 1)
    before = copy.deepcopy(target)
    set_backend(backend)
    try:
        with pytest.raises(ValueError, match=r"momentum .* is not in \[0, 1\]"):
            ema_update(target, online, momentum)
    finally:
        set_backend("auto")
    for t, b in zip(target, before, strict=True):
        torch.testing.assert_close(t, b, rtol=0, atol=0)  # untouched
