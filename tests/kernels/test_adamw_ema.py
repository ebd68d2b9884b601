"""adamw_ema_step: the fused AdamW + EMA + replica pass (interpreter on CPU) against torch's fused AdamW followed by
the official EMA loop, over the official four param groups with schedules changing every step."""

import copy
import io
from types import SimpleNamespace

import pytest
import torch
from kernel_utils import one_process_mesh
from torch import nn

import fastjepa.kernels.adamw_ema as adamw_ema
from fastjepa.kernels import adamw_ema_step, adamw_ema_step_ref, kernel_backend
from fastjepa.optim import param_groups

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 20
# Differences allowed, in units of the dtype's epsilon (relative, and absolute at the tensor's largest value). Not
# bitwise: torch's CPU kernel rounds its scalar tail loop (the last numel % 16 elements of each tensor) with other
# fused multiply-adds than its vector loop, which the kernel follows (observed: 1-2 ulp in exp_avg_sq there;
# test_op_order_is_torch_cpu_vector_loop_bitwise checks the vector loop bit for bit).
ULPS = 2


def encoder() -> nn.Module:
    enc = nn.Module()
    enc.pos = nn.Parameter(torch.randn(1, 9, 7) * 0.02, requires_grad=False)  # frozen, as the sin-cos embeddings
    enc.embed = nn.Linear(263, 269)  # 70747 weights: several chunks under the interpreter (65536 per chunk)
    enc.norm = nn.LayerNorm(7)
    enc.proj = nn.Linear(7, 5)
    return enc


def predictor() -> nn.Module:
    pred = nn.Module()
    pred.embed = nn.Linear(5, 11)
    pred.norm = nn.LayerNorm(11)
    pred.mask_token = nn.Parameter(torch.zeros(1, 1, 11))
    return pred


def setup(copy_dtype=torch.float16, seed=0, **adamw) -> SimpleNamespace:
    """Encoder, predictor, the EMA target, a NaN-poisoned low-precision replica and AdamW over the official groups."""
    torch.manual_seed(seed)
    enc, pred = encoder().to(DEVICE), predictor().to(DEVICE)
    target = copy.deepcopy(enc).requires_grad_(False)
    replica = [torch.full_like(p, float("nan"), dtype=copy_dtype) for p in target.parameters()]
    opt = torch.optim.AdamW(param_groups(enc, pred), fused=True, **adamw)
    return SimpleNamespace(enc=enc, pred=pred, target=target, replica=replica, opt=opt)


def trainable(run) -> list[nn.Parameter]:
    return [p for m in (run.enc, run.pred) for p in m.parameters() if p.requires_grad]


def schedule(run, step: int) -> float:
    """lr warming up, weight decay rising on the decayed groups (as ``Schedules.apply``); returns the momentum."""
    for group in run.opt.param_groups:
        group["lr"] = 1e-3 * (step + 1) / STEPS
        if not group.get("WD_exclude"):
            group["weight_decay"] = 0.04 + 0.02 * step / STEPS
    return 0.996 + 0.004 * step / STEPS


def give_grads(runs, step: int, skip=()) -> None:
    """The same random gradients to each run's parameters (none to the indices in ``skip``)."""
    g = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=g).to(DEVICE, p.dtype) * 1e-2 for p in trainable(runs[0])]
    for run in runs:
        for i, (p, grad) in enumerate(zip(trainable(run), grads, strict=True)):
            p.grad = None if i in skip else grad.clone()


def fused_step(run, momentum: float) -> None:
    adamw_ema_step(run.opt, list(run.target.parameters()), list(run.enc.parameters()), momentum, copy=run.replica,
                   backend="triton")


def reference_step(run, momentum: float) -> None:
    adamw_ema_step_ref(run.opt, list(run.target.parameters()), list(run.enc.parameters()), momentum,
                       copy=run.replica)


@pytest.fixture
def kernel_only(monkeypatch):
    """The fused path must not fall back to the reference (tests call the reference through their import)."""

    def refuse(*_, **__):
        raise AssertionError("adamw_ema_step fell back to the reference")

    monkeypatch.setattr(adamw_ema, "adamw_ema_step_ref", refuse)


