"""Test session setup: run Triton kernels in the CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before any kernel module is imported, so it is set here, at
collection time, before the test modules import proxykd_fast.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
