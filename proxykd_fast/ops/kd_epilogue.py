"""Launcher of kernels/kd_epilogue.py: the row epilogue over one chunk of fp32 logits."""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from proxykd_fast.kernels.kd_epilogue import MODE_IDS, kd_epilogue_kernel
from proxykd_fast.losses._spec import EpilogueArgs, LossSpec

from .configs import epilogue_block


def launch_kd_epilogue(args: EpilogueArgs, spec: LossSpec) -> tuple[Tensor, Tensor | None]:
    """Run the row epilogue over fp32 S [C, V]; returns (nll, kd or None); dlogits in S if need_grad.

    P may be fp32, bf16 or fp16 (the kernel upcasts); R is unused (no [C, V] temporary). In CE
    mode `spec.logit_scale` scales the logits (tempered log-probs); KD modes need scale 1.
    """
    S, P, mode = args.S, args.P, spec.mode
    c, vocab = S.shape
    nll = torch.empty(c, device=S.device, dtype=torch.float32)
    kd = None if mode == "ce" else torch.empty(c, device=S.device, dtype=torch.float32)
    if c == 0:
        return nll, kd
    assert S.dtype == torch.float32 and S.stride(1) == 1
    P_arg = S if P is None else P
    assert P_arg.dtype in (torch.float32, torch.bfloat16, torch.float16) and P_arg.stride(1) == 1
    ids_in, lps_in = args.topk_ids, args.topk_logprobs
    k = 1 if ids_in is None else ids_in.shape[1]
    labels = args.labels.contiguous()
    c_nll = args.c_nll.to(torch.float32).contiguous()
    ids = labels if ids_in is None else ids_in.contiguous()
    lps = c_nll if lps_in is None else lps_in.to(torch.float32).contiguous()
    c_kd = c_nll if args.c_kd is None else args.c_kd.to(torch.float32).contiguous()
    block, warps = epilogue_block(vocab)
    t = float(spec.temperature) if mode != "ce" else 1.0
    beta = float(spec.jsd_beta)
    log_b = math.log(beta) if 0.0 < beta < 1.0 else 0.0
    log_1mb = math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
    scale = float(spec.logit_scale) if mode == "ce" else 1.0
    kd_epilogue_kernel[(c,)](
        S, P_arg, S.stride(0), P_arg.stride(0),
        labels, ids, lps, k,
        c_nll, c_kd, nll, nll if kd is None else kd,
        vocab, scale, 1.0 / t, t, beta, log_b, log_1mb,
        MODE=MODE_IDS[mode], NEED_GRAD=bool(args.need_grad), HAS_T=mode != "ce" and t != 1.0,
        BLOCK=block, KP=triton.next_power_of_2(k), num_warps=warps,
    )
    return nll, kd
