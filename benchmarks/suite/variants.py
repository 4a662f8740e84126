"""Every implementation the suite times: ours (public API only), the GEMM floor and the peers.

`build(case, inputs, device)` returns a `Runner` whose `step()` does one forward (+ backward)
and returns what the parity check compares: the loss or the per-token outputs, and the
gradients of hidden and weight. Where a variant does not apply (a peer without that loss, a
GPU-only kernel on a CPU, ours before a feature lands) it raises `Unavailable` with the reason,
which the report prints. Like for like: every variant of a loss computes the same function
(the formulas are in `objectives` below and in REPORT.md).
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .inputs import IGNORE
from .spec import DPO_BETA, DPO_NLL_ALPHA, TOPK, Case, dpo_layout

Outputs = dict[str, Tensor]


class Unavailable(Exception):
    """This variant cannot run this case here (the message says why)."""


@dataclass
class Runner:
    """One variant bound to one case's inputs."""

    step: Callable[[], Outputs]
    settle: Callable[[], None] = lambda: None  # frees caches that should count against a step
    versions: dict[str, str] = field(default_factory=dict)
    note: str = ""


# Peers per loss. ours / gemm-floor / naive / compiled run for every loss.
PEERS: dict[str, tuple[str, ...]] = {
    "ce": ("torch-lce", "torch-lce-compact", "liger", "cce", "trl", "quack"),
    "logprobs": ("torch-lce", "cce", "trl"),
    "logprobs_entropy": ("trl",),
    "topk": (),
    "kd_online": ("liger", "trl"),
    "kd_offline": (),
    "dpo_online": ("liger", "trl"),
    "dpo_precomputed": ("trl",),
}
OURS_GPU = {"ours": "auto", "ours-chunked": "triton-chunked", "ours-fused": "triton-fused"}
COMMON = ("gemm-floor", *OURS_GPU, "naive", "compiled")


def variants_for(loss: str) -> tuple[str, ...]:
    """Every variant name the suite knows for `loss` (some are skipped on some devices)."""
    return (*COMMON, *PEERS[loss])


def version(dist: str) -> str:
    """Installed version of a distribution, or raise Unavailable."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError as exc:
        raise Unavailable(f"{dist} is not installed") from exc


# ------------------------------------------------------------------------------------------
# Objectives: one plain-torch definition per loss, shared by naive, compiled and the fp64 oracle.


def masked_logp(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(log-softmax, per-row log-prob of the label, 0 on ignored rows) from fp32+ logits."""
    valid = labels != IGNORE
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp, torch.where(valid, lp, torch.zeros_like(lp))


def dpo_objective(sums: Tensor, ref: Tensor, labels: Tensor) -> Tensor:
    """Sigmoid DPO (beta 0.1) mean over pairs + nll_alpha * chosen NLL per chosen token, from row sums."""
    b = sums.shape[0] // 2
    h = (sums[:b] - ref[:b]) - (sums[b:] - ref[b:])
    n_chosen = (labels[:b] != IGNORE).sum().clamp(min=1)
    return -F.logsigmoid(DPO_BETA * h).mean() + DPO_NLL_ALPHA * (-sums[:b].sum() / n_chosen)


