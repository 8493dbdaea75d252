"""A torch.compile backend that records the ops of the forward and backward graphs (shared by
the custom-op compile tests)."""

from __future__ import annotations


def recording_backend(seen):
    """The backend; ``seen["fw"]`` and ``seen["bw"]`` collect each graph's call targets."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    def record(kind):
        def compiler(graph, _inputs):
            seen[kind] |= {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
            return make_boxed_func(graph.forward)

        return compiler

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=record("fw"), bw_compiler=record("bw"))

    return backend
