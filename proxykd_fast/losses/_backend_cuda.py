"""Backend 'cuda': the CUDA C++ extension built from csrc/ (optional)."""

from __future__ import annotations


def unavailable_reason() -> str:
    """Why this backend cannot be used here ('' when it can)."""
    try:
        from proxykd_fast import _cuda_ext  # noqa: F401
    except ImportError:
        return "the CUDA extension was not built (install with PROXYKD_BUILD_CUDA=1 where nvcc is available)"
    return "the CUDA extension provides no loss entry points yet; use backend='triton' or 'torch'"
