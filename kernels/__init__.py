"""Triton kernels (device code only), installed as proxykd_fast.kernels."""
