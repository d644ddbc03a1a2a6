"""Build and install llama_fast.

The Triton kernels in ./kernels install as the subpackage ``llama_fast.kernels`` (never as a
top-level ``kernels``: that import name belongs to Hugging Face's kernel-hub package).

The C++/CUDA extension ``llama_fast._C`` (csrc/) is built with ninja: with its CUDA kernels when a
CUDA toolkit (nvcc) and a CUDA build of torch are present, CPU kernels only otherwise.
  TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0a": Ampere, and Hopper with its
                         architecture-specific instructions)
  MAX_JOBS               parallel compile jobs (ninja)
  LLAMA_FAST_NO_EXTENSION=1   skip the extension (the library then runs on Triton and the references)
  LLAMA_FAST_REQUIRE_EXTENSION=1   fail the install when the extension fails to build (by default
                         a failed build warns and installs llama_fast without it)

Build requirements (torch, ninja) are declared in pyproject.toml. The extension is built against
the torch in the build environment and loaded only under that same torch version.
"""

import os
import sys

from setuptools import setup

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_fast")


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
                                          extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                                          extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("llama_fast._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's ninja build, plus the build record, and a failed build that does not fail the install.

        The record (llama_fast/_build_info.py beside the library) names the torch the library was
        compiled against; llama_fast.extension loads the library only under that torch, since torch's
        C++ ABI changes between releases. A failed build (no C++ compiler, say) prints why and installs
        llama_fast without the extension: the library then runs on Triton and the references, and
        ``llama_fast.extension.status()`` says why. LLAMA_FAST_REQUIRE_EXTENSION=1 makes it an error.
        """

        def build_extensions(self):
            records = [self._record(os.path.dirname(self.get_ext_fullpath(e.name))) for e in self.extensions]
            for record in records:
                if os.path.exists(record):  # a stale record copied from the source tree by build_py
                    os.remove(record)
            try:
                super().build_extensions()  # torch's compiler checks, then the ninja build
            except Exception as exc:
                if os.environ.get("LLAMA_FAST_REQUIRE_EXTENSION") == "1":
                    raise
                print(f"\nWARNING: llama_fast's C++ extension failed to build ({type(exc).__name__}: {exc}); "
                      "installing llama_fast without it. Set LLAMA_FAST_REQUIRE_EXTENSION=1 to make this an error.\n",
                      file=sys.stderr)
                for ext in self.extensions:  # nor a library left in the build folder by an earlier build
                    if os.path.exists(self.get_ext_fullpath(ext.name)):
                        os.remove(self.get_ext_fullpath(ext.name))
                self.extensions = []
                return
            for record in records:
                with open(record, "w") as f:
                    f.write("# Written by setup.py when it built llama_fast._C: the torch it was compiled against.\n"
                            f"TORCH_VERSION = {torch.__version__!r}\n")

        def copy_extensions_to_source(self):
            """Editable installs and --inplace builds: the library goes beside the sources, and its record with it.

            The old library is removed first, so the copy is a new file: rewriting it in place would
            change the pages of a process that has it loaded (a test run, a notebook) under its feet.
            """
            for ext in self.extensions:
                old = os.path.join(SOURCE, os.path.basename(self.get_ext_filename(self.get_ext_fullname(ext.name))))
                if os.path.exists(old):
                    os.remove(old)
            super().copy_extensions_to_source()
            if self.extensions:
                self.copy_file(self._record(os.path.join(self.build_lib, "llama_fast")), self._record(SOURCE))

        @staticmethod
        def _record(folder):
            return os.path.join(folder, "_build_info.py")

    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension_build()

setup(
    name="llama_fast",
    version="0.1.0",
    description="Fused Triton kernels (RMSNorm, RoPE, SwiGLU, flash attention) for Llama models in transformers",
    python_requires=">=3.10",
    packages=["llama_fast", "llama_fast.ops", "llama_fast.patch", "llama_fast.kernels", "llama_fast.hub"],
    package_dir={"llama_fast": "llama_fast", "llama_fast.kernels": "kernels"},
    # The instruction set of `python -m llama_fast train`, read with importlib.resources; the kernel
    # repository Hugging Face's kernels package loads llama_fast.hub's layers from (a folder, not a package).
    package_data={"llama_fast": ["data/*.jsonl"],
                  "llama_fast.hub": ["repository/torch-universal/metadata.json",
                                     "repository/torch-universal/llama_fast_layers/*.py"]},
    install_requires=["torch>=2.11", "triton>=3.6", "transformers>=5.17,<6"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
