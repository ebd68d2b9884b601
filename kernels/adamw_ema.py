"""One pass over the parameters per step: the AdamW update, the EMA of the target encoder and its bf16 replica.

The two-step update (``optimizer.step()``, then ``ema_update``) reads every online parameter twice: once for
AdamW, which writes it, then again for the EMA. The fused pass reads each parameter, gradient and moment once,
writes the new parameter, moments and target, and casts the low-precision copy from the target in registers.

It works in place on the optimizer's own state (``exp_avg``, ``exp_avg_sq``, ``step``, created lazily by torch's
own ``_init_group``), so ``optimizer.state_dict()`` stays that of ``torch.optim.AdamW``: checkpoints do not change.
The per-element math is torch's fused CPU AdamW (``FusedAdamKernel.cpp``, its vector path) in the same operation
order and with the same fused multiply-adds, so the interpreter matches ``torch.optim.AdamW(fused=True)`` on the
CPU to the last bit or two (torch's scalar tail loop contracts differently); the kernel is launched with FP
contraction off so that a GPU rounds as the interpreter does (torch's CUDA kernel keeps some products in fp64, so
it differs from both in the last bit). Bias corrections are computed on the device from each parameter's ``step``
(a skipped step must not advance them, and reading them on the host would synchronise). What changes every call
(lr and weight decay from the schedules, the addresses of freshly allocated gradients) goes to the device in one
small copy; the chunk table of everything else is cached, and nothing recompiles.

No GPU timing has chosen this kernel over the two-step update yet, so ``auto`` runs it only under the interpreter.
The fused path does not call ``optimizer.step()``: the optimizer's step hooks do not run.
"""

import math

import torch

from fastjepa.kernels._utils import get_backend, interpreting, require_triton, tl, triton, use_triton
from fastjepa.kernels.ema import _DTYPES, _VEC, _local, chunk_sizes, ema_update_ref

# Chunk table columns (cached: the addresses of parameters, state, targets and copies do not change): element
# offsets of param, (the row's index into the per-call gradient offsets), exp_avg, exp_avg_sq, step, target, copy
# (from the first tensor of each list), the param group (-1: no AdamW, the parameter has no gradient), whether the
# row has a target, then the chunk's first and end element within the tensor.
_COLUMNS = 11
# Per-call scalars, one host-to-device copy: the gradients' element offsets (a new gradient every step, after
# zero_grad(set_to_none=True)), then per group in fp64: 1 - lr * wd, lr, log(beta1), log(beta2), 1 - beta1, beta2,
# 1 - beta2, eps (schedules change lr and weight decay every step): 8 values a group.
_UNSUPPORTED = ("amsgrad", "maximize")


@torch.no_grad()
def adamw_ema_step_ref(optimizer: torch.optim.Optimizer, target: list[torch.Tensor], online: list[torch.Tensor],
                       momentum: float, copy: list[torch.Tensor] | None = None) -> None:
    """Reference: ``optimizer.step()`` (it reads ``optimizer.found_inf`` itself), then the official EMA loop and
    the copy written from the new target."""
    optimizer.step()
    local_target = [_local(t) for t in target]
    ema_update_ref(local_target, [_local(o).detach() for o in online], momentum)
    if copy is not None:
        torch._foreach_copy_([_local(c) for c in copy], local_target)


