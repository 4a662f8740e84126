"""The Triton row epilogue honours the torch epilogue's contract (RowEpilogue), checked against it in fp64.

Same arguments, (nll, kd * T^2) per row and dlogits left in S, for plain CE, every online
divergence, offline top-k, T in {0.5, 1, 2}, ignored rows (zero coefficients), extreme logits
and several vocab blocks with a masked tail. On CPU the kernels run in the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch

from proxykd_fast.losses._epilogue_torch import TorchEpilogue
from proxykd_fast.losses._epilogue_triton import TritonEpilogue
from proxykd_fast.losses._spec import EpilogueArgs, LossSpec
from proxykd_fast.ops.configs import epilogue_block
from tests.support.triton_env import DEVICE

torch_epilogue, triton_epilogue = TorchEpilogue(), TritonEpilogue()

C, V, K = 9, 509, 6


def _chunk(mode: str, scale: float, seed: int = 0) -> dict:
    """fp32 inputs of one chunk: logits, labels, coefficients (rows 2 and 5 ignored), top-k targets."""
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(C, V, generator=g) * scale
    P = torch.randn(C, V, generator=g) * scale + 0.5 * S
    labels = torch.randint(0, V, (C,), generator=g)
    c_nll = torch.rand(C, generator=g) + 0.5
    c_nll[[2, 5]] = 0.0
    labels[[2, 5]] = 0
    c_kd = c_nll * 0.7
    ids = lps = None
    if mode == "offline":
        lp, ids = torch.log_softmax(P, 1).topk(K, 1)
        lps = lp.clone()
        lps[1, 3:] = -float("inf")  # a partly masked target row
        lps[4] = -float("inf")  # a row with no target mass at all
    data = {"S": S, "P": P if mode not in ("ce", "offline") else None, "ids": ids, "lps": lps, "labels": labels,
            "c_nll": c_nll, "c_kd": c_kd}
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in data.items()}


def _run(epilogue, d: dict, opts: LossSpec, dtype: torch.dtype, need_grad: bool):
    """Run one epilogue on copies of the chunk in `dtype`; return (nll, kd, dlogits)."""
    S = d["S"].to(dtype).clone()
    P = None if d["P"] is None else d["P"].to(dtype).clone()
    R = torch.empty_like(S)
    lps = None if d["lps"] is None else d["lps"].to(dtype)
    args = EpilogueArgs(S, P, R, d["labels"], d["ids"], lps, d["c_nll"].to(dtype), d["c_kd"].to(dtype), need_grad)
    nll, kd = epilogue(args, opts)
    return nll, kd, S


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 2e-5) -> None:
    """Elementwise match to an fp64 reference, tolerance scaled by the reference's magnitude."""
    ref = ref.double()
    atol = rtol * max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol)


CASES = [("ce", 1.0)] + [(m, t) for m in ("forward_kl", "reverse_kl", "jsd", "offline") for t in (0.5, 1.0, 2.0)]


@pytest.mark.parametrize(("mode", "temperature"), CASES)
def test_epilogue_matches_torch(mode: str, temperature: float) -> None:
    """nll, kd and dlogits equal the torch epilogue's (fp64) for every loss and temperature."""
    d = _chunk(mode, scale=3.0)
    divergence = None if mode == "ce" else ("forward_kl" if mode == "offline" else mode)
    opts = LossSpec(alpha=0.7, temperature=temperature, divergence=divergence, jsd_beta=0.3, offline=mode == "offline")
    for need_grad in (False, True):
        nll, kd, S = _run(triton_epilogue, d, opts, torch.float32, need_grad)
        r_nll, r_kd, r_S = _run(torch_epilogue, d, opts, torch.float64, need_grad)
        _close(nll, r_nll)
        assert (kd is None) == (r_kd is None)
        if kd is not None:
            _close(kd, r_kd)
        if need_grad:
            _close(S, r_S)
    if mode == "offline":
        # Row 4 has no target mass: KD is 0 and so is its gradient (in both epilogues), so its
        # dlogits are the CE part alone.
        assert float(kd[4]) == 0.0
        log_q = torch.log_softmax(d["S"][4].double(), 0)
        ce_only = d["c_nll"][4] * (log_q.exp() - torch.nn.functional.one_hot(d["labels"][4], V))
        _close(S[4], ce_only)


