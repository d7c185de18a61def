"""Builds hyperdas_fast with its C++ CPU extension (always) and its CUDA extension (when a
CUDA build of torch and nvcc are present, or HYPERDAS_FAST_BUILD_CUDA=1).

CUDA arch flags are explicit (TORCH_CUDA_ARCH_LIST, default "8.0;9.0") so the build
needs no GPU. Set HYPERDAS_FAST_BUILD_CUDA=0 to skip the CUDA extension.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension, CUDA_HOME
    import torch

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if os.environ.get("HYPERDAS_FAST_NATIVE", "1") == "1":
        # The extension is built on the machine that runs it (pip install -e .).
        cxx_flags.append("-march=native")
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    extensions = []
    if cpu_sources:
        extensions.append(
            CppExtension(
                "hyperdas_fast._C",
                cpu_sources,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=["-fopenmp"],
            )
        )
    want_cuda = os.environ.get("HYPERDAS_FAST_BUILD_CUDA")
    has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    cuda_sources = sorted(
        glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
    )
    if cuda_sources and (want_cuda == "1" or (want_cuda is None and has_cuda)):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extensions.append(
            CUDAExtension(
                "hyperdas_fast._C_cuda",
                cuda_sources,
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++17"],
                    "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
                },
            )
        )
    return extensions


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="hyperdas_fast",
    version="0.1.0",
    description="Fused kernels, models and a trainer for HyperDAS interchange interventions",
    packages=find_packages(include=["hyperdas_fast", "hyperdas_fast.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "datasets",
        "safetensors",
        "tqdm",
        "matplotlib",
        "gguf",
        "accelerate",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "pyvene": ["pyvene"],
        "test": ["pytest", "pytest-benchmark", "pytest-timeout"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    entry_points={
        "console_scripts": [
            "hyperdas-fast=hyperdas_fast.cli:main",
            "hyperdas-train=hyperdas_fast.cli:train_main",
            "hyperdas-evaluate=hyperdas_fast.cli:evaluate_main",
        ]
    },
)
