"""Fused CPU kernels in Numba: one module per kernel family.

A kernel takes C-contiguous NumPy arrays (float32 or float64) and writes into outputs the
caller allocated; it knows nothing of torch modules or autograd (``normlab.ops`` wraps
them as torch custom ops). ``runtime`` sets the on-disk cache and the thread count.
"""
