"""Triton kernels (device code only), installed as proxykd_fast.kernels.

- kd_epilogue: row-wise NLL / divergence / dlogits over one chunk of cuBLAS logits (chunked path)
- logit_tile: a tl.dot logits tile and the online-softmax fold shared by the tile-fused kernels
- linear_lse: tile-fused forward, row log-sum-exps without any logits in memory
- gather_logits: logits at a few columns per row (labels, stored top-k ids)
- linear_grad: tile-fused backward, recomputed tiles -> dX / dW / db with fp32 atomics
- linear_topk: streaming top-k + log-sum-exp over vocab tiles

Host code: one launcher per kernel in proxykd_fast/ops/ (same module names), launch shapes as
data in proxykd_fast/ops/configs.py; autograd and dispatch in proxykd_fast/losses. Set
TRITON_INTERPRET=1 before importing these modules to run them on CPU tensors in the Triton
interpreter.
"""