def assert_close(x: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    eps = torch.finfo(ref.dtype).eps
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(x, ref, rtol=ULPS * eps, atol=ULPS * eps * scale, msg=lambda m: f"{name}: {m}")


def assert_runs_match(fused, ref) -> None:
    """Parameters, targets, replica, and every state tensor (the step exactly)."""
    for mod in ("enc", "pred", "target"):
        for (n, a), b in zip(getattr(fused, mod).named_parameters(), getattr(ref, mod).parameters(), strict=True):
            assert_close(a.detach(), b.detach(), f"{mod}.{n}")
    for i, (c, t, r) in enumerate(zip(fused.replica, fused.target.parameters(), ref.replica, strict=True)):
        torch.testing.assert_close(c, t.to(c.dtype), rtol=0, atol=0, msg=f"replica {i} is not the target's cast")
        assert_close(c, r, f"replica {i}")
    assert len(fused.opt.state) == len(ref.opt.state)
    for p, q in zip(trainable(fused), trainable(ref), strict=True):
        assert (p in fused.opt.state) == (q in ref.opt.state)
        for key, value in ref.opt.state.get(q, {}).items():
            mine = fused.opt.state[p][key]
            assert (mine.dtype, mine.device, mine.shape) == (value.dtype, value.device, value.shape), key
            if key == "step":
                assert mine.item() == value.item()
            else:
                assert_close(mine, value, key)


def step_both(fused, ref, steps) -> None:
    """The same scheduled steps and gradients for both runs: the fused update on one, the two-step one on the other."""
    for step in steps:
        momentum = schedule(fused, step)
        schedule(ref, step)
        give_grads([fused, ref], step)
        fused_step(fused, momentum)
        reference_step(ref, momentum)


@pytest.mark.parametrize("adamw", [{}, {"betas": (0.3, 0.95), "eps": 1e-6}])  # 1 - beta1 >= 0.5: the other lerp
def test_twenty_steps_match_torch_adamw_then_ema(adamw, kernel_only):
    fused, ref = setup(**adamw), setup(**adamw)
    step_both(fused, ref, range(STEPS))
    assert_runs_match(fused, ref)
    assert fused.opt.state[fused.enc.embed.weight]["step"].item() == STEPS


@pytest.mark.skipif(DEVICE != "cpu" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="compares with torch's vectorised CPU kernel")
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.95)])
def test_op_order_is_torch_cpu_vector_loop_bitwise(betas, kernel_only):
    """On sizes that torch's CPU kernel covers with its vector loop only (multiples of 16), the same roundings."""
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=g)) for s in [(64, 64), (48,)]]
        targets = [torch.randn(p.shape, generator=g) for p in params]
        runs.append((params, targets, [torch.empty_like(t, dtype=torch.float16) for t in targets],
                     torch.optim.AdamW(params, fused=True, betas=betas, weight_decay=0.05)))
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in runs[0][0]]
        for params, *_ in runs:
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad.clone()
        adamw_ema_step(runs[0][3], runs[0][1], runs[0][0], 0.99, copy=runs[0][2], backend="triton")
        adamw_ema_step_ref(runs[1][3], runs[1][1], runs[1][0], 0.99, copy=runs[1][2])
    (params, targets, copies, opt), (params_ref, targets_ref, copies_ref, opt_ref) = runs
    for a, b in zip(params + targets + copies, params_ref + targets_ref + copies_ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)
    for p, q in zip(params, params_ref, strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[p][key], opt_ref.state[q][key], rtol=0, atol=0, msg=key)


def snapshot(run) -> tuple[list, list, list]:
    """Clones of the online parameters, the targets and each trainable parameter's state."""
    return ([p.detach().clone() for p in run.enc.parameters()], [t.clone() for t in run.target.parameters()],
            [{k: v.clone() for k, v in run.opt.state[p].items()} for p in trainable(run) if p in run.opt.state])


def test_found_inf_skips_adamw_but_not_the_ema(kernel_only):
    fused, ref = setup(), setup()
    for step, flag in enumerate([0.0, 1.0, 0.0, None]):
        momentum = schedule(fused, step)
        schedule(ref, step)
        give_grads([fused, ref], step)
        for run in (fused, ref):
            run.opt.found_inf = None if flag is None else torch.tensor(flag, device=DEVICE)
        params, targets, state = snapshot(fused)
        fused_step(fused, momentum)
        reference_step(ref, momentum)
        assert_runs_match(fused, ref)
        if flag != 1.0:
            continue
        params_now, targets_now, state_now = snapshot(fused)
        for a, b in zip(params + [v for s in state for v in s.values()],
                        params_now + [v for s in state_now for v in s.values()], strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)  # no AdamW change at all, steps not advanced
        adamw_ema.ema_update_ref(targets, params, momentum)
        for t, e in zip(targets_now, targets, strict=True):
            torch.testing.assert_close(t, e, rtol=0, atol=0)  # the EMA still ran, on the unchanged parameters