@triton.jit
def _adamw_ema_kernel(table, grad_offsets, hyper, found_inf, base_p, base_g, base_m, base_v, base_s, base_t, base_c,
                      momentum, weight, HAS_FOUND_INF: tl.constexpr, HAS_COPY: tl.constexpr, ALIGN: tl.constexpr,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # One program per chunk of one parameter (row layout: _COLUMNS). Launched without FP contraction: every
    # fused multiply-add below is an explicit tl.fma where torch's CPU kernel has one.
    row = table + tl.program_id(0).to(tl.int64) * 11
    group = tl.load(row + 7)
    adam = group >= 0
    if HAS_FOUND_INF:  # as torch's fused kernels: a step is skipped when found_inf is exactly 1
        adam = adam & (tl.load(found_inf) != 1.0)
    ema = tl.load(row + 8) != 0
    i_start = tl.load(row + 9)
    n = tl.multiple_of(tl.load(row + 10) - i_start, ALIGN)
    p_p = base_p + tl.multiple_of(tl.load(row) + i_start, ALIGN)
    p_g = base_g + tl.multiple_of(tl.load(grad_offsets + tl.load(row + 1)) + i_start, ALIGN)
    p_m = base_m + tl.multiple_of(tl.load(row + 2) + i_start, ALIGN)
    p_v = base_v + tl.multiple_of(tl.load(row + 3) + i_start, ALIGN)
    p_t = base_t + tl.multiple_of(tl.load(row + 5) + i_start, ALIGN)
    p_c = base_c + tl.multiple_of(tl.load(row + 6) + i_start, ALIGN)
    # Scalars as torch computes them on the host: bias corrections and step size in fp64, then rounded to fp32.
    h = hyper + tl.maximum(group, 0) * 8
    step = tl.load(base_s + tl.load(row + 4), mask=adam, other=1.0).to(tl.float64)
    neg_step_size = (-tl.load(h + 1) / (1.0 - tl.exp(step * tl.load(h + 2)))).to(tl.float32)  # fp64: IEEE
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.load(h + 3))).to(tl.float32)
    decay = tl.load(h).to(tl.float32)
    w1 = tl.load(h + 4).to(tl.float32)
    beta2 = tl.load(h + 5).to(tl.float32)
    w2 = tl.load(h + 6).to(tl.float32)
    eps = tl.load(h + 7).to(tl.float32)
    small = tl.abs(w1) < 0.5  # torch's lerp: from exp_avg for a small weight, from the gradient otherwise
    lerp_w = tl.where(small, w1, w1 - 1.0)
    for i in range(0, CHUNK, BLOCK):
        o = i + tl.arange(0, BLOCK)
        mask = o < n
        p = tl.load(p_p + o, mask=mask)
        if adam:
            g = tl.load(p_g + o, mask=mask)
            m = tl.load(p_m + o, mask=mask)
            v = tl.load(p_v + o, mask=mask)
            p = p * decay
            m = tl.fma(lerp_w, g - m, tl.where(small, m, g))
            v = tl.fma(w2 * g, g, v * beta2)
            denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
            p = p + tl.div_rn(neg_step_size * m, denom)
            tl.store(p_p + o, p, mask=mask)
            tl.store(p_m + o, m, mask=mask)
            tl.store(p_v + o, v, mask=mask)
        if ema:  # the official loop's m * t + (1 - m) * p, on the new parameter
            t = momentum * tl.load(p_t + o, mask=mask).to(tl.float32) + weight * p
            tl.store(p_t + o, t.to(p_t.dtype.element_ty), mask=mask)
            if HAS_COPY:
                tl.store(p_c + o, t.to(p_c.dtype.element_ty), mask=mask)


# sm_90 compile check (tests/kernels/test_compile.py): fp32 parameters, state and target, a bf16 replica.
COMPILE_SPECS = {
    "adamw_ema": (
        _adamw_ema_kernel,
        {"table": "*i64", "grad_offsets": "*i64", "hyper": "*fp64", "found_inf": "*fp32", "base_p": "*fp32",
         "base_g": "*fp32", "base_m": "*fp32", "base_v": "*fp32", "base_s": "*fp32", "base_t": "*fp32",
         "base_c": "*bf16", "momentum": "fp32", "weight": "fp32"},
        {"HAS_FOUND_INF": True, "HAS_COPY": True, "ALIGN": 4, "CHUNK": 16384, "BLOCK": 4096}),
}


def _check_args(optimizer, target, online, copy, momentum) -> None:
    """Refuse, on every backend, what the fused pass does not implement and lists that do not pair up."""
    if not 0.0 <= float(momentum) <= 1.0:  # NaN fails too
        raise ValueError(f"adamw_ema_step: momentum {momentum} is not in [0, 1]")
    if len(target) != len(online) or (copy is not None and len(copy) != len(target)):
        raise ValueError(f"adamw_ema_step: {len(target)} target, {len(online)} online"
                         + ("" if copy is None else f" and {len(copy)} copy")
                         + " tensors; the lists must pair up (same parameters in the same order)")
    for i, (t, o) in enumerate(zip(target, online, strict=True)):
        c = None if copy is None else copy[i]
        if t.shape != o.shape or (c is not None and c.shape != t.shape):
            raise ValueError(f"adamw_ema_step: tensor {i} has target shape {tuple(t.shape)}, online "
                             f"{tuple(o.shape)}" + ("" if c is None else f", copy {tuple(c.shape)}"))
    if getattr(optimizer, "grad_scale", None) is not None:
        raise ValueError("adamw_ema_step: optimizer.grad_scale is not supported; unscale the gradients first")
    for k, group in enumerate(optimizer.param_groups):
        for name in _UNSUPPORTED:
            if group.get(name):
                raise ValueError(f"adamw_ema_step: param group {k} has {name}=True, which is not supported")
        if not group.get("decoupled_weight_decay"):
            raise ValueError(f"adamw_ema_step: param group {k} has decoupled_weight_decay=False (Adam's L2 "
                             "penalty); pass a torch.optim.AdamW")
        if any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in (group["lr"], *group["betas"])):
            raise ValueError(f"adamw_ema_step: param group {k} has lr or betas as a device tensor (capturable=True"
                             "), which is not supported; pass floats")


