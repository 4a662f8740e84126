"""Shared set-up of the Triton test modules: the CPU interpreter when there is no GPU, the device
the kernels run on, and a module-level skip (with the reason) where neither can run them."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from proxykd_fast.ops.runtime import interpreter_problem

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
if DEVICE == "cpu" and interpreter_problem():
    pytest.skip(f"no CUDA and no usable Triton interpreter: {interpreter_problem()}", allow_module_level=True)
