"""proxykd_fast: distill black-box LLMs through a white-box proxy, with fused loss kernels."""

__version__ = "0.1.0"
