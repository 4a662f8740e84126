"""The one chunk loop of every chunked loss: plan -> per-chunk GEMMs -> epilogue -> gradient GEMMs.

A plan is a list of `Chunk`s, each naming the hidden rows it holds (a slice, or gathered rows so
that prompt and padding tokens cost no GEMM). Per chunk the engine writes the student's (and an
online proxy's) logits into fp32 (fp64 for fp64 inputs) workspace buffers, hands them to the
caller's `ChunkEpilogue`, and, when the epilogue left d loss / d logits in S, adds the chunk's
dX rows and its share of the fp32 dW and db. CE, KD, log-probs, top-k and DPO differ only in the
plan and the epilogue they pass in (see _rows.py and _preference.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ._gemm import (
    accumulate_grad_weight,
    cpu_lowp_weight_grad,
    grad_input_chunk,
    grad_operand,
    grad_weight_buffer,
    logits_into,
    weight_grad_once,
    workspace,
)
from ._spec import Head
from ._vocab_parallel import VocabShard


@dataclass(frozen=True)
class Chunk:
    """Positions [start, stop) of a plan, held by hidden rows `rows` (None: rows start..stop)."""

    start: int
    stop: int
    rows: Tensor | None = None
    meta: Any = None  # the plan's own per-chunk data (DPO: its pair range and whether it is streamed)

    def take(self, t: Tensor) -> Tensor:
        """This chunk's rows of a per-row tensor: a slice, or the gathered rows."""
        return t[self.start : self.stop] if self.rows is None else t.index_select(0, self.rows)


def kept_rows(keep: Tensor) -> Tensor | None:
    """Indices of the rows to compute (where `keep`), or None when every row is kept."""
    if not keep.numel():
        return None
    order = keep.nonzero().view(-1)
    return None if order.numel() == keep.numel() else order


def row_chunks(n: int, rows_per_chunk: int, order: Tensor | None = None) -> list[Chunk]:
    """Chunks of at most `rows_per_chunk` rows over rows 0..n-1, or over the rows listed in `order`."""
    m = n if order is None else order.numel()
    step = max(1, min(rows_per_chunk, m))
    return [Chunk(s, min(s + step, m), None if order is None else order[s : s + step]) for s in range(0, m, step)]


class ChunkEpilogue(Protocol):
    """Turns one chunk's logits into the caller's outputs; returns True when S now holds dlogits."""

    def __call__(self, chunk: Chunk, S: Tensor, P: Tensor | None, R: Tensor | None) -> bool: ...


@dataclass
class Gradients:
    """dX (the hidden's dtype), dW and db (fp32, or fp64) accumulated over a pass; None if not asked.

    dW may be a transposed view (the CPU low-precision accumulator) or a one-chunk pass's contiguous
    bf16/fp16 product: hand it to autograd through `_gemm.param_grad`, which writes it contiguous in the
    parameter's dtype (and passes the product through when the upstream gradient is 1).
    """

    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None


def run(
    chunks: list[Chunk],
    student: Head,
    epilogue: ChunkEpilogue,
    *,
    acc_dtype: torch.dtype,
    nbuf: int = 1,
    proxy: Head | None = None,
    grad_hidden: bool = False,
    grad_weight: bool = False,
    grad_bias: bool = False,
    shard: VocabShard | None = None,
) -> Gradients:
    """One pass over `chunks` with `nbuf` [rows, V] buffers: S (student), then P (proxy), then R (scratch).

    With a vocab `shard` the weights are this rank's rows: dX is this rank's partial sum until the
    pass ends, then all-reduced once (in fp32); dW and db are this rank's rows of the full gradient.
    """
    hs, ws, bs = student.hidden, student.weight, student.bias
    device, vocab = hs.device, ws.shape[0]
    out = Gradients()
    if grad_hidden:
        dense = all(c.rows is None for c in chunks) and sum(c.stop - c.start for c in chunks) == hs.shape[0]
        if shard is not None:
            out.hidden = torch.zeros(hs.shape, device=device, dtype=acc_dtype)
        else:
            out.hidden = torch.empty_like(hs) if dense else torch.zeros_like(hs)
    lowp_dw = grad_weight and cpu_lowp_weight_grad(ws, acc_dtype, hs.dtype)
    # one low-precision CPU chunk: dW is its GEMM's product as it is (rounded once, as plain torch), with
    # none of the fp32 accumulator's zero fill, add and copy, which dominate at small N
    dw_once = lowp_dw and len(chunks) == 1
    if grad_weight and not dw_once:
        out.weight = grad_weight_buffer(ws, acc_dtype, transposed=lowp_dw)
    if grad_bias:
        out.bias = torch.zeros(vocab, device=device, dtype=acc_dtype)
    if not chunks:
        return _reduced(out, shard, hs.dtype)
    bufs = workspace(device, nbuf, max(c.stop - c.start for c in chunks), vocab, acc_dtype)
    with_proxy = proxy is not None and nbuf >= 2
    with_scratch = nbuf > (2 if proxy is not None else 1)
    for chunk in chunks:
        c = chunk.stop - chunk.start
        x = chunk.take(hs)
        S = logits_into(bufs[0][:c], x, ws, bs)
        P = logits_into(bufs[1][:c], chunk.take(proxy.hidden), proxy.weight, proxy.bias) if with_proxy else None
        R = bufs[-1][:c] if with_scratch else None
        if not epilogue(chunk, S, P, R) or not (grad_hidden or grad_weight or grad_bias):
            continue
        G = grad_operand(S, ws)
        if out.hidden is not None:
            dx = grad_input_chunk(G, ws)
            if chunk.rows is None:
                out.hidden[chunk.start : chunk.stop] = dx
            else:
                out.hidden.index_copy_(0, chunk.rows, dx.to(out.hidden.dtype))
        if dw_once:
            out.weight = weight_grad_once(x, G)
        elif out.weight is not None:
            accumulate_grad_weight(out.weight, S, x, G)
        if out.bias is not None:
            out.bias += S.sum(0)
    if dw_once and out.weight is None:  # the one chunk's epilogue had no gradient
        out.weight = torch.zeros(ws.shape, device=device, dtype=acc_dtype)
    return _reduced(out, shard, hs.dtype)


def _reduced(out: Gradients, shard: VocabShard | None, hidden_dtype: torch.dtype) -> Gradients:
    """Vocab-parallel: sum every rank's dX partial once and cast it to the hidden's dtype."""
    if shard is not None and out.hidden is not None:
        out.hidden = shard.sum_(out.hidden).to(hidden_dtype)
    return out
