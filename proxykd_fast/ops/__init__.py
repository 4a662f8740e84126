"""Host launchers of the Triton kernels, one module per kernel file in kernels/ (same names).

- runtime: triton version / interpreter checks and the dot-product flags every tile launcher shares
- configs: the launch shapes (tile configs and the epilogue block) as data, in one place
- kd_epilogue: the chunked row epilogue (NLL / divergence / dlogits of one logits chunk)
- linear_lse, gather_logits, linear_grad, linear_topk: the tile-fused kernels (no logits at all)

Each launcher takes validated tensors and frozen dataclasses (proxykd_fast.losses._spec) and
returns tensors; autograd and dispatch live in proxykd_fast.losses. Importing a launcher imports
triton: set TRITON_INTERPRET=1 before that to run the kernels on CPU tensors.
"""
