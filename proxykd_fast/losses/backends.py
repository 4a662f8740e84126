"""Backends: one typed `Backend` object per implementation, and the registry that resolves a name.

A backend is its row epilogue (the chunk engine's per-chunk step), its per-token steps for
sequence losses, and optionally a tile-fused strategy that serves some entry points without
any logits chunk. Its methods are the only place that chooses between those; the public losses
validate, call `resolve` and then one method. The registry resolves "auto" and applies the
fp64 rule once: the Triton and CUDA kernels accumulate in fp32, so fp64 inputs always run the
torch backend (the fp64 oracle path of the tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _rows
from ._gemm import default_chunk_rows
from ._preference import Objective, PairPlan, TokenRows, plan_pairs, sequence_loss, token_pass
from ._spec import Head, KDBatch, LossSpec, accumulation_dtype
from ._vocab_parallel import VocabShard

BACKENDS = ("auto", "reference", "torch", "triton", "triton-chunked", "triton-fused", "cuda")


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA devices, or on CPU tensors under TRITON_INTERPRET=1."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


@dataclass(frozen=True)
class Backend:
    """One implementation of every fused loss entry point.

    row_epilogue: the chunk engine's per-chunk NLL / divergence / dlogits step (RowEpilogue).
    token_rows: per-token log-prob and dlogits steps for sequence losses (DPO); None: sequence
        losses differentiate `log_probs` on the gathered tokens instead.
    tile_fused: a strategy that serves some entry points with no logits chunk at all, or None.
    """

    name: str
    row_epilogue: _rows.RowEpilogue
    token_rows: TokenRows | None
    tile_fused: object | None = None  # _tile_fused.TileFused (kept untyped: it imports triton)
    unavailable: Callable[[torch.device], str] = lambda device: ""
    fp64: bool = False  # runs fp64 inputs itself; otherwise the registry gives them the torch backend

    def kd(self, batch: KDBatch, spec: LossSpec) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, nll_sum, kd_sum) of NLL + alpha * w * KD (or plain CE when spec.divergence is None)."""
        if self.tile_fused is not None and (out := self.tile_fused.kd(batch, spec)) is not None:
            return out
        return _rows.fused_kd(batch, spec, self.row_epilogue)

    def log_probs(self, head: Head, labels: Tensor, temperature: float, ignore_index: int,
                  chunk_size: int | None, shard: VocabShard | None = None) -> Tensor:
        """Per-token log softmax(z/T)[label], 0 on ignored rows; differentiable."""
        if self.tile_fused is not None and (out := self.tile_fused.log_probs(head, labels, temperature,
                                                                             ignore_index)) is not None:
            return out
        return _rows.fused_log_probs(head, labels, temperature, ignore_index, chunk_size, self.row_epilogue, shard)

    def log_probs_entropy(self, head: Head, labels: Tensor, temperature: float, ignore_index: int,
                          chunk_size: int | None, shard: VocabShard | None = None) -> tuple[Tensor, Tensor]:
        """Per-token log-probs and entropies of softmax(z/T), 0 on ignored rows; both differentiable.

        Every chunked backend runs the torch step of the engine for it (two [C, V] buffers per chunk).
        """
        return _rows.FusedLogProbsEntropy.apply(head.hidden, head.weight, head.bias, labels, temperature,
                                                ignore_index, chunk_size, shard)

    def topk(self, head: Head, k: int, temperature: float, chunk_size: int | None,
             shard: VocabShard | None = None) -> tuple[Tensor, Tensor]:
        """Top-k ids and log-probs of softmax(z/T) over the full vocabulary (no grad)."""
        if self.tile_fused is not None and (out := self.tile_fused.topk(head, k, temperature)) is not None:
            return out
        return _rows.chunked_topk(head, k, temperature, chunk_size, shard)

    def sequence_plan(self, flat_labels: Tensor, lead: tuple[int, int], ignore_index: int, chunk_size: int | None,
                      n_tokens: int, vocab: int) -> PairPlan | None:
        """The token chunks of a pair-stacked batch (`n_tokens` non-ignored), or None without token rows."""
        if self.token_rows is None:
            return None
        rows = chunk_size or default_chunk_rows(flat_labels.device, 1, vocab, max(1, n_tokens))
        return plan_pairs(flat_labels, lead, ignore_index, rows)

    def sequence_sums(self, head: Head, flat_labels: Tensor, plan: PairPlan | None, lead: tuple[int, int],
                      ignore_index: int, chunk_size: int | None, shard: VocabShard | None = None) -> Tensor:
        """Per-row token log-prob sums [rows] in fp64, forward only (a reference model's pass)."""
        if self.token_rows is not None and plan is not None:
            return token_pass(head.detached(), plan, self.token_rows, None, False, False, False, shard)[0]
        with torch.no_grad():
            return token_sums(self, head.detached(), flat_labels, lead, 1.0, ignore_index, chunk_size, shard)[0]

    def sequence_loss(self, head: Head, flat_labels: Tensor, plan: PairPlan | None, lead: tuple[int, int],
                      ignore_index: int, chunk_size: int | None, obj: Objective, out_dtype: torch.dtype,
                      shard: VocabShard | None = None) -> tuple[Tensor, Tensor]:
        """(loss, detached row sums) of a sequence objective: token-chunked where the backend has token rows."""
        if self.token_rows is not None and plan is not None:
            return sequence_loss(head, plan, self.token_rows, obj, out_dtype, shard)
        sums, _ = token_sums(self, head, flat_labels, lead, 1.0, ignore_index, chunk_size, shard)
        return obj.total(sums).to(out_dtype), sums.detach()

    def vocab_parallel(self, shard: VocabShard) -> Backend:
        """This backend for weights sharded by vocabulary rows: the chunk engine with the torch epilogue,
        whose row statistics are all-reduced (the Triton / CUDA row kernels and the tile-fused strategy
        finish a row in one launch, before the other ranks' statistics could be known)."""
        from ._epilogue_torch import TorchEpilogue, TorchTokenRows

        return Backend(self.name, TorchEpilogue(), TorchTokenRows(shard), None, self.unavailable, fp64=True)


