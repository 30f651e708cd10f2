"""The model's linear layer: F.linear, or on the CPU a oneDNN matmul over a weight packed once at startup.

F.linear on the CPU runs MKL's sgemm on the row-major [out, in] weight. oneDNN with the weight reordered
once into its own blocked layout is faster at every batch size we run; measured on the 2-core dev VM,
one thread, all of SmolLM2-135M's decoder matmuls per step (float32): 34 -> 27 ms for 1 row, 44 -> 21 ms
for 4 rows, 68 -> 40 ms for 16 rows, 1214 -> 998 ms for 512 rows; its LM head 24 -> 13 ms for 16 rows.
The ops are the ones PyTorch's inductor uses for frozen CPU linears (torch.ops.mkldnn); where a build of
PyTorch lacks them, the layer keeps F.linear.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from minisrv.layers.forward_context import decode_rows

# Rows the packed layout is tuned for; 1..512-row batches all ran faster than F.linear with it.
PACK_BATCH_HINT = 16
# A oneDNN call costs ~17 us more than F.linear's ~2 us before any arithmetic; below about this many
# weight elements (1 MB in float32) that outweighs the faster arithmetic.
PACK_MIN_ELEMENTS = 1 << 18
# Up to this many rows the weight-only int8 kernel beats the packed float32 weight (SmolLM2-135M shapes, 2-vCPU
# VM, one thread: gate/up 0.60x at 1 row, 0.92x at 4, 1.66x at 16; the LM head 0.32x, 0.54x, 1.74x). The int4
# kernel shares the bound: alone it took as long as int8 on these shapes at 1 and 4 rows.
WEIGHT_ONLY_MAX_ROWS = 4
# Input columns that share one int4 scale and zero: the block of the embedded GGUF's Q4_1 weights, which this
# grid of 16 levels from each block's minimum represents again almost exactly.
INT4_GROUP = 32


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
        self.int8: torch.nn.Module | None = None             # quantize_int8's dynamic int8 linear
        self.int8_weight: torch.Tensor | None = None         # quantize_int8_weight_only's [out, in] int8 weight
        self.int8_scales: torch.Tensor | None = None         # and its bfloat16 scale per output channel
        self.int4_weight: torch.Tensor | None = None         # quantize_int4_weight_only's packed weight
        self.int4_scales_zeros: torch.Tensor | None = None   # and its [in / INT4_GROUP, out, 2] bfloat16 scales, zeros

    @torch.no_grad()
    def quantize_int8(self) -> None:
        """On the CPU, replace the weight by an int8 copy (symmetric, one scale per output channel) multiplied
        by PyTorch's dynamic int8 linear (fbgemm: activations quantized per call). Measured on the 2-core VM,
        one row, SmolLM2-135M shapes: the LM head 6.0 ms (packed float32) -> 0.9 ms, gate/up 236 -> 58 us."""
        weight = self.weight
        if self.int8 is not None or weight is None or weight.device.type != "cpu":
            return
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        with warnings.catch_warnings():   # quantized tensor types are deprecated; the fbgemm kernels they feed are not
            warnings.filterwarnings("ignore", message=".*quantize.*deprecated", category=UserWarning)
            qweight = torch.quantize_per_channel(weight.detach().float(), scales.double(),
                                                 torch.zeros(weight.shape[0], dtype=torch.long), 0, torch.qint8)
            self.int8 = torch.ao.nn.quantized.dynamic.Linear(weight.shape[1], weight.shape[0], dtype=torch.qint8)
            self.int8.set_weight_bias(qweight, None if self.bias is None else self.bias.detach().float())
        self.weight = None

    @torch.no_grad()
    def quantize_int8_weight_only(self) -> None:
        """On the CPU, add an int8 copy of the weight (symmetric, one scale per output channel) that PyTorch's
        weight-only int8 kernel multiplies (_weight_int8pack_mm: bfloat16 activations, the int8 weight read as it
        is, never dequantized as a whole) for the decode rows of a step with at most WEIGHT_ONLY_MAX_ROWS of them: a
        few streams. Prompt rows and larger batches keep the float32 weight, packed, where that kernel is slower.
        Activations keep their precision, unlike quantize_int8's. Call before pack()."""
        weight = self.weight
        if self.int8_weight is not None or weight is None or weight.device.type != "cpu":
            return
        # The kernel takes bfloat16 scales: round them first, so the int8 values are the nearest for those.
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
        self.int8_weight = torch.clamp((weight.detach() / scales.float()[:, None]).round(), -128, 127).to(torch.int8)
        self.int8_scales = scales

    @torch.no_grad()
    def quantize_int4_weight_only(self) -> None:
        """As quantize_int8_weight_only, with a 4-bit copy: 16 levels from the minimum of each run of INT4_GROUP
        input columns of an output row (a scale and a zero per run), multiplied by PyTorch's weight-only int4
        kernel for the CPU (_weight_int4pack_mm_for_cpu, bfloat16 activations). A layer the kernel cannot take
        (an input width no multiple of INT4_GROUP, an output count no multiple of 16) keeps its float32 weight
        alone. Call before pack()."""
        weight = self.weight
        if (self.int4_weight is not None or weight is None or weight.device.type != "cpu"
                or weight.shape[1] % INT4_GROUP or weight.shape[0] % 16):
            return
        rows, columns = weight.shape
        groups = weight.detach().float().view(rows, columns // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        # The kernel computes (q - 8) * scale + zero from bfloat16 scales and zeros: round them first, then
        # pick each value's nearest level on that grid.
        scales = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
        zeros = (low + 8 * scales).to(torch.bfloat16).float()
        levels = ((groups - zeros[..., None]) / scales[..., None]).round_().add_(8).clamp_(0, 15)
        self.int4_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            levels.to(torch.int32).view(rows, columns), 1)
        self.int4_scales_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()

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
        if (self.packed is not None or weight is None or weight.device.type != "cpu"
                or weight.numel() < PACK_MIN_ELEMENTS or not onednn_packing_available()):
            return
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
        if single_row_copy and self.bias is None:
            self.single_row_weight = weight.detach().t().contiguous()
        self.weight = None

    def describe(self) -> str:
        """What multiplies this layer's inputs, for the start-up log: "int4 up to 4 rows, else float32 packed"."""
        if self.int8 is not None:
            return "int8 (dynamic)"
        weight = self.packed if self.packed is not None else self.weight
        plain = str(weight.dtype).removeprefix("torch.") + (" packed" if self.packed is not None else "")
        small = "int8" if self.int8_weight is not None else "int4" if self.int4_weight is not None else None
        return f"{small} up to {WEIGHT_ONLY_MAX_ROWS} rows, else {plain}" if small else plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:
            return self.int8(x)
        if self.int8_weight is not None or self.int4_weight is not None:
            # Only decode rows, and only a few: a prompt's rows always meet the full weight, so a prompt computes
            # the same whether its prefix was cached or not, and whatever decodes share its step (the int4 kernel
            # takes bfloat16 activations: its logits differ enough from float32's to change a seeded sample).
            small = decode_rows(x.shape[0])
            if 0 < small <= WEIGHT_ONLY_MAX_ROWS:
                if small == x.shape[0]:
                    return self._weight_only(x)
                return torch.cat([self._weight_only(x[:small]), self._full_weight(x[small:])])
        return self._full_weight(x)

    def _weight_only(self, x: torch.Tensor) -> torch.Tensor:
        # A one-row step runs 120 of these: a .to() or a slice that changes nothing still costs a dispatch (about 2
        # us each), so neither is called then (1-row decode steps 3% faster on the 2-vCPU VM).
        x16 = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        if self.int8_weight is not None:
            y = torch.ops.aten._weight_int8pack_mm(x16, self.int8_weight, self.int8_scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x16, self.int4_weight, INT4_GROUP, self.int4_scales_zeros)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _full_weight(self, x: torch.Tensor) -> torch.Tensor:
        if self.single_row_weight is not None and x.shape[0] == 1:
            return torch.mm(x, self.single_row_weight)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
