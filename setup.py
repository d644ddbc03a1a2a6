"""Build and install llama_fast.

The Triton kernels in ./kernels install as the subpackage ``llama_fast.kernels`` (never as a
top-level ``kernels``: that import name belongs to Hugging Face's kernel-hub package).

The C++/CUDA extension ``llama_fast._C`` (csrc/) is built with ninja: with its CUDA kernels when a
CUDA toolkit (nvcc) and a CUDA build of torch are present, CPU kernels only otherwise.
  TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0a": Ampere, and Hopper with its
                         architecture-specific instructions)
  MAX_JOBS               parallel compile jobs (ninja)
  LLAMA_FAST_NO_EXTENSION=1   skip the extension (the library then runs on Triton and the references)
"""

import os

from setuptools import setup


def _extension_build():
    if os.environ.get("LLAMA_FAST_NO_EXTENSION") == "1":
        return [], {}
    # torch looks for nvcc on PATH and takes its grandparent folder as the toolkit; where nvcc is a
    # wrapper script (/usr/local/bin/nvcc on these machines) that is /usr/local, which holds no
    # CUDA headers or libraries. The standard install location is the better guess.
    if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda/include"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils import cpp_extension

    # -fopenmp: ATen's at::parallel_for is inline OpenMP code, serial without it; it also honours
    # the `#pragma omp simd` loops of the CPU kernels. -fno-trapping-math and -fno-math-errno let
    # GCC if-convert float compares and inline sqrt, without which those loops stay scalar (GCC 12:
    # "not vectorized: control flow in loop"); results are unchanged, only FP traps and errno go.
    # The C++ standard is torch's own choice (its 2.14 headers need C++20).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    sources = ["csrc/ops.cpp"]
    if cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        ext = cpp_extension.CUDAExtension("llama_fast._C", sources + ["csrc/kernels.cu"],
                                          extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("llama_fast._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension_build()

setup(
    name="llama_fast",
    version="0.1.0",
    description="Fused Triton kernels (RMSNorm, RoPE, SwiGLU, flash attention) for Llama models in transformers",
    python_requires=">=3.10",
    packages=["llama_fast", "llama_fast.ops", "llama_fast.kernels"],
    package_dir={"llama_fast": "llama_fast", "llama_fast.kernels": "kernels"},
    install_requires=["torch>=2.11", "triton>=3.6", "transformers>=5.17,<6"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