def naive_loss(loss: str, x: dict[str, Tensor], hidden: Tensor, weight: Tensor) -> Outputs:
    """The loss with full logits (fp32, or fp64 for fp64 inputs, as Hugging Face models upcast)."""
    def logits(h: Tensor, w: Tensor) -> Tensor:
        z = F.linear(h, w)
        return z if z.dtype == torch.float64 else z.float()

    y = x["labels"]
    valid = y != IGNORE
    if loss == "topk":
        logp = torch.log_softmax(logits(hidden, weight), -1)
        vals, ids = logp.topk(TOPK, -1)
        return {"ids": ids, "lps": vals.float()}
    if loss.startswith("dpo"):
        _, lp = masked_logp(logits(hidden, weight), y)
        if loss == "dpo_online":
            with torch.no_grad():
                _, rlp = masked_logp(logits(x["ref_hidden"], x["ref_weight"]), y)
            ref = rlp.sum(-1)
        else:
            ref = x["ref_logps"].to(lp.dtype)
        return {"loss": dpo_objective(lp.sum(-1), ref, y)}
    logq, lp = masked_logp(logits(hidden, weight), y)
    if loss.startswith("logprobs"):
        out = {"logp": lp}
        if loss == "logprobs_entropy":
            ent = -(logq.exp() * logq).sum(-1)
            out["entropy"] = torch.where(valid, ent, torch.zeros_like(ent))
        return out
    denom = valid.sum().clamp(min=1)
    nll = -lp.sum()
    if loss == "ce":
        return {"loss": nll / denom}
    if loss == "kd_online":
        with torch.no_grad():
            logp = torch.log_softmax(logits(x["proxy_hidden"], x["proxy_weight"]), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
    else:  # kd_offline: KL to the top-k targets renormalized over their k entries
        logp = torch.log_softmax(x["topk_logprobs"].to(logq.dtype), -1)
        kl = (logp.exp() * (logp - logq.gather(-1, x["topk_ids"]))).sum(-1)
    return {"loss": (nll + torch.where(valid, kl, torch.zeros_like(kl)).sum()) / denom}


def scalarize(loss: str, out: Outputs, x: dict[str, Tensor]) -> Tensor:
    """The scalar that is differentiated: the loss, or fixed upstream gradients . the per-token outputs."""
    if "loss" in out:
        return out["loss"]
    s = (out["logp"] * x["grad_logp"].to(out["logp"].dtype)).sum()
    if "entropy" in out:
        s = s + (out["entropy"] * x["grad_entropy"].to(out["entropy"].dtype)).sum()
    return s


# ------------------------------------------------------------------------------------------
# The runners


def _grad_step(loss: str, x: dict[str, Tensor], fn: Callable[[Tensor, Tensor], Outputs]) -> Callable[[], Outputs]:
    """A step running `fn(hidden, weight)` forward and backward; returns its outputs and dX, dW."""
    hidden = x["hidden"].detach().clone().requires_grad_()
    weight = x["weight"].detach().clone().requires_grad_()

    def step() -> Outputs:
        out = fn(hidden, weight)
        scalarize(loss, out, x).backward()
        res = {k: v.detach() for k, v in out.items()}
        res["dX"], res["dW"] = hidden.grad, weight.grad
        hidden.grad = weight.grad = None
        return res
    return step


def _nograd_step(x: dict[str, Tensor], fn: Callable[[Tensor, Tensor], Outputs]) -> Callable[[], Outputs]:
    def step() -> Outputs:
        with torch.no_grad():
            return fn(x["hidden"], x["weight"])
    return step


def _step(case: Case, x: dict[str, Tensor], fn: Callable[[Tensor, Tensor], Outputs]) -> Callable[[], Outputs]:
    return _nograd_step(x, fn) if case.loss == "topk" else _grad_step(case.loss, x, fn)


def _synced(step: Callable[[], Outputs], device: torch.device) -> Callable[[], Outputs]:
    """On CUDA the step ends when the device is done (so host timers time the work)."""
    if device.type != "cuda":
        return step

    def run() -> Outputs:
        out = step()
        torch.cuda.synchronize(device)
        return out
    return run


def build(case: Case, x: dict[str, Tensor], device: torch.device) -> Runner:
    """The runner of `case.variant` on these inputs, or raise Unavailable."""
    if case.variant not in variants_for(case.loss):
        raise Unavailable(f"{case.variant} does not implement {case.loss}")
    name = case.variant
    if name == "gemm-floor":
        runner = _gemm_floor(case, x)
    elif name in OURS_GPU:
        runner = _ours(case, x, device)
    elif name in ("naive", "compiled"):
        runner = _naive(case, x, compiled=name == "compiled", device=device)
    else:
        runner = _PEER_BUILDERS[name](case, x, device)
    runner.step = _synced(runner.step, device)
    runner.versions.setdefault("torch", torch.__version__)
    return runner


def _gemm_floor(case: Case, x: dict[str, Tensor]) -> Runner:
    """The loss's GEMMs alone, at full size over the scored rows, in the input dtype: logits (each
    model), dX = S @ W and dW = S.T @ X. No softmax, no chunking: the best the GEMM library does."""
    from .spec import gemm_count

    n_gemm = gemm_count(case.loss)
    h, w = x["hidden"].reshape(-1, case.h), x["weight"]
    keep = (x["labels"].reshape(-1) != IGNORE).nonzero().view(-1) if case.loss != "topk" else None
    hv = h if keep is None else h.index_select(0, keep)
    second = None
    if case.loss == "kd_online":
        second = (x["proxy_hidden"].reshape(-1, case.h).index_select(0, keep), x["proxy_weight"])
    if case.loss == "dpo_online":
        second = (x["ref_hidden"].reshape(-1, case.h).index_select(0, keep), x["ref_weight"])

    def step() -> Outputs:
        with torch.no_grad():
            s = hv @ w.T
            if second is not None:
                p = second[0] @ second[1].T
                del p
            if n_gemm == 1:
                return {}
            dx = s @ w
            dw = s.T @ hv
        return {"_": dx[:1, :1] + dw[:1, :1]}
    return Runner(step, note=f"{n_gemm} GEMMs of {hv.shape[0]}x{case.h}x{case.v}")


def _ours(case: Case, x: dict[str, Tensor], device: torch.device) -> Runner:
    """Ours through the public API, `proxykd_fast.losses`, with the variant's backend."""
    import proxykd_fast
    from proxykd_fast import losses as L

    backend = OURS_GPU[case.variant]
    if device.type != "cuda" and case.variant != "ours":
        raise Unavailable(f"backend {backend!r} runs Triton kernels, which need CUDA (CPU: interpreter only)")
    if backend != "auto" and backend not in L.available_backends(device):
        raise Unavailable(f"backend {backend!r} is not available here")
    y = x["labels"]
    kw = {"backend": backend}
    loss = case.loss
    if loss == "ce":
        def fn(h: Tensor, w: Tensor) -> Outputs:
            return {"loss": L.linear_cross_entropy(h, w, y, **kw)}
    elif loss == "logprobs":
        def fn(h: Tensor, w: Tensor) -> Outputs:
            return {"logp": L.linear_log_probs(h, w, y, **kw)}
    elif loss == "logprobs_entropy":
        if "return_entropy" not in inspect.signature(L.linear_log_probs).parameters:
            raise Unavailable(f"linear_log_probs has no return_entropy in proxykd_fast {proxykd_fast.__version__}")

        def fn(h: Tensor, w: Tensor) -> Outputs:
            lp, ent = L.linear_log_probs(h, w, y, return_entropy=True, **kw)
            return {"logp": lp, "entropy": ent}
    elif loss == "topk":
        def fn(h: Tensor, w: Tensor) -> Outputs:
            ids, lps = L.linear_topk(h, w, TOPK, **kw)
            return {"ids": ids, "lps": lps}
    elif loss == "kd_online":
        def fn(h: Tensor, w: Tensor) -> Outputs:
            return {"loss": L.proxy_kd_loss(h, w, y, proxy_hidden=x["proxy_hidden"], proxy_weight=x["proxy_weight"],
                                            alpha=1.0, **kw)}
    elif loss == "kd_offline":
        def fn(h: Tensor, w: Tensor) -> Outputs:
            return {"loss": L.proxy_kd_loss(h, w, y, proxy_topk_ids=x["topk_ids"],
                                            proxy_topk_logprobs=x["topk_logprobs"], alpha=1.0, **kw)}
    else:
        ref = ({"ref_hidden": x["ref_hidden"], "ref_weight": x["ref_weight"]} if loss == "dpo_online"
               else {"ref_logps": x["ref_logps"]})

        def fn(h: Tensor, w: Tensor) -> Outputs:
            out, _ = L.dpo_loss(h, w, y, beta=DPO_BETA, nll_alpha=DPO_NLL_ALPHA, **ref, **kw)
            return {"loss": out}
    return Runner(_step(case, x, fn), settle=L.release_workspace,
                  versions={"proxykd_fast": proxykd_fast.__version__},
                  note=f"backend={backend!r}" + (" (torch on CPU)" if backend == "auto" and device.type != "cuda" else ""))


def _naive(case: Case, x: dict[str, Tensor], compiled: bool, device: torch.device) -> Runner:
    """Full logits in the input dtype, upcast to fp32, loss by autograd; or torch.compile of it."""
    def fn(h: Tensor, w: Tensor) -> Outputs:
        return naive_loss(case.loss, x, h, w)

    note = "full logits, fp32 upcast"
    if compiled:
        if device.type == "cpu":
            import shutil

            if shutil.which("c++") is None and shutil.which("g++") is None:
                raise Unavailable("torch.compile on CPU needs a C++ compiler")
        fn = torch.compile(fn, dynamic=False)
        note = "torch.compile(naive), inductor"
    return Runner(_step(case, x, fn), note=note)


# ------------------------------------------------------------------------------------------
# Peers


def _torch_lce(case: Case, x: dict[str, Tensor], device: torch.device, policy: str = "auto") -> Runner:
    """torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions (chunked); CE, or
    per-token with reduction='none' (log-prob = -loss)."""
    if not hasattr(F, "linear_cross_entropy"):
        raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    opts = LinearCrossEntropyOptions() if policy == "auto" else LinearCrossEntropyOptions(
        acc_policy=policy, chunking_method="aspect_ratio:2")
    y = x["labels"]
    per_token = case.loss == "logprobs"

    def fn(h: Tensor, w: Tensor) -> Outputs:
        out = F.linear_cross_entropy(h, w, y, ignore_index=IGNORE, reduction="none" if per_token else "mean",
                                     options=opts)
        return {"logp": -out} if per_token else {"loss": out}
    note = "LinearCrossEntropyOptions()" if policy == "auto" else f"acc_policy={policy!r}, chunking aspect_ratio:2"
    return Runner(_step(case, x, fn), note=note)


def _torch_lce_compact(case: Case, x: dict[str, Tensor], device: torch.device) -> Runner:
    return _torch_lce(case, x, device, policy="compact")


def _cce(case: Case, x: dict[str, Tensor], device: torch.device) -> Runner:
    """cut-cross-entropy: its `cce` Triton kernels on CUDA, its `torch_compile` impl elsewhere."""
    ver = version("cut-cross-entropy")
    from cut_cross_entropy import linear_cross_entropy as cce

    impl = "cce" if device.type == "cuda" else "torch_compile"
    y = x["labels"]
    per_token = case.loss == "logprobs"

    def fn(h: Tensor, w: Tensor) -> Outputs:
        out = cce(h, w, y, ignore_index=IGNORE, reduction="none" if per_token else "mean", impl=impl)
        return {"logp": -out.float()} if per_token else {"loss": out}
    return Runner(_step(case, x, fn), versions={"cut-cross-entropy": ver}, note=f"impl={impl!r}")


def _liger(case: Case, x: dict[str, Tensor], device: torch.device) -> Runner:
    """Liger-Kernel: chunked JSD (beta=0: forward KL) and DPO (torch.compile'd), Triton FLCE (CUDA)."""
    ver = version("liger-kernel")
    y = x["labels"]
    if case.loss == "ce":
        if device.type != "cuda":
            raise Unavailable("Liger's fused linear CE is a Triton kernel: CUDA only")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        mod = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)

        def fn(h: Tensor, w: Tensor) -> Outputs:
            return {"loss": mod(w, h, y)}
        note = "LigerFusedLinearCrossEntropyLoss"
    elif case.loss == "kd_online":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        mod = LigerFusedLinearJSDLoss(beta=0.0, temperature=1.0, weight_hard_loss=1.0, weight_soft_loss=1.0,
                                      ignore_index=IGNORE)

        def fn(h: Tensor, w: Tensor) -> Outputs:
            return {"loss": mod(h, w, x["proxy_hidden"], x["proxy_weight"], y)}
        note = "LigerFusedLinearJSDLoss(beta=0, weights 1/1), compiled"
    else:  # dpo_online
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        mod = LigerFusedLinearDPOLoss(beta=DPO_BETA, alpha=DPO_NLL_ALPHA, compute_nll_loss=True, use_ref_model=True,
                                      ignore_index=IGNORE)

        def fn(h: Tensor, w: Tensor) -> Outputs:
            out, _ = mod(w, h, y, ref_input=x["ref_hidden"], ref_weight=x["ref_weight"])
            return {"loss": out}
        note = "LigerFusedLinearDPOLoss(alpha=1, NLL), compiled"
    return Runner(_step(case, x, fn), versions={"liger-kernel": ver}, note=note)