def test_parameter_without_grad_gets_the_ema_only_and_predictor_adamw_only(kernel_only):
    fused, ref = setup(), setup()
    norm_weight = next(i for i, p in enumerate(trainable(fused)) if p is fused.enc.norm.weight)
    momentum = schedule(fused, 0)
    schedule(ref, 0)
    give_grads([fused, ref], 0, skip={norm_weight})
    params, targets, _ = snapshot(fused)
    fused_step(fused, momentum)
    reference_step(ref, momentum)
    assert_runs_match(fused, ref)
    assert fused.enc.norm.weight not in fused.opt.state  # no state created, as torch
    torch.testing.assert_close(fused.enc.norm.weight.detach(), ref.enc.norm.weight.detach(), rtol=0, atol=0)
    adamw_ema.ema_update_ref(targets, params, momentum)
    for name, t, e in zip(dict(fused.target.named_parameters()), fused.target.parameters(), targets, strict=True):
        if name in ("pos", "norm.weight"):  # no AdamW update: the EMA of the unchanged parameter, exactly
            torch.testing.assert_close(t, e, rtol=0, atol=0)
    assert all(p in fused.opt.state for p in fused.pred.parameters())  # the predictor's: AdamW, and no target
    assert not any(c.isnan().any() for c in fused.replica)  # every element of the poisoned replica written