def token_sums(backend: Backend, head: Head, flat_labels: Tensor, lead: tuple[int, int], temperature: float,
               ignore_index: int, chunk_size: int | None, shard: VocabShard | None = None) -> tuple[Tensor, Tensor]:
    """(per-row sum of token log-probs in fp64, per-row count of non-ignored tokens); differentiable.

    Only the non-ignored tokens are gathered and sent through `backend.log_probs`.
    """
    rows, t = lead
    idx = (flat_labels != ignore_index).nonzero().view(-1)
    row_of = torch.div(idx, t, rounding_mode="floor") if t else idx
    every = idx.numel() == flat_labels.numel()  # nothing to skip: no gathered copy
    gathered = head if every else Head(head.hidden.index_select(0, idx), head.weight, head.bias)
    lp = backend.log_probs(gathered, flat_labels if every else flat_labels.index_select(0, idx), temperature,
                           ignore_index, chunk_size, shard)
    sums = torch.zeros(rows, dtype=torch.float64, device=head.hidden.device).index_add(0, row_of, lp.double())
    return sums, torch.bincount(row_of, minlength=rows)


class ReferenceBackend(Backend):
    """The materializing oracle: full logits and autograd (see reference.py)."""

    def vocab_parallel(self, shard: VocabShard) -> Backend:
        raise ValueError("backend='reference' materializes the full logits and does not take vocab_parallel_group; "
                         "use backend='torch' (or 'auto') with a sharded head")

    def kd(self, batch: KDBatch, spec: LossSpec) -> tuple[Tensor, Tensor, Tensor]:
        from .reference import reference_kd

        return reference_kd(batch, spec)

    def log_probs(self, head: Head, labels: Tensor, temperature: float, ignore_index: int,
                  chunk_size: int | None, shard: VocabShard | None = None) -> Tensor:
        from .reference import reference_log_probs

        return reference_log_probs(head.hidden, head.weight, head.bias, labels, temperature, ignore_index)

    def log_probs_entropy(self, head: Head, labels: Tensor, temperature: float, ignore_index: int,
                          chunk_size: int | None, shard: VocabShard | None = None) -> tuple[Tensor, Tensor]:
        from .reference import reference_log_probs_entropy

        return reference_log_probs_entropy(head.hidden, head.weight, head.bias, labels, temperature, ignore_index)

    def topk(self, head: Head, k: int, temperature: float, chunk_size: int | None,
             shard: VocabShard | None = None) -> tuple[Tensor, Tensor]:
        from .reference import reference_topk

        return reference_topk(head.hidden, head.weight, head.bias, k, temperature)