def _trl(case: Case, x: dict[str, Tensor], device: torch.device) -> Runner:
    """TRL 1.16's fused lm-head log-probs (`trl.kernels.ChunkedLogProbFunction`, what `add_fused_lm_head`
    runs for SFT/DPO) and `_chunked_divergence_loss` (DistillationTrainer), composed as a TRL user would."""
    ver = version("trl")
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels.chunked_logprob import _use_triton
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    compact = _use_triton(device)  # as add_fused_lm_head: only valid rows where Triton runs, else all rows

    def token_logps(h: Tensor, w: Tensor, y: Tensor, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-position log-probs (0 on ignored) and entropy, shaped like y."""
        mask = y != IGNORE
        flat_h = h.reshape(-1, h.shape[-1])
        outputs = ("log_probs", "entropy") if entropy else ("log_probs",)
        if compact:
            lp, ent, *_ = ChunkedLogProbFunction.apply(flat_h[mask.view(-1)], w, None, y[mask], 1.0,
                                                      _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
            out = [None if t is None else t.new_zeros(mask.shape).masked_scatter(mask, t) for t in (lp, ent)]
        else:
            lp, ent, *_ = ChunkedLogProbFunction.apply(flat_h, w, None, y.clamp(min=0).view(-1), 1.0,
                                                      _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
            out = [None if t is None else t.view(mask.shape).masked_fill(~mask, 0) for t in (lp, ent)]
        return out[0], out[1]

    y = x["labels"]
    loss = case.loss
    note = "ChunkedLogProbFunction (add_fused_lm_head)"
    if loss == "ce":
        def fn(h: Tensor, w: Tensor) -> Outputs:
            lp, _ = token_logps(h, w, y)
            return {"loss": -lp.sum() / (y != IGNORE).sum().clamp(min=1)}
    elif loss in ("logprobs", "logprobs_entropy"):
        def fn(h: Tensor, w: Tensor) -> Outputs:
            lp, ent = token_logps(h, w, y, entropy=loss == "logprobs_entropy")
            return {"logp": lp} if ent is None else {"logp": lp, "entropy": ent}
    elif loss == "kd_online":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        mask = (y != IGNORE)[None]

        def fn(h: Tensor, w: Tensor) -> Outputs:
            lp, _ = token_logps(h, w, y)
            kl, _, n = _chunked_divergence_loss(h[None], x["proxy_hidden"][None], w, x["proxy_weight"], mask, beta=0.0)
            return {"loss": -lp.sum() / n.clamp(min=1) + kl}
        note = "ChunkedLogProbFunction NLL + _chunked_divergence_loss(beta=0)"
    elif loss.startswith("dpo"):
        if loss == "dpo_online":
            def ref_sums() -> Tensor:
                with torch.no_grad():
                    return token_logps(x["ref_hidden"], x["ref_weight"], y)[0].sum(-1)
        else:
            def ref_sums() -> Tensor:
                return x["ref_logps"]

        def fn(h: Tensor, w: Tensor) -> Outputs:
            lp, _ = token_logps(h, w, y)
            return {"loss": dpo_objective(lp.sum(-1), ref_sums(), y)}
        note = "ChunkedLogProbFunction sums + sigmoid DPO (as DPOTrainer)"
    else:
        raise Unavailable(f"trl has no {loss}")
    return Runner(_step(case, x, fn), versions={"trl": ver}, note=note)


def _quack(case: Case, x: dict[str, Tensor], device: torch.device) -> Runner:
    """QuACK's chunked linear CE (CuTe DSL, Hopper / Blackwell)."""
    if device.type != "cuda":
        raise Unavailable("QuACK is CuTe-DSL GPU code (H100/B200): CUDA only")
    ver = version("quack-kernels")
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    y = x["labels"]

    def fn(h: Tensor, w: Tensor) -> Outputs:
        return {"loss": chunked_linear_cross_entropy(h, w, y, ignore_index=IGNORE)}
    return Runner(_step(case, x, fn), versions={"quack-kernels": ver}, note="chunked_linear_cross_entropy")


_PEER_BUILDERS = {"torch-lce": _torch_lce, "torch-lce-compact": _torch_lce_compact, "cce": _cce,
                  "liger": _liger, "trl": _trl, "quack": _quack}

__all__ = ["COMMON", "PEERS", "Runner", "Unavailable", "build", "dpo_layout", "naive_loss", "variants_for"]


def precheck(case: Case, device: torch.device) -> str | None:
    """Why `case` cannot run on `device`, when that is known without building inputs (else None)."""
    if case.variant not in variants_for(case.loss):
        return f"{case.variant} does not implement {case.loss}"
    cuda_only = {"ours-chunked": "backend 'triton-chunked' runs Triton kernels, which need CUDA (CPU: interpreter only)",
                 "ours-fused": "backend 'triton-fused' runs Triton kernels, which need CUDA (CPU: interpreter only)",
                 "quack": "QuACK is CuTe-DSL GPU code (H100/B200): CUDA only"}
    if device.type != "cuda" and case.variant in cuda_only:
        return cuda_only[case.variant]
    if device.type != "cuda" and case.variant == "liger" and case.loss == "ce":
        return "Liger's fused linear CE is a Triton kernel: CUDA only"
    dist = {"liger": "liger-kernel", "trl": "trl", "cce": "cut-cross-entropy", "quack": "quack-kernels"}.get(case.variant)
    if dist:
        try:
            version(dist)
        except Unavailable as exc:
            return str(exc)
    if case.variant in OURS_GPU and case.loss == "logprobs_entropy":
        from proxykd_fast.losses import linear_log_probs

        if "return_entropy" not in inspect.signature(linear_log_probs).parameters:
            return "linear_log_probs has no return_entropy in this proxykd_fast yet"
    return None
