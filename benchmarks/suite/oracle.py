"""The correctness gate: an fp64 reference of every loss at the benchmark shape, and the parity check.

The reference is plain fp64 torch (`variants.naive_loss` on fp64 copies of the case's inputs),
independent of proxykd_fast, computed in row chunks (DPO: a forward pass for the sequence sums,
then per-row backward passes with d loss / d sums) so that it fits in memory at any shape. It is
cached per (loss, dtype, shape) in safetensors files under results/.cache/, since every variant
of a case is judged against the same numbers.

Tolerance per output: max(FLOOR[dtype], 4 x the error of plain torch at the case dtype), where
plain torch is the naive variant (GEMM in the input dtype, fp32 softmax, autograd), the usual
bar for a fused loss (cut-cross-entropy's test rule). Plain torch's error is measured in the same
oracle job. Errors: relative for scalars, relative Frobenius norm for tensors (per-token outputs
on scored rows only), absolute log-prob error for top-k (values, and the true log-prob of every
returned id, so a wrong id fails even when its reported value looks right).
"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import torch
from torch import Tensor

from .inputs import IGNORE, build_inputs
from .spec import TOPK, Case, dpo_layout, needs_grad
from .variants import Outputs, dpo_objective, masked_logp, naive_loss, scalarize

FLOOR = {"float32": 1e-4, "bfloat16": 1e-2}
PLAIN_FACTOR = 4.0
TOPK_CANDIDATES = 32  # reference candidates per row for the top-k id check
MAX_STORED = 1 << 25  # gradient elements stored per tensor (rows are subsampled above it)
CACHE = Path(__file__).resolve().parents[1] / "results" / ".cache" / "oracle"


def oracle_case(case: Case) -> Case:
    """The case whose oracle `case` shares: any variant, same loss / dtype / shape."""
    return Case(case.loss, "oracle", case.dtype, case.n, case.h, case.v)


CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 2 << 30}  # fp64 [rows, V] logits per oracle chunk


def _rows(v: int, device: torch.device | None = None) -> int:
    budget = CHUNK_BYTES["cuda" if device is not None and device.type == "cuda" else "cpu"]
    return max(1, budget // (8 * v))


def _stride(rows: int, cols: int) -> int:
    """Row stride of the stored gradient subsample (1: every row)."""
    return max(1, math.ceil(rows * cols / MAX_STORED))


def _slice(x: dict[str, Tensor], i: int, j: int) -> dict[str, Tensor]:
    """Rows i..j of every per-row input (weights and scalars unchanged)."""
    per_row = {"hidden", "labels", "proxy_hidden", "topk_ids", "topk_logprobs", "grad_logp", "grad_entropy"}
    return {k: (t[i:j] if k in per_row else t) for k, t in x.items()}


def reference(case: Case, x: dict[str, Tensor]) -> dict[str, Tensor]:
    """fp64 outputs of `case.loss` on inputs `x` (dX / dW possibly row-subsampled, see `_stride`)."""
    x64 = {k: (t.double() if t.is_floating_point() else t) for k, t in x.items()}
    if case.loss.startswith("dpo"):
        return _reference_dpo(case, x64)
    n = x64["hidden"].shape[0]
    out: dict[str, list[Tensor]] = {}
    weight = x64["weight"].detach().requires_grad_(needs_grad(case.loss))
    denom = (x64["labels"] != IGNORE).sum().clamp(min=1).double()
    loss = torch.zeros((), dtype=torch.float64, device=weight.device)
    rows = _rows(case.v, weight.device)
    for i in range(0, n, rows):
        j = min(n, i + rows)
        xc = _slice(x64, i, j)
        if case.loss == "topk":
            with torch.no_grad():
                logp = torch.log_softmax(xc["hidden"] @ weight.T, -1)
                vals, ids = logp.topk(min(TOPK_CANDIDATES, case.v), -1)
            out.setdefault("ids", []).append(ids)
            out.setdefault("lps", []).append(vals)
            continue
        h = xc["hidden"].detach().requires_grad_()
        res = naive_loss(case.loss, xc, h, weight)
        if "loss" in res:  # a chunk's mean over its own rows -> its share of the global mean
            res["loss"] = res["loss"] * (xc["labels"] != IGNORE).sum().clamp(min=1) / denom
            loss += res["loss"].detach()
        else:
            for k in ("logp", "entropy"):
                if k in res:
                    out.setdefault(k, []).append(res[k].detach())
        scalarize(case.loss, res, xc).backward()
        out.setdefault("dX", []).append(h.grad)
    ref = {k: torch.cat(v) for k, v in out.items()}
    if case.loss in ("ce", "kd_online", "kd_offline"):
        ref["loss"] = loss
    if needs_grad(case.loss):
        ref["dW"] = weight.grad
    return _subsample(ref)


def _reference_dpo(case: Case, x: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sequence sums forward (chunked over positions), d loss / d sums by autograd, then per-row backward."""
    b, t = dpo_layout(case.n)
    y, w = x["labels"], x["weight"].detach().requires_grad_()
    step = _rows(case.v, w.device)

    @torch.no_grad()
    def sums(hidden: Tensor, weight: Tensor) -> Tensor:
        out = torch.zeros(2 * b, dtype=torch.float64, device=weight.device)
        for r in range(2 * b):
            for i in range(0, t, step):
                out[r] += masked_logp(hidden[r, i:i + step] @ weight.T, y[r, i:i + step])[1].sum()
        return out

    ref = sums(x["ref_hidden"], x["ref_weight"]) if case.loss == "dpo_online" else x["ref_logps"]
    s = sums(x["hidden"], w).requires_grad_()
    loss = dpo_objective(s, ref, y)
    (g,) = torch.autograd.grad(loss, s)
    dx = torch.zeros_like(x["hidden"])
    for r in range(2 * b):
        for i in range(0, t, step):
            h = x["hidden"][r, i:i + step].detach().requires_grad_()
            (masked_logp(h @ w.T, y[r, i:i + step])[1].sum() * g[r]).backward()
            dx[r, i:i + step] = h.grad
    return _subsample({"loss": loss.detach(), "dX": dx, "dW": w.grad})


