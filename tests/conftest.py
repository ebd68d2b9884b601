import os

# The Triton interpreter must be on before any kernel is defined: it is how kernels are tested without a GPU.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def triton_kernels():
    """Every test starts with the ``triton`` kernel backend, so that the kernel tests run the kernels on a GPU too
    (where ``auto`` runs the measured winner, often the reference); the trainer sets its config's backend."""
    from fastjepa.kernels import kernel_backend

    with kernel_backend("triton"):
        yield


@pytest.fixture
def reference_ops():
    """Run the fastjepa.kernels ops through their PyTorch references: under the Triton interpreter (CPU) the
    fused kernels are exact but slow, and they have their own tests (tests/kernels/)."""
    from fastjepa.kernels import get_backend, set_backend

    was = get_backend()
    set_backend("reference")
    yield
    set_backend(was)
