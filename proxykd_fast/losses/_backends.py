"""Backend registry and dispatch: reference / torch (chunked) / triton / cuda.

Every backend implements the same three entry points over validated, flattened inputs, so a
public loss only validates, picks a backend and calls it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "torch", "triton", "triton-chunked", "triton-fused", "cuda")

_MODULES = {
    "reference": "proxykd_fast.losses._backend_reference",
    "torch": "proxykd_fast.losses._backend_torch",
    "triton": "proxykd_fast.losses._backend_triton",  # best Triton strategy per entry point
    "triton-chunked": "proxykd_fast.losses._backend_triton_chunked",  # cuBLAS GEMMs + Triton epilogue
    "triton-fused": "proxykd_fast.losses._backend_triton_fused",  # tile-fused, no logits at all
    "cuda": "proxykd_fast.losses._backend_cuda",
}


def _load(name: str) -> tuple[ModuleType | None, str]:
    """Import a backend module; return (module, why-not) with module None if unavailable."""
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:  # missing optional dependency or extension
        return None, str(exc)
    why = getattr(module, "unavailable_reason", lambda: "")()
    return (None, why) if why else (module, "")


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA devices, or on CPU tensors under TRITON_INTERPRET=1."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def resolve(backend: str, device: torch.device) -> ModuleType:
    """Return the backend module for `backend` on `device`, or raise a clear ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            module, _ = _load("triton")
            if module is not None:
                return module
        module, _ = _load("torch")
        assert module is not None
        return module
    if backend.startswith("triton") and not triton_usable(device):
        raise ValueError(
            f"backend={backend!r} needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
            "before importing proxykd_fast to run the kernels in the Triton interpreter"
        )
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got {device}")
    module, why = _load(backend)
    if module is None:
        raise ValueError(f"backend={backend!r} is not available: {why}")
    return module


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends usable for tensors on `device`."""
    device = torch.device(device)
    names = []
    for name in BACKENDS[1:]:
        if name.startswith("triton") and not triton_usable(device):
            continue
        if name == "cuda" and device.type != "cuda":
            continue
        if _load(name)[0] is not None:
            names.append(name)
    return names
