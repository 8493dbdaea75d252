"""Fused CPU kernels in Numba: one module per kernel family.

A kernel takes C-contiguous NumPy arrays (float32 or float64) and writes into outputs the
caller allocated; it knows nothing of torch modules or autograd. ``launchers`` turns torch
tensors into those arrays and runs the kernels (``normlab.ops.kernel_ops`` registers the
launchers as torch custom ops), ``common`` holds the helpers several families inline,
``runtime`` sets the on-disk cache and the thread count.
"""
