"""fastjepa: fast I-JEPA pretraining for Vision Transformers.

`kernels/` is installed as `fastjepa.kernels`. The CUDA extension `fastjepa._C` (csrc/) is built only when
FASTJEPA_BUILD_CUDA=1 and both a CUDA toolkit and a CUDA build of torch are present; everything has a
Triton/PyTorch twin, so `import fastjepa` never needs it.
"""

import os

from setuptools import find_packages, setup


def cuda_extensions():
    if os.environ.get("FASTJEPA_BUILD_CUDA", "0") != "1":
        return [], {}
    import glob

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if CUDA_HOME is None or torch.version.cuda is None:
        raise RuntimeError(
            "FASTJEPA_BUILD_CUDA=1 needs a CUDA toolkit (CUDA_HOME) and a CUDA build of torch; "
            f"found CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda}. Unset FASTJEPA_BUILD_CUDA "
            "to install without the optional extension."
        )
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    ext = CUDAExtension(
        "fastjepa._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="fastjepa",
    version="0.1.0",
    description="Fast I-JEPA pretraining: fused Triton kernels, FlashAttention ViTs, FSDP2, WebDataset",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastjepa", "fastjepa.*"]) + ["fastjepa.kernels"],
    package_dir={"fastjepa.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "pyyaml",
        "pillow",
        "webdataset>=0.2.90",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark", "safetensors", "matplotlib"],
        "bench": ["matplotlib", "pytest-benchmark"],
        "full": ["safetensors", "tensorboard", "simplejpeg", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastjepa-train=fastjepa.train:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
