"""Row-wise loss epilogue over fp32 logits of one chunk: NLL, T^2-scaled divergence, dlogits.

One program owns one row of the [C, V] student (and proxy) logits written by cuBLAS. Pass 1
streams the row once and keeps per-lane online max / sum-exp for the student (at scale 1 and
at 1/T) and the tempered proxy; pass 2 streams it again for the divergence and, when the
gradient does not depend on the row's divergence (CE, forward KL, offline top-k), writes
dlogits over the student row in the same pass. Reverse KL and JSD need a row reduction before
their gradient, so they take a third pass. No [C, V] temporary is ever written.

In-place hazard: the row's threads read S at positions other threads later overwrite (the
label logit S[y], the top-k gathers, the streaming passes in another lane mapping), and
Triton orders global memory only within a thread. So every read of S finishes before a
tl.debug_barrier() (bar.sync) that precedes the first pass writing S; the AOT test checks the
compiled IR for any S read and write without a barrier between them.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The constexpr MODE of each loss; "offline" is forward KL against stored top-k log-probs.
MODE_IDS = {"ce": 0, "offline": 1, "forward_kl": 2, "reverse_kl": 3, "jsd": 4}
CE = tl.constexpr(MODE_IDS["ce"])
OFFLINE = tl.constexpr(MODE_IDS["offline"])
FORWARD_KL = tl.constexpr(MODE_IDS["forward_kl"])
REVERSE_KL = tl.constexpr(MODE_IDS["reverse_kl"])
JSD = tl.constexpr(MODE_IDS["jsd"])

FLOOR = tl.constexpr(-1.0e38)  # finite initial running max: exp(-inf - FLOOR) = 0, never NaN


@triton.jit
def _online_update(m, s, x):
    """Per-lane online max / sum-exp update with a new block x (masked lanes hold -inf)."""
    m_new = tl.maximum(m, x)
    s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
    return m_new, s


@triton.jit
def _finish_lse(m, s):
    """Log-sum-exp of a row from its per-lane running max and sum."""
    mx = tl.max(m, 0)
    return mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))


@triton.jit
def _log_add_exp(a, b):
    """log(exp(a) + exp(b)); -inf when both are -inf."""
    mx = tl.maximum(a, b)
    return tl.where(mx == -float("inf"), mx, mx + tl.log(1.0 + tl.exp(tl.minimum(a, b) - mx)))


@triton.jit
def kd_epilogue_kernel(
    S, P, stride_s, stride_p,
    labels, ids, lps, K,
    c_nll, c_kd, nll_out, kd_out,
    V, scale, inv_t, t, beta, log_beta, log_1m_beta,
    MODE: tl.constexpr, NEED_GRAD: tl.constexpr, HAS_T: tl.constexpr,
    BLOCK: tl.constexpr, KP: tl.constexpr,
):
    """Per row: nll = lse(scale*s) - scale*s[y], kd = T^2 D(p, q_T); dlogits into S if NEED_GRAD.

    The CE gradient is c_nll * scale * (softmax(scale*s) - onehot(y)), so scale=1/T turns the
    same kernel into a tempered log-prob epilogue. KD modes require scale == 1.
    """
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    p_row = P + row * stride_p
    offs = tl.arange(0, BLOCK)
    y = tl.load(labels + row)
    cn = tl.load(c_nll + row)
    s_y = tl.load(s_row + y)  # the label logit, read before any pass can overwrite S[y]
    ONLINE: tl.constexpr = MODE >= FORWARD_KL

    # ---- pass 1: per-lane online softmax statistics -------------------------------------
    m_s = tl.full([BLOCK], FLOOR, tl.float32)
    l_s = tl.zeros([BLOCK], tl.float32)
    m_t = tl.full([BLOCK], FLOOR, tl.float32)
    l_t = tl.zeros([BLOCK], tl.float32)
    m_p = tl.full([BLOCK], FLOOR, tl.float32)
    l_p = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=-float("inf"))
        m_s, l_s = _online_update(m_s, l_s, s * scale)
        if HAS_T:
            m_t, l_t = _online_update(m_t, l_t, s * inv_t)
        if ONLINE:
            p = tl.load(p_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            m_p, l_p = _online_update(m_p, l_p, p * inv_t)
    lse_s = _finish_lse(m_s, l_s)
    lse_t = lse_s
    if HAS_T:
        lse_t = _finish_lse(m_t, l_t)
    lse_p = 0.0
    if ONLINE:
        lse_p = _finish_lse(m_p, l_p)
    tl.store(nll_out + row, lse_s - s_y * scale)

    # ---- offline targets: p renormalized over the k stored log-probs ----------------------
    kd = 0.0
    mass = 0.0
    if MODE == OFFLINE:
        koffs = tl.arange(0, KP)
        kmask = koffs < K
        kid = tl.load(ids + row * K + koffs, mask=kmask, other=0)
        a = tl.load(lps + row * K + koffs, mask=kmask, other=-float("inf")) * inv_t
        amax = tl.max(a, 0)
        finite = amax > -float("inf")
        amax = tl.where(finite, amax, 0.0)
        log_pk = a - amax - tl.log(tl.maximum(tl.sum(tl.exp(a - amax), 0), 1e-30))
        pk = tl.where(finite, tl.exp(log_pk), 0.0)
        log_qt_k = tl.load(s_row + kid, mask=kmask, other=0.0) * inv_t - lse_t
        kd = tl.sum(pk * tl.where(pk > 0, log_pk - log_qt_k, 0.0), 0)
        mass = tl.where(finite, 1.0, 0.0)
    ck = tl.load(c_kd + row)
    ckt = ck * t

    # ---- pass 2: divergence (and the gradient where it needs no row reduction) ----------
    acc_a = tl.zeros([BLOCK], tl.float32)
    acc_b = tl.zeros([BLOCK], tl.float32)
    TWO_PASS_GRAD: tl.constexpr = MODE == REVERSE_KL or MODE == JSD
    if NEED_GRAD and not TWO_PASS_GRAD:
        tl.debug_barrier()  # every thread's reads of S (s_y, top-k gathers, pass 1) precede pass 2's writes
    if ONLINE or (NEED_GRAD and not TWO_PASS_GRAD):
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=0.0)
            log_q = s * scale - lse_s
            q = tl.exp(log_q)
            if HAS_T:
                log_qt = s * inv_t - lse_t
                qt = tl.exp(log_qt)
            else:
                log_qt = log_q
                qt = q
            if ONLINE:
                log_p = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_p
                p = tl.exp(log_p)
                # A term whose weight is 0 is 0 (0 log 0 = 0): a token masked with -inf on both sides
                # would otherwise give 0 * (-inf - -inf) = NaN.
                if MODE == FORWARD_KL:
                    acc_a += tl.where(mask & (p > 0), p * (log_p - log_qt), 0.0)
                elif MODE == REVERSE_KL:
                    acc_a += tl.where(mask & (qt > 0), qt * (log_qt - log_p), 0.0)
                else:
                    log_m = _log_add_exp(log_p + log_beta, log_qt + log_1m_beta)
                    acc_a += tl.where(mask & (p > 0), p * (log_p - log_m), 0.0)
                    acc_b += tl.where(mask & (qt > 0), qt * (log_qt - log_m), 0.0)
            if NEED_GRAD and not TWO_PASS_GRAD:
                g = cn * scale * (q - tl.where(cols == y, 1.0, 0.0))
                if MODE == OFFLINE:
                    g += ckt * mass * qt
                if MODE == FORWARD_KL:
                    g += ckt * (qt - p)
                tl.store(s_row + cols, g, mask=mask)
    if MODE == FORWARD_KL or MODE == REVERSE_KL:
        kd = tl.sum(acc_a, 0)
    if MODE == JSD:
        kd_b = tl.sum(acc_b, 0) * (1.0 - beta)
        kd = beta * tl.sum(acc_a, 0) + kd_b

    # ---- pass 3: gradients that need the row's divergence --------------------------------
    if NEED_GRAD and TWO_PASS_GRAD:
        tl.debug_barrier()  # every thread's reads of S (s_y, passes 1 and 2) precede pass 3's writes
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=0.0)
            q = tl.exp(s - lse_s)
            if HAS_T:
                log_qt = s * inv_t - lse_t
                qt = tl.exp(log_qt)
            else:
                log_qt = s - lse_s
                qt = q
            log_p = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_p
            if MODE == REVERSE_KL:
                inner = log_qt - log_p - kd
            else:
                log_m = _log_add_exp(log_p + log_beta, log_qt + log_1m_beta)
                inner = (1.0 - beta) * (log_qt - log_m) - kd_b
            g = cn * (q - tl.where(cols == y, 1.0, 0.0)) + tl.where(qt > 0, ckt * qt * inner, 0.0)
            tl.store(s_row + cols, g, mask=mask)

    if MODE != CE:
        tl.store(kd_out + row, kd * t * t)
    if MODE == OFFLINE and NEED_GRAD:
        # the -p_k onehot(id_k) part, after every lane's dense store of this row is visible
        tl.debug_barrier()
        tl.atomic_add(s_row + kid, -ckt * pk, mask=kmask)