def test_state_dict_loads_into_torch_adamw_and_continues_identically(kernel_only):
    fused, plain = setup(), setup()
    step_both(fused, plain, range(5))
    saved, torch_saved = fused.opt.state_dict(), plain.opt.state_dict()
    assert saved["param_groups"] == torch_saved["param_groups"]
    assert saved["state"].keys() == torch_saved["state"].keys()
    for i, s in saved["state"].items():
        assert {k: (v.dtype, v.shape, v.device) for k, v in s.items()} == {
            k: (v.dtype, v.shape, v.device) for k, v in torch_saved["state"][i].items()}
    resumed = copy.deepcopy(fused)
    resumed.opt = torch.optim.AdamW(param_groups(resumed.enc, resumed.pred), fused=True)
    buffer = io.BytesIO()  # through a file, as a checkpoint: load_state_dict would share the live tensors
    torch.save(saved, buffer)
    buffer.seek(0)
    resumed.opt.load_state_dict(torch.load(buffer))
    step_both(fused, resumed, range(5, 10))
    assert_runs_match(fused, resumed)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_lists_are_refused_naming_the_tensor(backend):
    run = setup()
    target, online = list(run.target.parameters()), list(run.enc.parameters())
    params, targets, _ = snapshot(run)
    with pytest.raises(ValueError, match=r"7 target, 4 online"):
        adamw_ema_step(run.opt, target, online[:4], 0.99, backend=backend)
    bad = copy.copy(target)
    bad[1] = bad[1].reshape(-1)
    with pytest.raises(ValueError, match=r"tensor 1 has target shape \(70747,\), online \(269, 263\)"):
        adamw_ema_step(run.opt, bad, online, 0.99, backend=backend)
    with pytest.raises(ValueError, match=r"tensor 6 has .* copy \(1, 5\)"):
        adamw_ema_step(run.opt, target, online, 0.99, copy=run.replica[:6] + [run.replica[6][None]], backend=backend)
    with pytest.raises(ValueError, match=r"momentum 1.5 is not in \[0, 1\]"):
        adamw_ema_step(run.opt, target, online, 1.5, backend=backend)
    for a, b in zip(params + targets, list(run.enc.parameters()) + target, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # untouched


@pytest.mark.parametrize("option", ["amsgrad", "maximize"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_unsupported_adamw_options_are_refused(option, backend):
    run = setup(**{option: True})
    with pytest.raises(ValueError, match=rf"param group 0 has {option}=True"):
        adamw_ema_step(run.opt, list(run.target.parameters()), list(run.enc.parameters()), 0.99, backend=backend)


def test_tensors_the_kernel_cannot_take_run_the_reference():
    fused, ref = setup(), setup()
    for run in (fused, ref):
        run.pred.mask_token.data = run.pred.mask_token.data.double()  # a dtype the kernel does not take
    momentum = schedule(fused, 0)
    schedule(ref, 0)
    give_grads([fused, ref], 0)
    rows, _ = adamw_ema._rows(fused.opt, list(fused.target.parameters()), list(fused.enc.parameters()), None)
    assert adamw_ema._kernel_device(rows) is None
    fused_step(fused, momentum)
    reference_step(ref, momentum)
    for a, b in zip(trainable(fused) + fused.replica, trainable(ref) + ref.replica, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("sizes", "grad_shift"), [([4, 8, 12], 0), ([4, 8, 12], 1), ([3, 69, 5], 0)])
def test_vector_accesses_only_where_every_offset_allows_them(sizes, grad_shift, kernel_only):
    runs = []
    for _ in range(2):  # parameters and gradients are views into flat buffers
        flat = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        params = [nn.Parameter(v) for v in flat.split(sizes)]
        flat_grad = torch.randn(sum(sizes) + grad_shift, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        grads = flat_grad.split([sizes[0], grad_shift, *sizes[1:]])  # a gap of grad_shift after the first
        for p, g in zip(params, grads[:1] + grads[2:], strict=True):
            p.grad = g
        runs.append((params, [torch.zeros_like(p) for p in params], torch.optim.AdamW(params, fused=True)))
    (params, targets, opt), (params_ref, targets_ref, opt_ref) = runs
    rows, _ = adamw_ema._rows(opt, targets, params, None)
    assert adamw_ema.build_table(rows, 1000)[1] == (sizes[0] == 4)
    assert adamw_ema._scalars(opt, [r[0][1] for r in rows], DEVICE)[2] == (sizes[0] == 4 and grad_shift == 0)
    adamw_ema_step(opt, targets, params, 0.9, backend="triton")
    adamw_ema_step_ref(opt_ref, targets_ref, params_ref, 0.9)
    for a, b in zip(params + targets, params_ref + targets_ref, strict=True):
        assert_close(a.detach(), b.detach(), "view")


def test_backend_switch_reference_runs_the_two_step_update():
    fused, ref = setup(), setup()
    momentum = schedule(fused, 0)
    schedule(ref, 0)
    give_grads([fused, ref], 0)
    with kernel_backend("reference"):
        adamw_ema_step(fused.opt, list(fused.target.parameters()), list(fused.enc.parameters()), momentum,
                       copy=fused.replica)
    reference_step(ref, momentum)
    for a, b in zip(fused.replica, ref.replica, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_chunk_table_is_cached_across_steps(kernel_only):
    run = setup()
    adamw_ema._TABLES.clear()
    for step in range(3):
        momentum = schedule(run, step)
        give_grads([run], step)
        fused_step(run, momentum)
    assert len(adamw_ema._TABLES) == 1


def test_dtensor_parameters_update_their_local_shards(kernel_only):
    from torch.distributed.tensor import Shard, distribute_tensor

    with one_process_mesh() as mesh:
        shapes = [(13, 7), (5,), (3, 3)]

        def make():
            g = torch.Generator().manual_seed(0)
            online = [nn.Parameter(distribute_tensor(torch.randn(s, generator=g), mesh, [Shard(0)])) for s in shapes]
            target = [distribute_tensor(torch.randn(s, generator=g), mesh, [Shard(0)]) for s in shapes]
            return online, target, torch.optim.AdamW(online, fused=True, weight_decay=0.05)

        (online, target, opt), (online_ref, target_ref, opt_ref) = make(), make()
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            for p, q in zip(online, online_ref, strict=True):
                grad = torch.randn(p.shape, generator=g)
                p.grad, q.grad = (distribute_tensor(grad.clone(), mesh, [Shard(0)]) for _ in range(2))
            adamw_ema_step(opt, target, online, 0.9, backend="triton")
            adamw_ema_step_ref(opt_ref, target_ref, online_ref, 0.9)
        for a, b in zip(online + target, online_ref + target_ref, strict=True):
            assert_close(a.to_local(), b.to_local(), "dtensor")


@pytest.mark.gpu
def test_bf16_replica_on_gpu(kernel_only):
    fused, ref = setup(torch.bfloat16), setup(torch.bfloat16)
    step_both(fused, ref, range(3))
    assert_runs_match(fused, ref)
