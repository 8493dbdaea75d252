"""Functional API, signature-compatible with ``torch.nn.functional`` (plus normlab's ``dim``,
``mask`` and ``lengths``), and the norms torch lacks (batch renormalization, PowerNorm).

Each function checks its call (``normlab.checks``: the one validation point), resolves its
norm's axes (``normlab.axes``) into a ``normlab.spec.NormSpec`` and hands it to the one
differentiable normalization (``normlab.ops``); no layer below validates again.
"""

from normlab.functional.batch import batch_norm, batch_renorm
from normlab.functional.feature import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from normlab.functional.group import group_norm
from normlab.functional.instance import instance_norm
from normlab.functional.power import power_norm

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "batch_renorm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "power_norm",
    "rms_norm",
]
