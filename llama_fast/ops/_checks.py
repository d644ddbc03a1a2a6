"""Input checks shared by the ops: each raises with a message that names the problem."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# These run on every call of every op, so the passing case is kept to a few attribute reads and
# comparisons; the messages are built only on failure (a dict and a set per check cost ~0.4 µs,
# measured on the 2-core Xeon, against ~1 µs for a whole torch.mul of decode-sized tensors).
def check_dtype(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported are float32, float16 and bfloat16")


def _check_same(op: str, attr: str, tensors: dict, error: type, requirement: str, label: str) -> None:
    """Raise ``error`` unless every tensor has one value of ``attr``; the message lists them all."""
    first = None
    for t in tensors.values():
        value = getattr(t, attr)
        if first is None:
            first = value
        elif value != first:
            listed = ", ".join(f"{name} {label}{getattr(t, attr)}" for name, t in tensors.items())
            raise error(f"{op}: inputs must {requirement}, got {listed}")


def check_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    _check_same(op, "dtype", tensors, TypeError, "share one dtype", "")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    _check_same(op, "device", tensors, ValueError, "be on one device", "on ")


def unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has unit stride (or length 1), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` flattened to 2-D (rows, last dim) with unit stride along the last dim.

    A view when the leading dims collapse to one stride (the usual case); a copy otherwise.
    A 2-D ``t`` skips the reshape: each torch call costs microseconds on CPU, which the CPU
    kernels' small inputs (a decode step) feel.
    """
    return unit_stride_last(t if t.dim() == 2 else t.reshape(-1, t.shape[-1]))
