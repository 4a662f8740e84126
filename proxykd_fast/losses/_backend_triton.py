"""Backend 'triton': the best Triton strategy per entry point (see the two strategy modules).

- fused_linear_kd, linear_log_probs: 'triton-chunked' (cuBLAS GEMMs + Triton epilogue), the
  fastest; pick backend='triton-fused' for the tile-fused memory floor (no logits at all).
- linear_topk: the streaming tile top-k (k <= 64), which never writes a logits row.
"""

from __future__ import annotations

from ._backend_triton_chunked import fused_linear_kd, linear_log_probs
from ._backend_triton_fused import linear_topk
from ._epilogue_triton import unavailable_reason

__all__ = ["fused_linear_kd", "linear_log_probs", "linear_topk", "unavailable_reason"]
