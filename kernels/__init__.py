"""Triton kernels of llama_fast, one op per module.

Installed as ``llama_fast.kernels`` (setup.py maps this folder there): the bare top-level name
``kernels`` belongs to Hugging Face's kernel-hub package, which transformers probes on import.

A kernel module knows nothing of autograd or transformers. Each holds a docstring with the maths,
the shapes, what the backward pass needs, and the byte or FLOP count; then the ``@triton.jit``
kernels; then allocating launchers that take and return plain tensors.
"""

if __name__ == "kernels":
    # This folder is imported by that bare name only when the repository root is on sys.path (``python -m``
    # run in a clone, as the README's commands are), and then it hides the hub package, which transformers
    # 5.25 requires and imports (integrations/hub_kernels.py: ``from kernels import CUDAProperties, ...``
    # failed with an ImportError from this folder). The hub package is loaded in this module's place.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path
                                                                 if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (Hugging Face's kernel hub package; the folder of that "
                                  "name in llama_fast's repository is llama_fast.kernels)", name="kernels")
    _hub = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _hub
    _spec.loader.exec_module(_hub)
