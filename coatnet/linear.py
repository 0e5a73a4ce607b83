"""A drop-in ``nn.Linear`` for (B, N, C) token tensors that is faster on CPU.

On CPU, oneDNN's 1x1 convolution runs the forward and input-gradient products about twice as
fast as the BLAS matmul behind ``F.linear`` (MKL takes a slow path on AMD CPUs such as the
2-core EPYC this project is tested on). The rows go in as one (1, C, rows, 1) channels-last
image, not as a batch of B images: with few tokens per image oneDNN is up to 2x faster that way.
oneDNN's *weight*-gradient kernel can lose to BLAS with few rows and a large weight (3.4 ms vs
1.9 ms for 64 rows, 3072 -> 768: the last stage of CoAtNet-0 at 64 px), so up to
``SMALL_TOKEN_COUNT`` rows the weight gradient is one ``grad.T @ x``. Measured on CoAtNet-0
training (``benchmarks/results/cpu_ablation.md``): +19% at 64 px and +29% at 224 px over
``nn.Linear``; +7% at 64 px over a batched convolution that autograd differentiates (same at
224 px): about 2 points from the explicit backward with its BLAS weight gradient, the rest from
the single-image view. The weights, the state dict and every other device are exactly
``nn.Linear``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Token rows (batch x tokens) up to which the weight gradient goes through BLAS.
SMALL_TOKEN_COUNT = 128


def _as_image(rows: torch.Tensor) -> torch.Tensor:
    """(T, C) rows -> a (1, C, T, 1) channels-last view of the same memory."""
    return rows.view(1, rows.shape[0], 1, rows.shape[1]).permute(0, 3, 1, 2)


def _as_rows(image: torch.Tensor) -> torch.Tensor:
    return image.permute(0, 2, 3, 1).reshape(image.shape[2], image.shape[1])


class _ConvLinear(torch.autograd.Function):
    """y = x W^T + b through oneDNN's 1x1 convolution, on (T, C) rows."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return _as_rows(F.conv2d(_as_image(rows), weight[:, :, None, None], bias))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        rows, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad
        grad = grad.contiguous()
        small = rows.shape[0] <= SMALL_TOKEN_COUNT
        grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
            _as_image(grad), _as_image(rows), weight[:, :, None, None], None,
            (1, 1), (0, 0), (1, 1), False, (0, 0), 1,
            (need_input, need_weight and not small, False))
        if grad_input is not None:
            grad_input = _as_rows(grad_input)
        if need_weight:
            grad_weight = grad.t() @ rows if small else grad_weight.view_as(weight)
        grad_bias = grad.sum(0) if need_bias and ctx.has_bias else None
        return grad_input, grad_weight, grad_bias


class TokenLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dim() != 3 or x.dtype != torch.float32
                or self.weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
            return F.linear(x, self.weight, self.bias)
        b, n, c = x.shape
        out = _ConvLinear.apply(x.reshape(b * n, c).contiguous(), self.weight, self.bias)
        return out.view(b, n, self.out_features)
