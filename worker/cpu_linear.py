"""bfloat16 linear layers on CPU with their weights laid out once for oneDNN.

`F.linear` on a plain bf16 weight makes oneDNN bring the weight into its blocked layout on every
call; packing it once at load time (what torch.compile's `freezing` does for CPU) skips that. On
2 Zen 4 cores, SmolLM2-135M's 30 layers of projections took 8.5 -> 5.6 ms at 1 token, 9.6 -> 6.6
at 8, 15.0 -> 11.4 at 32, 115 -> 109 at 512, and the 49152-row output projection 1.6 -> 0.9 ms
at 1 token (`python -m pagemesh.bench.profile` shows the step times in the model).

In bf16 the packed kernel returns exactly F.linear's values (tests/test_cpu_linear.py), so
nothing else changes. In fp32 it sums in another order, so fp32, the mode that matches
transformers token for token, keeps F.linear.
"""

from __future__ import annotations

import torch
from torch import nn


def packing_applies(dtype: torch.dtype, device: str) -> bool:
    return (
        device == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class PackedLinear(nn.Module):
    """y = x W^T + b with W packed for oneDNN; x is [tokens, in_features]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> None:
    """Replace every nn.Linear in model with a PackedLinear; each plain weight is freed as soon as
    it is replaced (so nothing here may hold the Linear modules: loading would peak at both copies)."""
    slots = [(m, name) for m in model.modules() for name, c in m.named_children() if isinstance(c, nn.Linear)]
    for module, name in slots:
        child = getattr(module, name)
        setattr(module, name, PackedLinear(child.weight, child.bias))
        del child
