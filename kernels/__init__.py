"""Triton kernels (device code only), installed as proxykd_fast.kernels.

- kd_epilogue: row-wise NLL / divergence / dlogits over one chunk of cuBLAS logits (chunked path)
- logit_tile: a tl.dot logits tile and the online-softmax fold shared by the tile-fused kernels
- linear_lse: tile-fused forward, row log-sum-exps without any logits in memory
- gather_logits: logits at a few columns per row (labels, stored top-k ids)
- linear_grad: tile-fused backward, recomputed tiles -> dX / dW / db with fp32 atomics
- linear_topk: streaming top-k + log-sum-exp over vocab tiles

Host code (launch shapes, autograd) lives in proxykd_fast/losses/_epilogue_triton.py and
_backend_triton_fused.py. Set TRITON_INTERPRET=1 before importing these modules to run them
on CPU tensors in the Triton interpreter.
"""
