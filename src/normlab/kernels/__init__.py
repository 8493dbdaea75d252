"""The computations, below the registry: they take tensors and axes, never modules or specs.

``composite`` is written in torch operations and runs on every device and dtype; ``cpu``
holds the Numba kernels and their launchers, ``gpu`` the Triton kernels and theirs.
``normlab.ops`` wraps them as differentiable ops and ``normlab.backends.registry`` chooses
among them.
"""
