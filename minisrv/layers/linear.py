"""The model's linear layer: F.linear, or on the CPU a oneDNN matmul over a weight packed once at startup.

F.linear on the CPU runs MKL's sgemm on the row-major [out, in] weight. oneDNN with the weight reordered
once into its own blocked layout is faster at every batch size we run; measured on the 2-core dev VM,
one thread, all of SmolLM2-135M's decoder matmuls per step (float32): 34 -> 27 ms for 1 row, 44 -> 21 ms
for 4 rows, 68 -> 40 ms for 16 rows, 1214 -> 998 ms for 512 rows; its LM head 24 -> 13 ms for 16 rows.
The ops are the ones PyTorch's inductor uses for frozen CPU linears (torch.ops.mkldnn); where a build of
PyTorch lacks them, the layer keeps F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows the packed layout is tuned for; 1..512-row batches all ran faster than F.linear with it.
PACK_BATCH_HINT = 16
# A oneDNN call costs ~17 us more than F.linear's ~2 us before any arithmetic; below about this many
# weight elements (1 MB in float32) that outweighs the faster arithmetic.
PACK_MIN_ELEMENTS = 1 << 18


def onednn_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class Linear(nn.Module):
    """nn.Linear's parameters (left uninitialized: a checkpoint fills them), plus `pack()`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: torch.Tensor | None = None
        self.single_row_weight: torch.Tensor | None = None   # [in, out], contiguous

    @torch.no_grad()
    def pack(self, single_row_copy: bool = False) -> None:
        """On the CPU, replace a large weight by its oneDNN-packed copy (an opaque tensor); idempotent.

        The plain weight is dropped from this module so the model does not hold both; a tied LM head's
        weight lives on in the embedding, which owns it too. `single_row_copy` also keeps the weight
        transposed for one-row inputs: MKL's matrix-vector product streams a [in, out] matrix at the memory
        bandwidth, faster than any other form here (the 113 MB LM head of SmolLM2: 9 -> 5 ms per token),
        worth a second copy for the LM head, which single-stream decoding runs with one row every step.
        """
        weight = self.weight
        if (self.packed is not None or weight.device.type != "cpu" or weight.numel() < PACK_MIN_ELEMENTS
                or not onednn_packing_available()):
            return
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
        if single_row_copy and self.bias is None:
            self.single_row_weight = weight.detach().t().contiguous()
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.single_row_weight is not None and x.shape[0] == 1:
            return torch.mm(x, self.single_row_weight)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
