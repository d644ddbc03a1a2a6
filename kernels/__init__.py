"""Triton kernels of llama_fast, one op per module.

Installed as ``llama_fast.kernels`` (setup.py maps this folder there): the bare top-level name
``kernels`` belongs to Hugging Face's kernel-hub package, which transformers probes on import.

A kernel module knows nothing of autograd or transformers. Each holds a docstring with the maths,
the shapes, what the backward pass needs, and the byte or FLOP count; then the ``@triton.jit``
kernels; then allocating launchers that take and return plain tensors.
"""
