"""EMA of the target encoder: ``target <- m * target + (1 - m) * online`` over every parameter.

The official update is a Python loop with two kernels per parameter (~1000 launches for a ViT-H). The fused update
is multi-tensor: the addresses of all tensors and the chunks they are cut into go once into a small int64 table
on the device (cached, keyed on the tensors' addresses), and one kernel walks all chunks. It can also write a
low-precision copy of the new target (the bf16 weights its forward reads) in the same pass, so the cast costs no
extra read. FSDP2 parameters (DTensor) are updated through their local shards.
"""

import torch

from fastjepa.choices import EMA_BACKENDS
from fastjepa.kernels._utils import get_backend, interpreting, require_triton, tl, triton, use_triton

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Columns of the chunk table: element offsets of the target, online and copy tensors from the first tensor of
# their list, then the chunk's first and end element within the tensor.
_TABLE_COLUMNS = 5
# Element alignment that lets the kernels use 16-byte (fp32) vector accesses.
_VEC = 4


@torch.no_grad()
def ema_update_ref(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float) -> None:
    """Reference: the official per-parameter loop."""
    for p_t, p_o in zip(target, online, strict=True):
        p_t.mul_(momentum).add_((1.0 - momentum) * p_o.detach())


@triton.jit
def _ema_update_kernel(table, base_t, base_o, base_c, momentum, weight, HAS_COPY: tl.constexpr, ALIGN: tl.constexpr,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # One program per chunk of one tensor; the same expression as the official loop (m * t + (1 - m) * o) in fp32.
    # Table rows hold each tensor's element offset from the first tensor of its list (base_*): the kernel indexes
    # from pointer arguments whose alignment Triton knows, and ALIGN (checked on the host) lets it vectorise.
    p_row = table + tl.program_id(0).to(tl.int64) * 5
    i_start = tl.load(p_row + 3)
    i_end = tl.load(p_row + 4)
    p_t = base_t + tl.multiple_of(tl.load(p_row) + i_start, ALIGN)
    p_o = base_o + tl.multiple_of(tl.load(p_row + 1) + i_start, ALIGN)
    p_c = base_c + tl.multiple_of(tl.load(p_row + 2) + i_start, ALIGN)
    # With ALIGN, chunk lengths are multiples of ALIGN too, so the mask is constant over each vector.
    n = tl.multiple_of(i_end - i_start, ALIGN)
    for i in range(0, CHUNK, BLOCK):
        o = i + tl.arange(0, BLOCK)
        m = o < n
        b_t = tl.load(p_t + o, mask=m).to(tl.float32)
        b_o = tl.load(p_o + o, mask=m).to(tl.float32)
        b_new = momentum * b_t + weight * b_o
        tl.store(p_t + o, b_new.to(p_t.dtype.element_ty), mask=m)
        if HAS_COPY:
            tl.store(p_c + o, b_new.to(p_c.dtype.element_ty), mask=m)


# sm_90 compile check (tests/kernels/test_compile.py): fp32 master weights with a bf16 copy, as the trainer runs it.
COMPILE_SPECS = {
    "ema_update": (
        _ema_update_kernel,
        {"table": "*i64", "base_t": "*fp32", "base_o": "*fp32", "base_c": "*bf16", "momentum": "fp32",
         "weight": "fp32"},
        {"HAS_COPY": True, "ALIGN": 4, "CHUNK": 16384, "BLOCK": 4096}),
}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def chunk_sizes() -> tuple[int, int]:
    """(elements per program, elements per inner step). The interpreter gets big chunks: few programs."""
    return (1 << 16, 1 << 16) if interpreting() else (16384, 4096)


def build_chunk_table(target, online, copy, chunk: int) -> tuple[torch.Tensor, bool]:
    """``[C, 5]`` int64 table (see ``_TABLE_COLUMNS``) covering every element of every tensor, on their device,
    and whether every tensor offset and size is a multiple of ``_VEC`` elements (then the kernel vectorises)."""
    numel = torch.tensor([t.numel() for t in target], dtype=torch.int64)
    lists = [target, online] if copy[0] is None else [target, online, copy]
    offsets = torch.zeros(len(target), 3, dtype=torch.int64)
    for j, tensors in enumerate(lists):
        base, size = tensors[0].data_ptr(), tensors[0].element_size()
        offsets[:, j] = torch.tensor([(x.data_ptr() - base) // size for x in tensors], dtype=torch.int64)
    per_tensor = (numel + chunk - 1) // chunk
    tensor_id = torch.repeat_interleave(torch.arange(len(target)), per_tensor)
    first = torch.cumsum(per_tensor, 0) - per_tensor
    start = (torch.arange(len(tensor_id)) - first[tensor_id]) * chunk
    end = torch.minimum(start + chunk, numel[tensor_id])
    table = torch.cat([offsets[tensor_id], start[:, None], end[:, None]], dim=1)
    return table.to(target[0].device), bool((offsets % _VEC == 0).all() and (numel % _VEC == 0).all())


class _TableCache:
    """Chunk tables keyed on the tensors' addresses and sizes: built once, reused every step."""

    def __init__(self, size: int = 8):
        self.size, self.tables = size, {}

    def get(self, target, online, copy, chunk) -> tuple[torch.Tensor, bool]:
        key = (chunk,) + tuple(
            (t.data_ptr(), o.data_ptr(), 0 if c is None else c.data_ptr(), t.numel())
            for t, o, c in zip(target, online, copy, strict=True)
        )
        table = self.tables.get(key)
        if table is None:
            if len(self.tables) >= self.size:
                self.tables.pop(next(iter(self.tables)))
            table = self.tables[key] = build_chunk_table(target, online, copy, chunk)
        return table


_TABLES = _TableCache()


def _check_lists(target, online, copy) -> int:
    """Same number of tensors and exactly the same shapes, pair by pair (no broadcasting, on any path); returns the
    elements of the target (the whole model's, for FSDP2 shards), the size ``auto`` decides by."""
    if len(target) != len(online) or (copy is not None and len(copy) != len(target)):
        raise ValueError(
            f"ema_update: {len(target)} target, {len(online)} online"
            + ("" if copy is None else f" and {len(copy)} copy")
            + " tensors; the lists must pair up (same parameters in the same order)"
        )
    size = 0
    for i, (t, o) in enumerate(zip(target, online, strict=True)):
        c = None if copy is None else copy[i]
        size += t.numel()
        if t.shape != o.shape or (c is not None and c.shape != t.shape):
            raise ValueError(
                f"ema_update: tensor {i} has target shape {tuple(t.shape)}, online {tuple(o.shape)}"
                + ("" if c is None else f", copy {tuple(c.shape)}")
                + "; pair the same parameters (for FSDP2 both models must be sharded the same way)"
            )
    return size


def _groups(target, online, copy):
    """Local tensors grouped by (device, dtypes); tensors the kernel cannot take (non-contiguous, other dtypes, off
    the GPU, split across devices) come back separately for the reference loop."""
    groups, rest = {}, []
    for i, (t, o) in enumerate(zip(target, online, strict=True)):
        t, o = _local(t), _local(o).detach()
        c = None if copy is None else _local(copy[i])
        tensors = (t, o) if c is None else (t, o, c)
        kernel_ok = (t.is_cuda or interpreting()) and all(x.device == t.device for x in tensors)
        if not kernel_ok or not all(x.is_contiguous() and x.dtype in _DTYPES for x in tensors) or t.numel() == 0:
            rest.append((t, o, c))
            continue
        key = (t.device, t.dtype, o.dtype, None if c is None else c.dtype)
        groups.setdefault(key, ([], [], []))
        for lst, x in zip(groups[key], (t, o, c), strict=True):
            lst.append(x)
    return groups, rest


@torch.no_grad()
def ema_update_fused(target, online, momentum: float, copy=None, backend: str = "triton") -> None:
    """Fused multi-tensor EMA (see ``ema_update``); ``backend`` "triton" or "cuda" (the ``fastjepa._C`` twin)."""
    if backend not in EMA_BACKENDS:
        raise ValueError(f"ema_update: unknown backend {backend!r}; choose one of {EMA_BACKENDS}")
    if backend == "triton":
        require_triton("ema_update_fused(backend='triton')")
    _check_lists(target, online, copy)
    _ema_fused(target, online, momentum, copy, backend)


def _ema_fused(target, online, momentum: float, copy, backend: str) -> None:
    groups, rest = _groups(target, online, copy)
    chunk, block = chunk_sizes()
    momentum, weight = float(momentum), 1.0 - float(momentum)
    for (_, _, _, c_dtype), (ts, os_, cs) in groups.items():
        table, aligned = _TABLES.get(ts, os_, cs, chunk)
        if backend == "cuda":
            from fastjepa.kernels.cuda_ext import ema_update_cuda

            ema_update_cuda(table, ts[0], os_[0], cs[0], momentum, weight)
            continue
        _ema_update_kernel[(table.shape[0],)](
            table, ts[0], os_[0], ts[0] if c_dtype is None else cs[0], momentum, weight, HAS_COPY=c_dtype is not None,
            ALIGN=_VEC if aligned else 1, CHUNK=chunk, BLOCK=block, num_warps=8,
        )
    for t, o, c in rest:
        t.mul_(momentum).add_(weight * o)
        if c is not None:
            c.copy_(t)


@torch.no_grad()
def ema_update(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float,
               copy: list[torch.Tensor] | None = None) -> None:
    """In-place EMA ``target <- momentum * target + (1 - momentum) * online``.

    Args:
        target, online: lists of same-shaped tensors (parameters, or FSDP2 DTensors: their local shards are used).
        momentum: the EMA momentum m.
        copy: optional list of tensors (e.g. bf16) that receive the new target values in the same pass.
    With the kernel backend ``auto`` on a GPU, what measured faster at this model size (``MEASURED_WINNERS``):
    the fused kernel (all tensors of the same dtypes in one launch) or ``torch._foreach_lerp_``; ``triton`` (and
    the Triton interpreter) the fused kernel; ``reference``, and CPU tensors, the official loop.
    """
    if not 0.0 <= float(momentum) <= 1.0:  # NaN fails too
        raise ValueError(f"ema_update: momentum {momentum} is not in [0, 1]; the target would diverge from the "
                         "online weights (optimization.ema is a pair of momenta in [0, 1], e.g. [0.996, 1.0])")
    size = _check_lists(target, online, copy)
    if not target:
        return
    if use_triton(_local(target[0]), op="ema", size=size):
        _ema_fused(target, online, momentum, copy, "triton")
        return
    local_target, local_online = [_local(t) for t in target], [_local(o).detach() for o in online]
    if get_backend() == "auto" and local_target[0].is_cuda:  # measured faster than the loop (MEASURED_WINNERS)
        torch._foreach_lerp_(local_target, local_online, 1.0 - float(momentum))
    else:
        ema_update_ref(local_target, local_online, momentum)
    if copy is not None:
        torch._foreach_copy_([_local(c) for c in copy], local_target)
