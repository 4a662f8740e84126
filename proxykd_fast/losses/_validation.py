"""Input checks and flattening shared by every loss and backend.

Every public loss funnels its arguments through here so that bad input fails early with an
error naming the argument and the expected shape or dtype, never deep inside a kernel.
"""

from __future__ import annotations

import math
import numbers

import numpy
import torch
from torch import Tensor

from ._spec import DIVERGENCES, REDUCTIONS, Head, KDBatch, LossSpec
from ._vocab_parallel import VocabShard, check_same_on_every_rank, compute_dtype, gather_dtensor, make_shard

# Above this, T^2 * KD loses its fp32 precision to cancellation (the error grows like T^2 * eps *
# |log q|: ~1e-2 absolute at T=100); distillation uses T in [0.5, 10].
MAX_KD_TEMPERATURE = 100.0


def _scalar(name: str, value: object, kind: str) -> object:
    """A 0-dim tensor's Python value (refusing other tensors and bools); other values pass through."""
    if isinstance(value, Tensor):
        integral = not (value.is_floating_point() or value.is_complex())
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex() or (kind == "an int" and not integral):
            raise TypeError(f"{name} must be {kind} or a 0-dim tensor of one, got a tensor of shape "
                            f"{list(value.shape)} and dtype {value.dtype}")
        return value.item()
    return value


def check_real(name: str, value: object, *, low: float | None = None, low_open: bool = False,
               high: float | None = None, high_open: bool = False) -> float:
    """A finite real number (int, float, numpy scalar or 0-dim tensor; not a bool or a string) in range."""
    value = _scalar(name, value, "a real number")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    if low is not None:
        bad = bad or (v <= low if low_open else v < low)
    if high is not None:
        bad = bad or (v >= high if high_open else v > high)
    if bad:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
        bound = " and ".join(b for b in (lo, hi) if b)
        raise ValueError(f"{name} must be a finite number{' ' + bound if bound else ''}, got {value}")
    return v


def check_int(name: str, value: object, *, low: int | None = None) -> int:
    """An integer (int, numpy integer or 0-dim integer tensor; not a bool, float or string), >= low."""
    value = _scalar(name, value, "an int")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v}")
    return v


