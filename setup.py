"""fastjepa: fast I-JEPA pretraining for Vision Transformers.

Three top-level folders of the repository are installed inside the package: ``kernels/`` as ``fastjepa.kernels``,
``configs/`` as ``fastjepa.configs`` (the shipped recipes, found by name) and ``bench/`` as ``fastjepa.bench``
(the microbenchmark suite, ``fastjepa bench``). The CUDA extension ``fastjepa._C`` (csrc/) is built only when
FASTJEPA_BUILD_CUDA=1 and both a CUDA toolkit and a CUDA build of torch are present; everything has a Triton or
PyTorch twin, so ``import fastjepa`` never needs it.
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
TRITON = "triton>=3.2; platform_system == 'Linux'"

setup(
    name="fastjepa",
    version="0.1.0",
    description="Fast I-JEPA pretraining: fused Triton kernels, FlashAttention ViTs, FSDP2, WebDataset",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE", "NOTICE"],
    python_requires=">=3.10",
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
    keywords=["self-supervised learning", "I-JEPA", "JEPA", "vision transformer", "triton", "fsdp"],
    project_urls={
        "I-JEPA paper": "https://arxiv.org/abs/2301.08243",
        "Official I-JEPA": "https://github.com/facebookresearch/ijepa",
    },
    packages=find_packages(include=["fastjepa", "fastjepa.*"]) + ["fastjepa.kernels", "fastjepa.configs",
                                                                   "fastjepa.bench"],
    package_dir={"fastjepa.kernels": "kernels", "fastjepa.configs": "configs", "fastjepa.bench": "bench"},
    package_data={"fastjepa.configs": ["*.yaml"]},
    install_requires=[
        # tested in CI with torch 2.13 (CPU) and run on the GPU image's 2.11 (FSDP2, DCP, compile, FlexAttention)
        "torch>=2.11",
        "numpy",
        "pyyaml",
        "pillow",
        "safetensors",
        "tqdm",
        # fastjepa streams tars through webdataset's tariterators, gopen and shuffle stage (semi-internal API)
        "webdataset>=0.2.90,<2",
    ],
    extras_require={
        "gpu": [TRITON],
        "test": ["pytest>=7", "pytest-xdist", "pytest-benchmark", "matplotlib", TRITON, "torchao"],
        "bench": ["matplotlib", "pytest-benchmark"],
        "demo": ["mlxtend", "matplotlib"],
        # fastjepa.fp8=all trains the context encoder and predictor through torchao.float8
        "fp8": ["torchao"],
        # flash-attn builds from source against the installed torch: pip install flash-attn --no-build-isolation
        "flash": ["flash-attn"],
        "full": [TRITON, "matplotlib", "tensorboard", "simplejpeg", "mlxtend", "pytest-benchmark", "torchao"],
    },
    entry_points={"console_scripts": [
        "fastjepa=fastjepa.cli:main",
        "fastjepa-train=fastjepa.train:main",
        "fastjepa-bench=fastjepa.bench.__main__:main",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
