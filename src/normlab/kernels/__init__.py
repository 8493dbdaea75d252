"""Backends that compute the normalization: they take tensors and axes, never modules.

``composite`` is written in torch operations and runs on every device and dtype; the fused
CPU (Numba) and GPU (Triton) kernels of later releases sit beside it behind the same ops.
"""