def _torch() -> Backend:
    from ._epilogue_torch import TorchEpilogue, TorchTokenRows

    return Backend("torch", TorchEpilogue(), TorchTokenRows(), fp64=True)


def _reference() -> Backend:
    from ._epilogue_torch import TorchEpilogue

    return ReferenceBackend("reference", TorchEpilogue(), None, fp64=True)


def _triton_unavailable(device: torch.device) -> str:
    from proxykd_fast.ops.runtime import unavailable_reason

    if not triton_usable(device):
        return (f"it needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 before importing "
                "proxykd_fast to run the kernels in the Triton interpreter")
    return unavailable_reason()


def _triton(name: str, fused: bool) -> Backend:
    from ._epilogue_triton import TritonEpilogue, TritonTokenRows
    from ._tile_fused import TileFused

    # The chunked strategy (cuBLAS GEMMs + one row kernel per chunk) is the faster one; the tile-fused
    # one is the memory floor. Both use the streaming tile top-k, which never holds a logits row.
    return Backend(name, TritonEpilogue(), None if fused else TritonTokenRows(), TileFused(kd_and_log_probs=fused),
                   _triton_unavailable)


def _cuda() -> Backend:
    from ._epilogue_cuda import CudaEpilogue, unavailable_reason
    from ._epilogue_torch import TorchTokenRows

    def why(device: torch.device) -> str:
        return f"it needs CUDA tensors, got {device}" if device.type != "cuda" else unavailable_reason()

    return Backend("cuda", CudaEpilogue(), TorchTokenRows(), None, why)


_FACTORIES: dict[str, Callable[[], Backend]] = {
    "reference": _reference,
    "torch": _torch,
    "triton": lambda: _triton("triton", fused=False),  # the best Triton strategy per entry point
    "triton-chunked": lambda: _triton("triton-chunked", fused=False),
    "triton-fused": lambda: _triton("triton-fused", fused=True),
    "cuda": _cuda,
}
_LOADED: dict[str, Backend | str] = {}


def _load(name: str) -> Backend | str:
    """The backend object, or why it cannot be imported here (cached)."""
    if name not in _LOADED:
        try:
            _LOADED[name] = _FACTORIES[name]()
        except ImportError as exc:  # a missing optional dependency (triton) or extension
            _LOADED[name] = f"it cannot be imported: {exc}"
    return _LOADED[name]


def resolve(backend: str | Backend, device: torch.device, *tensors: Tensor | None,
            shard: VocabShard | None = None) -> Backend:
    """The Backend for `backend` on `device` (a clear ValueError if it cannot run there).

    'auto' is 'triton' on CUDA where it works, else 'torch'. When any of `tensors` is fp64 the
    torch backend runs instead of a Triton or CUDA one (their kernels accumulate in fp32). With a
    vocab `shard`, the backend's vocab-parallel form.
    """
    if isinstance(backend, Backend):
        chosen = backend
    elif not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or a Backend), got {backend!r}")
    elif backend == "auto":
        triton_backend = _load("triton") if device.type == "cuda" else None
        chosen = triton_backend if isinstance(triton_backend, Backend) and not triton_backend.unavailable(device) \
            else _load("torch")
    else:
        chosen = _load(backend)
        if isinstance(chosen, str):
            raise ValueError(f"backend={backend!r} is not available: {chosen}")
    why = chosen.unavailable(device)
    if why:
        raise ValueError(f"backend={chosen.name!r} is not available: {why}")
    if not chosen.fp64 and accumulation_dtype(*tensors) == torch.float64:
        chosen = _load("torch")
    return chosen if shard is None else chosen.vocab_parallel(shard)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends usable for tensors on `device`."""
    device = torch.device(device)
    return [name for name in BACKENDS[1:] if isinstance(b := _load(name), Backend) and not b.unavailable(device)]
