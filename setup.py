"""Build and install llama_fast.

The Triton kernels in ./kernels install as the subpackage ``llama_fast.kernels`` (never as a
top-level ``kernels``: that import name belongs to Hugging Face's kernel-hub package).
"""

from setuptools import setup

setup(
    name="llama_fast",
    version="0.1.0",
    description="Fused Triton kernels (RMSNorm, RoPE, SwiGLU, flash attention) for Llama models in transformers",
    python_requires=">=3.10",
    packages=["llama_fast", "llama_fast.ops", "llama_fast.kernels"],
    package_dir={"llama_fast": "llama_fast", "llama_fast.kernels": "kernels"},
    install_requires=["torch>=2.11", "triton>=3.6", "transformers>=5.17,<6"],
)