def _subsample(ref: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep every k-th row of large gradients (the same rows are compared)."""
    for k in ("dX", "dW"):
        if k in ref:
            g = ref[k].reshape(-1, ref[k].shape[-1])
            ref[k] = g[:: _stride(*g.shape)].contiguous()
    return ref


# ------------------------------------------------------------------------------------------
# Errors and the gate


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def errors(case: Case, got: Outputs, ref: dict[str, Tensor], x: dict[str, Tensor]) -> dict[str, float]:
    """Error of each compared output of one variant against the fp64 reference."""
    errs: dict[str, float] = {}
    if case.loss == "topk":
        ids, lps = got["ids"].long().cpu(), got["lps"].double().cpu()
        order = lps.argsort(-1, descending=True)
        ids, lps = ids.gather(1, order), lps.gather(1, order)
        r_ids, r_lps = ref["ids"].cpu(), ref["lps"].cpu()
        errs["topk_values"] = float((lps - r_lps[:, :TOPK]).abs().max())
        match = ids[:, :, None] == r_ids[:, None, :]  # [N, k, candidates]
        true = torch.where(match, r_lps[:, None, :], torch.zeros_like(r_lps[:, None, :])).sum(-1)
        found = match.any(-1)
        errs["topk_ids"] = float("inf") if not bool(found.all()) else float((true - lps).abs().max())
        return errs
    if "loss" in ref:
        errs["loss"] = abs(float(got["loss"]) - float(ref["loss"])) / max(abs(float(ref["loss"])), 1e-30)
    valid = (x["labels"] != IGNORE).reshape(-1)
    for k in ("logp", "entropy"):
        if k in ref:
            errs[k] = _rel(got[k].reshape(-1)[valid], ref[k].reshape(-1)[valid])
    for k in ("dX", "dW"):
        if k in ref:
            g = got[k].reshape(-1, got[k].shape[-1])
            errs[k] = _rel(g[:: _stride(*g.shape)], ref[k])
    return errs


def tolerances(case: Case, plain: dict[str, float]) -> dict[str, float]:
    """Allowed error per output: FLOOR[dtype], or 4x plain torch's own error when that is larger."""
    return {k: max(FLOOR[case.dtype], PLAIN_FACTOR * e) for k, e in plain.items()}


def check(case: Case, got: Outputs, oracle: dict[str, Tensor], x: dict[str, Tensor]) -> dict:
    """{"ok", "errors", "tolerances"} of one variant's outputs against the cached oracle."""
    plain = {k[len("plain_err/"):]: float(v) for k, v in oracle.items() if k.startswith("plain_err/")}
    ref = {k: v for k, v in oracle.items() if not k.startswith("plain_err/")}
    errs = errors(case, got, ref, x)
    tol = tolerances(case, {k: plain.get(k, 0.0) for k in errs})
    bad = {k: e for k, e in errs.items() if not e <= tol[k]}  # NaN fails too
    return {"ok": not bad, "errors": errs, "tolerances": tol, "failed": sorted(bad)}


def oracle_path(case: Case, seed: int = 0) -> Path:
    return CACHE / f"{oracle_case(case).id}-seed{seed}.safetensors"


def compute_oracle(case: Case, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """fp64 reference plus plain torch's errors at the case dtype; saved to the cache."""
    from safetensors.torch import save_file

    from .variants import _grad_step, _nograd_step

    x = build_inputs(case, device, seed)
    ref = {k: v.detach() for k, v in reference(case, x).items()}
    fn = (lambda h, w: naive_loss(case.loss, x, h, w))  # noqa: E731
    plain = (_nograd_step(x, fn) if case.loss == "topk" else _grad_step(case.loss, x, fn))()
    errs = errors(case, plain, ref, x)
    del plain
    gc.collect()
    out = {k: v.cpu().contiguous() for k, v in ref.items()}
    out.update({f"plain_err/{k}": torch.tensor(e, dtype=torch.float64) for k, e in errs.items()})
    path = oracle_path(case, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp))
    tmp.replace(path)  # atomic: a killed job leaves no half-written oracle
    return out


def load_oracle(case: Case, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """The cached oracle of `case` (computed here if missing)."""
    from safetensors.torch import load_file

    path = oracle_path(case, seed)
    if path.exists():
        return load_file(str(path))
    return compute_oracle(case, device, seed)