@pytest.mark.parametrize("mode", ["forward_kl", "reverse_kl", "jsd", "offline"])
def test_epilogue_extreme_logits(mode: str) -> None:
    """|z| ~ 1e4 (near one-hot softmaxes) stays finite and matches fp64 at T = 0.5."""
    d = _chunk(mode, scale=1e4, seed=1)
    opts = LossSpec(alpha=0.7, temperature=0.5, divergence="forward_kl" if mode == "offline" else mode, jsd_beta=0.5,
                     offline=mode == "offline")
    nll, kd, S = _run(triton_epilogue, d, opts, torch.float32, True)
    r_nll, r_kd, r_S = _run(torch_epilogue, d, opts, torch.float64, True)
    assert torch.isfinite(nll).all() and torch.isfinite(kd).all() and torch.isfinite(S).all()
    _close(nll, r_nll, 1e-4)
    _close(kd, r_kd, 1e-4)
    _close(S, r_S, 1e-4)


@pytest.mark.parametrize("mode", ["ce", "tempered", "forward_kl", "offline"])
def test_label_logit_at_block_edges(mode: str) -> None:
    """Labels on the first / last column of a vocab block and of the masked tail: the label logit is
    read before dlogits overwrite S in place (the GPU ordering itself is checked by the AOT race test)."""
    block = epilogue_block(V)[0]
    d = _chunk("ce" if mode == "tempered" else mode, scale=3.0, seed=4)
    d["labels"] = torch.tensor([0, block - 1, block, V - 1, 1, 0, block + 1, V - 2, 7], device=DEVICE)
    T = 0.5
    divergence = None if mode in ("ce", "tempered") else "forward_kl"
    opts = LossSpec(alpha=0.7, temperature=T if divergence else 1.0, divergence=divergence, offline=mode == "offline",
                     logit_scale=1.0 / T if mode == "tempered" else 1.0)
    nll, _, S = _run(triton_epilogue, d, opts, torch.float32, True)
    z = d["S"].double() / (T if mode == "tempered" else 1.0)
    _close(nll, -torch.log_softmax(z, 1).gather(1, d["labels"][:, None]).squeeze(1))
    _close(S, _run(torch_epilogue, d, opts, torch.float64, True)[2])


@pytest.mark.parametrize("epilogue", [triton_epilogue, torch_epilogue], ids=["triton", "torch"])
def test_scaled_ce_epilogue_is_tempered_log_prob(epilogue) -> None:
    """CE on scaled logits (logit_scale = 1/T): nll = -log softmax(z/T)[y], dlogits = c (q_T - onehot) / T."""
    d = _chunk("ce", scale=3.0)
    T = 0.5
    nll, kd, S = _run(epilogue, d, LossSpec(logit_scale=1.0 / T), torch.float32, True)
    z = d["S"].double()
    log_q = torch.log_softmax(z / T, 1)
    _close(nll, -log_q.gather(1, d["labels"][:, None]).squeeze(1))
    onehot = torch.nn.functional.one_hot(d["labels"], V).double()
    _close(S, d["c_nll"].double()[:, None] * (log_q.exp() - onehot) / T)
    assert kd is None


def test_epilogue_reads_low_precision_proxy_logits() -> None:
    """P may be a bf16 buffer (half the proxy scratch): same result as its fp32 upcast."""
    d = _chunk("jsd", scale=3.0)
    opts = LossSpec(alpha=0.7, temperature=2.0, divergence="jsd", jsd_beta=0.3)
    d["P"] = d["P"].to(torch.bfloat16)
    S = d["S"].clone()
    nll, kd = triton_epilogue(EpilogueArgs(S, d["P"], None, d["labels"], None, None, d["c_nll"], d["c_kd"], True), opts)
    r_nll, r_kd, r_S = _run(torch_epilogue, d, opts, torch.float64, True)
    _close(nll, r_nll)
    _close(kd, r_kd)
    _close(S, r_S)