def check_flag(name: str, value: object) -> bool:
    """A bool (numpy bools included), not a string or a number."""
    if not isinstance(value, (bool, numpy.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_floating(name: str, t: Tensor) -> None:
    """Require a floating-point tensor (fp16, bf16, fp32 or fp64) on a real device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32/bf16/fp16/fp64), got {t.dtype}")
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (no data); materialize it on a real device first")


def check_device(name: str, t: Tensor | None, device: torch.device) -> None:
    """Require `t` (a tensor) to live on `device` (the student hidden's device)."""
    if t is not None and not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but student hidden is on {device}; move all inputs to one device")


def flatten_hidden(name: str, hidden: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Return hidden as [N, H] and its leading shape ([N] or [B, T])."""
    check_floating(name, hidden)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{name} must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] == 0:
        raise ValueError(f"{name} has hidden size 0 (shape {tuple(hidden.shape)}); expected H >= 1")
    lead = tuple(hidden.shape[:-1])
    return hidden.reshape(-1, hidden.shape[-1]), lead


def check_weight(name: str, weight: Tensor, hidden_size: int, hidden_name: str) -> int:
    """Require an lm_head weight of shape [V, H] matching the hidden size; return V."""
    check_floating(name, weight)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden_size:
        raise ValueError(
            f"{name} is [V, H] = {tuple(weight.shape)} but {hidden_name} has hidden size {hidden_size}; "
            f"expected {name}.shape[1] == {hidden_size}"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"{name} has an empty vocabulary")
    return weight.shape[0]


def check_bias(name: str, bias: Tensor | None, vocab: int) -> None:
    """Require a bias of shape [V] when given."""
    if bias is None:
        return
    check_floating(name, bias)
    if tuple(bias.shape) != (vocab,):
        raise ValueError(f"{name} must have shape [V] = ({vocab},), got {tuple(bias.shape)}")


def check_labels(labels: Tensor, lead: tuple[int, ...], vocab: int, ignore_index: int) -> Tensor:
    """Require integer labels shaped like hidden's leading dims, each in [0, V) or ignore_index."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    ignore_index = check_int("ignore_index", ignore_index)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels must have shape {list(lead)} (hidden's leading dims), got {list(labels.shape)}")
    flat = labels.reshape(-1).long()
    if flat.numel():
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
        if bool(bad.any()):
            value = int(flat[bad][0])
            raise ValueError(
                f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {value}"
            )
    return flat


def check_temperature(temperature: float, name: str = "temperature", high: float | None = None) -> float:
    """Require a finite, strictly positive temperature (at most `high` when given)."""
    t = check_real(name, temperature, low=0.0, low_open=True, high=high)
    return t


def check_reduction(reduction: str) -> str:
    """Require one of mean / sum / none."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_chunk_size(chunk_size: int | None) -> int | None:
    """Require a positive integer chunk size when given."""
    return None if chunk_size is None else check_int("chunk_size", chunk_size, low=1)


def resolve_denominator(
    reduction: str, num_items_in_batch: int | float | Tensor | None, n_valid: int
) -> float:
    """Return what the summed loss is divided by: num_items_in_batch, the valid count, or 1.

    `num_items_in_batch` is validated whatever the reduction (a positive finite scalar), but
    only `mean` divides by it.
    """
    value = None
    if num_items_in_batch is not None:
        n = num_items_in_batch
        if isinstance(n, Tensor):
            if n.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a scalar (one element), got a tensor of shape "
                                 f"{list(n.shape)}")
            n = n.detach().reshape(())
        if isinstance(n, bool) or not isinstance(n, (numbers.Real, Tensor)):
            raise TypeError(f"num_items_in_batch must be an int, float or scalar tensor, got {type(n).__name__}")
        value = check_real("num_items_in_batch", n, low=0.0, low_open=True)
    if reduction != "mean":
        return 1.0
    return float(max(n_valid, 1)) if value is None else value


def expand_sample_weight(sample_weight: Tensor | None, lead: tuple[int, ...], device: torch.device) -> Tensor | None:
    """Expand per-sequence [B] or per-row [N]/[B, T] weights to one fp32 weight per row."""
    if sample_weight is None:
        return None
    if not isinstance(sample_weight, Tensor):
        sample_weight = torch.as_tensor(sample_weight, dtype=torch.float32, device=device)
    check_device("sample_weight", sample_weight, device)
    if not (sample_weight.is_floating_point() or sample_weight.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"sample_weight must be a float tensor, got {sample_weight.dtype}")
    w = sample_weight.detach().float()
    n = math.prod(lead)
    if tuple(w.shape) == lead or (w.dim() == 1 and w.shape[0] == n):
        rows = w.reshape(-1)
    elif len(lead) == 2 and w.dim() == 1 and w.shape[0] == lead[0]:
        rows = w[:, None].expand(lead).reshape(-1)
    else:
        accepted = f"[B] = [{lead[0]}], [B, T] = {list(lead)} or [N] = [{n}]" if len(lead) == 2 else f"[N] = [{n}]"
        raise ValueError(f"sample_weight must have shape {accepted}, got {list(w.shape)}")
    if bool(torch.isnan(rows).any()) or bool(torch.isinf(rows).any()):
        raise ValueError("sample_weight contains NaN or inf")
    if bool((rows < 0).any()):
        raise ValueError("sample_weight must be >= 0")
    return rows.contiguous()


def prepare_head(hidden_name: str, hidden: Tensor, weight_name: str, weight: Tensor, bias_name: str,
                 bias: Tensor | None) -> tuple[Head, tuple[int, ...]]:
    """Validate one head (hidden [N, H] or [B, T, H], weight [V, H], bias [V]); return it flat and the lead shape."""
    flat, lead = flatten_hidden(hidden_name, hidden)
    check_device(weight_name, weight, flat.device)
    vocab = check_weight(weight_name, weight, flat.shape[1], hidden_name)
    check_bias(bias_name, bias, vocab)
    check_device(bias_name, bias, flat.device)
    return Head(flat, weight, bias), lead


def prepare_labels(labels: Tensor, head: Head, lead: tuple[int, ...], ignore_index: int,
                   shard: VocabShard | None = None) -> Tensor:
    """Validated flat int64 labels on the head's device, global vocabulary ids under a vocab shard."""
    check_device("labels", labels, head.hidden.device)
    flat = check_labels(labels, lead, head.vocab if shard is None else shard.vocab, ignore_index)
    if shard is not None:
        check_same_on_every_rank(shard, "labels", flat)
    return flat


def prepare_rows(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                 group: object, *, sequences: bool = False) -> tuple[Head, tuple[int, ...], Tensor, VocabShard | None]:
    """Validate one head and its labels: (flat head, lead shape, flat labels, vocab shard or None).

    A DTensor weight / bias is gathered first (gather_dtensor); `sequences` requires [rows, T, H].
    """
    dtype = compute_dtype(hidden)
    weight, bias = gather_dtensor(weight, dtype), gather_dtensor(bias, dtype)
    if sequences:
        check_floating("hidden", hidden)
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [rows, T, H] (one row per sequence), got shape {tuple(hidden.shape)}")
    head, lead = prepare_head("hidden", hidden, "weight", weight, "bias", bias)
    shard = prepare_shard(group, head)
    return head, lead, prepare_labels(labels, head, lead, ignore_index, shard), shard


def prepare_shard(group: object, head: Head) -> VocabShard | None:
    """The vocab shard of this rank when a vocab-parallel group is given (its hidden must be every rank's)."""
    if group is None:
        return None
    shard = make_shard(group, head.vocab, head.hidden.device)
    check_same_on_every_rank(shard, "hidden", head.hidden.detach())
    return shard


def _n_valid(flat_labels: Tensor, ignore_index: int) -> int:
    """How many rows are not ignored."""
    return int((flat_labels != ignore_index).sum()) if flat_labels.numel() else 0


def prepare_ce(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None, ignore_index: int,
               reduction: str, num_items_in_batch: int | float | Tensor | None, chunk_size: int | None,
               vocab_parallel_group: object = None) -> tuple[KDBatch, LossSpec]:
    """Validate a fused cross-entropy call and return the flattened batch plus options."""
    head, lead, flat_labels, shard = prepare_rows(hidden, weight, bias, labels, ignore_index, vocab_parallel_group)
    reduction = check_reduction(reduction)
    spec = LossSpec(ignore_index=int(ignore_index), reduction=reduction, chunk_size=check_chunk_size(chunk_size),
                    denominator=resolve_denominator(reduction, num_items_in_batch, _n_valid(flat_labels, ignore_index)),
                    shard=shard)
    return KDBatch(head, flat_labels, lead_shape=lead), spec


def _online_proxy(proxy_hidden: Tensor | None, proxy_weight: Tensor | None, proxy_bias: Tensor | None,
                  lead: tuple[int, ...], vocab: int, device: torch.device) -> Head:
    """Validate an online proxy head against the student's rows and vocabulary; detached."""
    if proxy_hidden is None or proxy_weight is None:
        raise ValueError("an online proxy needs both proxy_hidden and proxy_weight")
    hp, p_lead = flatten_hidden("proxy_hidden", proxy_hidden)
    if p_lead != lead:
        raise ValueError(f"proxy_hidden must have leading shape {list(lead)} like student_hidden, got {list(p_lead)}")
    check_device("proxy_hidden", proxy_hidden, device)
    check_device("proxy_weight", proxy_weight, device)
    p_vocab = check_weight("proxy_weight", proxy_weight, hp.shape[1], "proxy_hidden")
    if p_vocab != vocab:
        raise ValueError(
            f"vocab mismatch: proxy_weight has V={p_vocab} rows but student_weight has V={vocab}; "
            "proxy and student must share one vocabulary"
        )
    check_bias("proxy_bias", proxy_bias, vocab)
    check_device("proxy_bias", proxy_bias, device)
    return Head(hp, proxy_weight, proxy_bias).detached()


def _offline_targets(ids: Tensor | None, lps: Tensor | None, divergence: str, proxy_bias: Tensor | None,
                     lead: tuple[int, ...], vocab: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Validate stored top-k targets; return flat int64 ids [N, k] and fp32 log-probs [N, k]."""
    if ids is None or lps is None:
        raise ValueError("offline targets need both proxy_topk_ids and proxy_topk_logprobs")
    if divergence != "forward_kl":
        raise ValueError(
            f"offline top-k targets support divergence='forward_kl' only, got {divergence!r}: "
            "the proxy's mass outside its top-k is unknown"
        )
    if proxy_bias is not None:
        raise ValueError("proxy_bias is only meaningful with an online proxy (proxy_weight)")
    check_device("proxy_topk_ids", ids, device)
    check_device("proxy_topk_logprobs", lps, device)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"proxy_topk_ids must be an integer tensor, got {ids.dtype}")
    check_floating("proxy_topk_logprobs", lps)
    if ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead:
        raise ValueError(f"proxy_topk_ids must have shape {list(lead) + ['k']}, got {list(ids.shape)}")
    if tuple(lps.shape) != tuple(ids.shape):
        raise ValueError(
            f"proxy_topk_logprobs must have the shape of proxy_topk_ids {list(ids.shape)}, got {list(lps.shape)}"
        )
    k = ids.shape[-1]
    if k < 1 or k > vocab:
        raise ValueError(f"top-k size must be in [1, V={vocab}], got k={k}")
    flat_ids = ids.reshape(-1, k).long()
    if flat_ids.numel() and bool(((flat_ids < 0) | (flat_ids >= vocab)).any()):
        raise ValueError(f"proxy_topk_ids must be in [0, {vocab})")
    flat_lps = lps.detach().reshape(-1, k).float()
    if bool(torch.isnan(flat_lps).any()) or bool((flat_lps == float("inf")).any()):
        raise ValueError("proxy_topk_logprobs contains NaN or +inf")
    return flat_ids.contiguous(), flat_lps.contiguous()


def prepare_kd(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    *,
    proxy_hidden: Tensor | None,
    proxy_weight: Tensor | None,
    proxy_topk_ids: Tensor | None,
    proxy_topk_logprobs: Tensor | None,
    sample_weight: Tensor | None,
    alpha: float,
    temperature: float,
    divergence: str,
    jsd_beta: float,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | float | Tensor | None,
    student_bias: Tensor | None,
    proxy_bias: Tensor | None,
    chunk_size: int | None,
    nll_weight: float = 1.0,
    vocab_parallel_group: object = None,
) -> tuple[KDBatch, LossSpec]:
    """Validate a fused NLL + KD call (`proxy_kd_loss`'s arguments) and return the flat batch plus options."""
    student, lead = prepare_head("student_hidden", student_hidden, "student_weight", student_weight,
                                 "student_bias", student_bias)
    device = student.hidden.device
    shard = prepare_shard(vocab_parallel_group, student)
    flat_labels = prepare_labels(labels, student, lead, ignore_index, shard)
    reduction = check_reduction(reduction)
    chunk_size = check_chunk_size(chunk_size)
    if divergence is None:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got None; for plain NLL without a proxy use "
                         "linear_cross_entropy, for KD alone nll_weight=0")
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    alpha = check_real("alpha", alpha, low=0.0)
    nll_weight = check_real("nll_weight", nll_weight, low=0.0)
    temperature = check_temperature(temperature, high=MAX_KD_TEMPERATURE)
    jsd_beta = check_real("jsd_beta", jsd_beta)
    if divergence == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(
            f"jsd_beta must be in (0, 1) for divergence='jsd', got {jsd_beta}; "
            "use divergence='forward_kl' or 'reverse_kl' for the end points"
        )
    online = proxy_hidden is not None or proxy_weight is not None
    offline = proxy_topk_ids is not None or proxy_topk_logprobs is not None
    if online and offline:
        raise ValueError(
            "give either an online proxy (proxy_hidden, proxy_weight) or offline targets "
            "(proxy_topk_ids, proxy_topk_logprobs), not both"
        )
    if not online and not offline:
        raise ValueError(
            "a proxy is required: pass proxy_hidden and proxy_weight (online) or "
            "proxy_topk_ids and proxy_topk_logprobs (offline); use linear_cross_entropy for plain NLL"
        )
    proxy = ids = lps = None
    if online:
        proxy = _online_proxy(proxy_hidden, proxy_weight, proxy_bias, lead, student.vocab, device)
    else:
        ids, lps = _offline_targets(proxy_topk_ids, proxy_topk_logprobs, divergence, proxy_bias, lead,
                                    student.vocab if shard is None else shard.vocab, device)
    batch = KDBatch(student, flat_labels, proxy, ids, lps, expand_sample_weight(sample_weight, lead, device), lead)
    spec = LossSpec(
        alpha=alpha,
        nll_weight=nll_weight,
        temperature=temperature,
        divergence=divergence,
        offline=offline,
        jsd_beta=jsd_beta,
        ignore_index=int(ignore_index),
        reduction=reduction,
        denominator=resolve_denominator(reduction, num_items_in_batch, _n_valid(flat_labels, ignore_index)),
        chunk_size=chunk_size,
        shard=shard,
    )
    return batch, spec
