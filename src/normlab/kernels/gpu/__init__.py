"""Triton kernels for CUDA tensors: the GPU counterparts of kernels/cpu, one file per layout."""
