"""Benchmarks of eqx_flexattn against PyTorch FlexAttention and other JAX kernels.

Run `python -m benchmarks.run --help` (see `benchmarks/run.py` for the details).
This package imports nothing heavy on import, so `run.py` can configure JAX's
allocator before JAX is loaded.
"""
