"""Where the Triton kernels can run: version and interpreter checks, shared launch flags."""

from __future__ import annotations

import os

import numpy
import torch
import triton

MIN_TRITON = (3, 6)


def triton_version() -> tuple[int, ...]:
    """(major, minor) of the installed triton."""
    return tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())


def unavailable_reason() -> str:
    """Why the Triton kernels cannot run here ('' when they can)."""
    if triton_version() < MIN_TRITON:
        return f"triton>={'.'.join(map(str, MIN_TRITON))} is required, found {triton.__version__}"
    return ""


def interpreting() -> bool:
    """Whether kernels run in the Triton CPU interpreter (bf16 tl.dot must then be upcast)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_problem() -> str:
    """Why the kernels cannot run on CPU tensors in the Triton interpreter here ('' when they can)."""
    from triton.runtime.interpreter import InterpretedFunction

    from proxykd_fast.kernels.kd_epilogue import kd_epilogue_kernel

    if not isinstance(kd_epilogue_kernel, InterpretedFunction):
        return "the Triton kernels were imported before TRITON_INTERPRET=1 was set"
    try:
        int(numpy.array([1]))
    except TypeError:  # triton<3.7's interpreter int()s 1-element arrays for loop bounds
        if triton_version() < (3, 7):
            return (f"triton {triton.__version__}'s interpreter converts 1-element arrays with int(), which "
                    f"numpy {numpy.__version__} rejects; use triton>=3.7 or an older numpy")
    return ""


def dot_flags(w: torch.Tensor) -> dict:
    """Constexpr flags for tl.dot: fp32 upcast under the interpreter, IEEE fp32 products."""
    return {"UPCAST": interpreting() and w.dtype != torch.float32,
            "PREC": "ieee" if w.dtype == torch.float32 else "tf32"}