def _offsets(tensors) -> list[int]:
    """Element offsets of tensors from the first one present (0 for None: never read)."""
    first = next((x for x in tensors if x is not None), None)
    return [0 if x is None else (x.data_ptr() - first.data_ptr()) // x.element_size() for x in tensors]


def _scalars(optimizer, grads, device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The per-call scalars (see the top of the file) on the device: gradient offsets (int64) and group scalars
    (fp64) sharing one buffer, and whether every gradient offset allows vector accesses."""
    hyper = []
    for group in optimizer.param_groups:
        lr, (beta1, beta2) = float(group["lr"]), (float(b) for b in group["betas"])
        hyper.append([1.0 - lr * group["weight_decay"], lr, math.log(beta1) if beta1 > 0 else -math.inf,
                      math.log(beta2) if beta2 > 0 else -math.inf, 1.0 - beta1, beta2, 1.0 - beta2, group["eps"]])
    offsets = torch.tensor(_offsets(grads), dtype=torch.int64)
    buffer = torch.cat([offsets, torch.tensor(hyper, dtype=torch.float64).view(torch.int64).flatten()])
    buffer = buffer.to(device, non_blocking=True)
    return buffer, buffer[len(grads):].view(torch.float64), bool((offsets % _VEC == 0).all())


def _rows(optimizer, target, online, copy) -> tuple[list[tuple], list[torch.Tensor]]:
    """The state created as torch creates it, and one row per parameter the pass touches: its local tensors
    (param, grad, exp_avg, exp_avg_sq, step, target, copy: None where absent) and its group (-1: EMA only).
    Online parameters pair with targets by identity; those without a gradient get the EMA only."""
    pair = {id(o): j for j, o in enumerate(online)}
    rows, steps = [], []

    def ema_part(j):
        return (None, None) if j is None else (_local(target[j]), None if copy is None else _local(copy[j]))

    for k, group in enumerate(optimizer.param_groups):
        params, grads, exp_avgs, exp_avg_sqs, group_steps = [], [], [], [], []
        optimizer._init_group(group, params, grads, exp_avgs, exp_avg_sqs, [], group_steps)
        steps += group_steps
        for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, group_steps, strict=True):
            adam = tuple(_local(x) for x in (p, g, m, v)) + (s,)
            rows.append((adam + ema_part(pair.pop(id(p), None)), k))
    for j in pair.values():
        rows.append(((_local(online[j]).detach(), None, None, None, None, *ema_part(j)), -1))
    return rows, steps


def _kernel_device(rows) -> torch.device | None:
    """The device of every tensor when the kernel can take them all (fp32 parameters, gradients and state, one
    target and one copy dtype, contiguous, on a GPU or under the interpreter), else None: the reference runs."""
    device = rows[0][0][0].device
    if not (device.type == "cuda" or interpreting()):
        return None
    for col in range(7):
        tensors = [r[0][col] for r in rows if r[0][col] is not None]
        dtypes = (torch.float32,) if col < 5 else _DTYPES
        if len({x.dtype for x in tensors}) > 1 or not all(
            x.device == device and x.dtype in dtypes and x.is_contiguous() and x.data_ptr() % x.element_size() == 0
            for x in tensors
        ):
            return None
    return device


def build_table(rows, chunk: int) -> tuple[torch.Tensor, bool]:
    """``[C, _COLUMNS]`` int64 chunk table covering every element of every row, on the rows' device, and whether
    every offset and size is a multiple of ``_VEC`` elements (then the kernel vectorises)."""
    offsets = torch.tensor([_offsets([r[col] for r, _ in rows]) for col in range(7)], dtype=torch.int64).T
    offsets[:, 1] = torch.arange(len(rows))  # gradients: the row's index into the per-call offsets
    flags = torch.tensor([[k, r[5] is not None] for r, k in rows], dtype=torch.int64)
    numel = torch.tensor([r[0].numel() for r, _ in rows], dtype=torch.int64)
    per_row = (numel + chunk - 1) // chunk
    row_id = torch.repeat_interleave(torch.arange(len(rows)), per_row)
    start = (torch.arange(len(row_id)) - (torch.cumsum(per_row, 0) - per_row)[row_id]) * chunk
    end = torch.minimum(start + chunk, numel[row_id])
    table = torch.cat([offsets[row_id], flags[row_id], start[:, None], end[:, None]], dim=1)
    vector_cols = [0, 2, 3, 5, 6]  # the step is a scalar; gradients are checked every call
    aligned = bool((offsets[:, vector_cols] % _VEC == 0).all() and (numel % _VEC == 0).all())
    return table.to(rows[0][0][0].device), aligned


_TABLES: dict = {}
_TABLE_CACHE_SIZE = 8


def _table(rows, chunk: int) -> tuple[torch.Tensor, bool]:
    """``build_table`` once per set of tensor addresses and groups: reused every step."""
    key = (chunk,) + tuple(
        (k, r[0].numel(), r[1] is None) + tuple(0 if x is None else x.data_ptr() for x in r[:1] + r[2:])
        for r, k in rows
    )
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _TABLE_CACHE_SIZE:
            _TABLES.pop(next(iter(_TABLES)))
        table = _TABLES[key] = build_table(rows, chunk)
    return table


def _launch(optimizer, rows, steps, device, momentum: float) -> None:
    chunk, block = chunk_sizes()
    table, aligned = _table(rows, chunk)
    grad_offsets, hyper, grads_aligned = _scalars(optimizer, [r[0][1] for r in rows], device)
    bases = []
    for col in range(7):  # a column no row has gets the parameters' base: masked off, never read
        bases.append(next((r[0][col] for r in rows if r[0][col] is not None), rows[0][0][0]))
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is not None:
        found_inf = found_inf.to(device, torch.float32, non_blocking=True)
    if steps:  # torch's order: steps advance, the kernel reads them, a skipped step undoes it
        torch._foreach_add_(steps, 1)
    _adamw_ema_kernel[(table.shape[0],)](
        table, grad_offsets, hyper, bases[0] if found_inf is None else found_inf, *bases, float(momentum),
        1.0 - float(momentum), HAS_FOUND_INF=found_inf is not None, HAS_COPY=any(r[0][6] is not None for r in rows),
        ALIGN=_VEC if aligned and grads_aligned else 1, CHUNK=chunk, BLOCK=block, num_warps=8, enable_fp_fusion=False,
    )
    if found_inf is not None and steps:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


@torch.no_grad()
def adamw_ema_step(optimizer: torch.optim.Optimizer, target: list[torch.Tensor], online: list[torch.Tensor],
                   momentum: float, copy: list[torch.Tensor] | None = None, backend: str | None = None) -> None:
    """``optimizer.step()`` then ``target <- momentum * target + (1 - momentum) * online`` (and ``copy`` written
    from the new target), in one pass over the parameters.

    Args:
        optimizer: a ``torch.optim.AdamW`` (fused or not; amsgrad, maximize, grad_scale and device-tensor lr are
            refused). Its ``found_inf`` (a device tensor or None) skips the AdamW update, not the EMA.
        target, online: same-shaped lists (parameters or FSDP2 DTensors: their local shards are used); the online
            parameters are found among the optimizer's by identity. Optimizer parameters without a target (the
            predictor's) get AdamW only, online ones without a gradient the EMA only.
        momentum: the EMA momentum m, in [0, 1].
        copy: optional list of tensors (the bf16 replica) that receive the new target values.
        backend: ``"triton"`` the fused kernel, ``"reference"`` the two-step update; None follows the kernel
            backend switch, whose ``auto`` runs the kernel only under the interpreter (no GPU timing chose it).
    Tensors the kernel cannot take (off the GPU without the interpreter, non-contiguous, not fp32, a step tensor
    on another device as non-fused AdamW keeps it) run the whole step through the reference.
    """
    if backend not in (None, "triton", "reference"):
        raise ValueError(f"adamw_ema_step: unknown backend {backend!r}; choose 'triton', 'reference' or None")
    _check_args(optimizer, target, online, copy, momentum)
    if backend == "triton":
        require_triton("adamw_ema_step(backend='triton')")
    first = next((p for g in optimizer.param_groups for p in g["params"]), None)
    fused = backend == "triton" or (backend is None and first is not None and use_triton(_local(first))
                                    and (get_backend() == "triton" or interpreting()))
    rows, steps = _rows(optimizer, target, online, copy) if fused else ([], [])
    device = _kernel_device(rows) if rows else None
    if device is None:
        adamw_ema_step_ref(optimizer, target, online, momentum, copy)
        return
    _launch(optimizer, rows, steps, device, momentum)
