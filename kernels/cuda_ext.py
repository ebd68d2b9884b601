"""Access to the optional CUDA C++ extension ``fastjepa._C`` (csrc/), built with ``FASTJEPA_BUILD_CUDA=1``."""

import importlib


def cuda_ext():
    """The ``fastjepa._C`` module, or None when it was not built."""
    try:
        return importlib.import_module("fastjepa._C")
    except ImportError:
        return None


def available() -> bool:
    return cuda_ext() is not None


def ema_update_cuda(table, target_like, online_like, copy_like, momentum: float, weight: float) -> None:
    ext = cuda_ext()
    if ext is None:
        raise RuntimeError(
            "ema_update(backend='cuda') needs the CUDA extension fastjepa._C; build it with "
            "`FASTJEPA_BUILD_CUDA=1 pip install -e .` (needs nvcc and a CUDA build of torch) or use backend='triton'"
        )
    ext.ema_update(table, target_like, online_like, copy_like, momentum, weight)
