"""2-D relative self-attention (CoAtNet Eq. 3) with a resizable per-head bias table."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coatnet.linear import TokenLinear


def relative_position_index(height: int, width: int, *,
                            device: torch.device | None = None) -> torch.Tensor:
    """(N, N) index into a flattened (2H-1, 2W-1) table; entry depends only on the 2-D offset.

    Offsets (dy, dx) land at (dy + H - 1) * (2W - 1) + (dx + W - 1): a stride of 2W-1, so no two
    offsets alias (the defect of stride-W indexing) and every table entry is reachable.
    """
    ys, xs = torch.meshgrid(torch.arange(height, device=device),
                            torch.arange(width, device=device), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    offsets = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (offsets[0] + height - 1) * (2 * width - 1) + (offsets[1] + width - 1)


def resize_bias_table(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinearly resize a (heads, 2H-1, 2W-1) table to (heads, 2h-1, 2w-1).

    align_corners=True keeps the zero offset at the centre and the extreme offsets at the edges.
    """
    size = (2 * height - 1, 2 * width - 1)
    if tuple(table.shape[-2:]) == size:
        return table
    return F.interpolate(table.unsqueeze(0), size=size, mode="bilinear",
                         align_corners=True).squeeze(0)


class CoAtNetRelativeAttention(nn.Module):
    """Multi-head attention whose logits get a learned bias w[i - j] per head (pre-softmax).

    The bias is passed to ``F.scaled_dot_product_attention`` as its additive mask, so the
    1/sqrt(d) scaling applies to q.k only, as in softmax(q.k / sqrt(d) + w).
    ``height``/``width`` are the feature-map size the table is built for; other sizes are served
    by interpolating the table inside the forward (differentiable), or once and stored, through
    ``update_relative_bias_and_indices``.
    """

    def __init__(self, in_dim: int, out_dim: int | None = None, *, heads: int, height: int,
                 width: int, attention_dropout: float = 0.0, ff_dropout: float = 0.0) -> None:
        super().__init__()
        out_dim = out_dim or in_dim
        if out_dim % heads:
            raise ValueError(f"out_dim={out_dim} must be divisible by heads={heads}")
        self.heads = heads
        self.head_dim = out_dim // heads
        self.attention_dropout = attention_dropout
        self.qkv = TokenLinear(in_dim, 3 * out_dim)
        self.proj = TokenLinear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(ff_dropout)
        self.height, self.width = height, width
        self.relative_bias_table = nn.Parameter(
            torch.zeros(heads, 2 * height - 1, 2 * width - 1))
        nn.init.trunc_normal_(self.relative_bias_table, std=0.02)
        self.register_buffer("relative_index", relative_position_index(height, width),
                             persistent=False)
        self._register_load_state_dict_pre_hook(self._resize_table_on_load)

    def relative_bias(self, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The (heads, N, N) additive bias for an ``height x width`` feature map."""
        height = self.height if height is None else height
        width = self.width if width is None else width
        if (height, width) == (self.height, self.width):
            table, index = self.relative_bias_table, self.relative_index
        else:
            table = resize_bias_table(self.relative_bias_table, height, width)
            index = relative_position_index(height, width, device=table.device)
        n = height * width
        # index_select, not table[:, index]: its backward is an index_add_, 9x faster on CPU
        # than the accumulating index_put_ that advanced indexing differentiates to.
        return table.flatten(1).index_select(1, index.flatten()).view(self.heads, n, n)

    @torch.no_grad()
    def update_relative_bias_and_indices(self, height: int, width: int) -> None:
        """Store the interpolated table and indices for a new feature size.

        The table is replaced by a new Parameter (not a tensor assigned to a Parameter name), so
        an optimizer built afterwards trains the resized table.
        """
        table = resize_bias_table(self.relative_bias_table.detach(), height, width)
        self.relative_bias_table = nn.Parameter(table.clone())
        self.relative_index = relative_position_index(
            height, width, device=self.relative_bias_table.device)
        self.height, self.width = height, width

    def _resize_table_on_load(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        key = prefix + "relative_bias_table"
        table = state_dict.get(key)
        if table is not None and table.shape != self.relative_bias_table.shape:
            state_dict[key] = resize_bias_table(table, self.height, self.width)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """x: (B, N, C_in) tokens of an ``height x width`` map; returns (B, N, C_out)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_bias(height, width).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias,
            dropout_p=self.attention_dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, size=({self.height}, {self.width})"
