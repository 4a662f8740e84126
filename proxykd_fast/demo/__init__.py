"""Runnable demos of the Proxy-KD pipeline: `python -m proxykd_fast.demo --preset default|smollm2`."""
