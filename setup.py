"""Build and install megatron_longvideo.

Install torch first (``pip install torch==2.13.0`` on CPU machines), then this package with
``pip install --no-build-isolation -e .[test]``: the C++/CUDA kernels in ``csrc/`` are compiled
against the torch that is already installed, so the build must see it (no isolated build env,
which would otherwise pull a second, CUDA-enabled torch).
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def get_extensions():
    """The kernel extensions this machine can build: the C++ CPU twin always, CUDA where torch has it.

    A machine without torch, or with ``MLV_NO_EXTENSIONS=1``, builds none; the package then falls
    back to the torch reference kernels with one warning.
    """
    if os.environ.get("MLV_NO_EXTENSIONS") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    csrc = os.path.join("csrc")
    cpu_sources = sorted(
        os.path.join(csrc, f) for f in os.listdir(os.path.join(HERE, csrc)) if f.endswith("_cpu.cpp")
    )
    exts = []
    if cpu_sources:
        exts.append(
            cpp_extension.CppExtension(
                "megatron_longvideo._kernels_cpu",
                cpu_sources,
                extra_compile_args=["-O3", "-fopenmp"],
                extra_link_args=["-fopenmp"],
            )
        )
    cuda_sources = sorted(
        os.path.join(csrc, f)
        for f in os.listdir(os.path.join(HERE, csrc))
        if f.endswith(".cu") or f.endswith("_cuda.cpp")
    )
    if cuda_sources and torch.version.cuda and cpp_extension.CUDA_HOME:
        exts.append(
            cpp_extension.CUDAExtension(
                "megatron_longvideo._kernels_cuda",
                cuda_sources,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
            )
        )
    if not exts:
        return [], {}
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = get_extensions()

setup(
    name="megatron_longvideo",
    version="0.1.0",
    description="Long-video RL (GRPO) for video-language models on Megatron-Core: MR-SP and shared-prefix packing",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_longvideo", "megatron_longvideo.*"]),
    install_requires=[
        # A range that the CPU build 2.13.0 satisfies; install torch yourself first so that pip
        # never picks a CUDA build for you.
        "torch>=2.6,<2.14",
        # 0.16.1 is the newest that installs on Python 3.11 (0.17+ need Python >= 3.12). The CPU
        # patches in megatron_longvideo.platform are written against 0.16.x.
        "megatron-core>=0.16.1,<0.17",
        # megatron-core needs psutil for torch_dist checkpoint saves and does not declare it.
        "psutil",
        "numpy",
        "sentencepiece",
        "tensorboard",
        "safetensors",
        "transformers>=4.57",
        "av",
        "einops",
    ],
    extras_require={
        "test": ["pytest>=8", "decord", "matplotlib"],
        "gpu": ["transformer-engine[pytorch]"],
        # the attention engine's fastest CUDA tile kernel (optional; torch's own flash / memory-efficient /
        # cuDNN kernels are used without it). Built against the installed CUDA torch: --no-build-isolation.
        "flash": ["flash-attn>=2.6,<3"],
        "vllm": ["vllm"],
        "dali": ["nvidia-dali-cuda130"],
        "plot": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
