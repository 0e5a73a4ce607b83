"""A drop-in ``nn.Linear`` for (B, N, C) token tensors that is faster on CPU.

On CPU, PyTorch sends fp32 ``F.linear`` and both of its backward products to MKL's sgemm,
which takes a slow path on AMD CPUs: on the 2-core EPYC this project is tested on it runs the
token projections of CoAtNet-0 at 0.16-0.22 TFLOP/s, where oneDNN's inner product runs the
same products at 0.33-0.52 TFLOP/s. ``TokenLinear`` computes all three of them,
y = x W^T + b, dx = dy W and dW = dy^T x, as oneDNN inner products: the
``mkldnn::_linear_pointwise`` op, which Inductor's CPU backend emits for linear layers and which
takes its weight operand as a transposed view without copying it (its input it makes
contiguous). Measured on CoAtNet-0 training
(``benchmarks/results/cpu_ablation.md``): +42% over ``nn.Linear`` at 64 px and +30-33% at
224 px; +13% at 64 px over running the products as oneDNN 1x1 convolutions, whose kernels are
tuned for few rows less well (at 224 px, with thousands of rows, the two are within 3%).

Everywhere else (GPU, other dtypes, CPU autocast, under ``torch.compile``, oneDNN switched
off with ``torch.backends.mkldnn.flags(enabled=False)``, a torch whose op is missing or has
another signature: that one with a warning) it is plain ``F.linear``. The weights and the state
dict are ``nn.Linear``'s, and results agree with ``F.linear``'s to fp32 rounding.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN; ``weight`` may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _register_flop_formula() -> None:
    """Let ``FlopCounterMode`` count the op as it counts ``F.linear`` (2 x rows x in x out)."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return

    def flops(x_shape: torch.Size, weight_shape: torch.Size, *args: object,
              **kwargs: object) -> int:
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * weight_shape[0]

    try:
        register_flop_formula(op)(flops)
    except RuntimeError:  # a torch that counts the op itself
        pass


_register_flop_formula()


# The op is internal to PyTorch: a build whose op has another signature falls back to F.linear.
_SCHEMA = ("mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, "
           "Scalar?[] scalars, str? algorithm) -> Tensor Y")


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build has the oneDNN inner-product op, with the signature used here.

    Checked from the op's schema, not by running it, so a ``FlopCounterMode`` or other dispatch
    mode around the first forward sees only the model's own products.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    schema = "missing" if op is None else str(op.default._schema)
    if schema != _SCHEMA:
        warnings.warn(f"TokenLinear falls back to F.linear on CPU (slower): this torch's "
                      f"mkldnn::_linear_pointwise is {schema!r}, expected {_SCHEMA!r}",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b on (T, C) rows, forward and backward as oneDNN inner products."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(rows, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        rows, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad
        grad = grad.contiguous()
        grad_input = _onednn_linear(grad, weight.t(), None) if need_input else None
        grad_weight = _onednn_linear(grad.t(), rows.t(), None) if need_weight else None
        grad_bias = grad.sum(0) if need_bias and ctx.has_bias else None
        return grad_input, grad_weight, grad_bias


class TokenLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.compiler.is_compiling()  # Inductor lowers the op only for frozen weights
                or x.device.type != "cpu" or x.dim() != 3 or x.dtype != torch.float32
                or self.weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
                or not torch.backends.mkldnn.enabled or not onednn_linear_available()):
            return F.linear(x, self.weight, self.bias)
        b, n, c = x.shape
        out = _OneDNNLinear.apply(x.reshape(b * n, c).contiguous(), self.weight, self.bias)
        return out.view(b, n, self.out_features)
