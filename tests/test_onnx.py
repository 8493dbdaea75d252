"""ONNX export: a model holding every normlab layer, in eval, exported with
``torch.onnx.export(..., dynamo=True)`` with a dynamic batch and length, run in ONNX Runtime
and compared with eager PyTorch at shapes other than the example's. Whatever backend would
run the call eagerly (the Numba kernels above 32K elements, the composite below), the
exported graph holds standard ONNX normalization ops where one exists
(``normlab.onnx_ops`` in the docs: LayerNormalization, RMSNormalization at opset 23,
BatchNormalization, GroupNormalization, InstanceNormalization) and plain arithmetic for the
masked norms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import normlab  # noqa: E402

C = 64


class EveryNorm(torch.nn.Module):
    """Each normlab layer once, on (B, L, C) input and a (B, L) mask of real positions."""

    def __init__(self):
        super().__init__()
        self.layer = normlab.LayerNorm(C)
        self.rms = normlab.RMSNorm(C, eps=1e-6)
        self.channels_first = normlab.LayerNorm(C, dim=1)
        self.batch = normlab.BatchNorm1d(C)
        self.batch_last = normlab.BatchNorm(C, dim=-1)
        self.ghost = normlab.BatchNorm1d(C, virtual_batch_size=2)
        self.renorm = normlab.BatchRenorm1d(C)
        self.group = normlab.GroupNorm(8, C)
        self.instance = normlab.InstanceNorm1d(C, affine=True)
        self.power = normlab.PowerNorm(C, warmup_iters=0)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in self.modules():
                for tensor in list(module.parameters(recurse=False)):
                    tensor.copy_(1 + 0.3 * torch.randn(tensor.shape, generator=g))
                for name in ("running_mean", "running_var", "running_phi"):
                    buffer = getattr(module, name, None)
                    if buffer is not None:
                        shift = 0.2 * torch.randn(buffer.shape, generator=g)
                        buffer.copy_(shift if name == "running_mean" else 1 + shift.abs())

    def forward(self, x, mask):
        t = x.transpose(1, 2)  # (B, C, L)
        return (
            self.layer(x),
            self.rms(x),
            self.channels_first(t),
            self.batch(t),
            self.batch_last(x),
            self.ghost(t),
            self.renorm(t),
            self.group(t),
            self.group(t, mask=mask),
            self.instance(t),
            self.instance(t, mask=mask),
            self.power(x),
        )


def _mask(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=g) < 0.7
    mask[:, :2] = True
    return mask


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = EveryNorm().eval()
    x = torch.randn(4, 160, C)  # 40960 elements: the Numba kernels would run it eagerly
    mask = _mask(4, 160, 0)
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=2)
    program = torch.onnx.export(
        model,
        (x, mask),
        dynamo=True,
        dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}),
        opset_version=23,
    )
    path = tmp_path_factory.mktemp("onnx") / "every_norm.onnx"
    program.save(str(path))
    return model, program.model_proto, onnxruntime.InferenceSession(str(path))


@pytest.mark.parametrize("shape", [(4, 160), (2, 30), (1, 5), (3, 301)], ids=str)
def test_exported_model_matches_eager_at_other_shapes(exported, shape):
    model, _, session = exported
    x = torch.randn(*shape, C, generator=torch.Generator().manual_seed(shape[1]))
    mask = _mask(*shape, 1)
    names = [i.name for i in session.get_inputs()]
    feeds = dict(zip(names, (x.numpy(), mask.numpy()), strict=True))
    got = session.run(None, feeds)
    with torch.no_grad():
        want = model(x, mask)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"output {i}")


def test_exported_graph_uses_standard_normalization_ops(exported):
    _, proto, _ = exported
    ops = {node.op_type for node in proto.graph.node}
    want = {"LayerNormalization", "RMSNormalization", "BatchNormalization", "GroupNormalization"}
    assert want <= ops
    assert not any(node.domain.startswith("normlab") for node in proto.graph.node)


def test_torchscript_exporter_works_or_names_the_dynamo_exporter(tmp_path):
    """The TorchScript exporter (dynamo=False) exports LayerNorm, BatchNorm in eval and
    GroupNorm as torch's ops; for anything else normlab raises an error that names
    dynamo=True."""
    path = str(tmp_path / "m.onnx")
    x = torch.randn(4, 160, C)
    exportable = (
        (torch.nn.Sequential(normlab.LayerNorm(C), normlab.BatchNorm(C, dim=-1)), x),
        (normlab.GroupNorm(8, C), x.transpose(1, 2).contiguous()),
    )
    for model, inputs in exportable:
        model.eval()
        torch.onnx.export(model, (inputs,), path, dynamo=False)
        session = onnxruntime.InferenceSession(path)
        (got,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, model(inputs).numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"dynamo=True"):
        torch.onnx.export(normlab.RMSNorm(C), (x,), path, dynamo=False)
