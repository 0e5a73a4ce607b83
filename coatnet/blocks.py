"""CoAtNet building blocks (appendix A.1): stem, MBConv and relative-attention Transformer.

All residual blocks are pre-norm (x <- x + Module(Norm(x))). A down-sampling block halves the
map with ceil rounding, so any input side from 32 up works: the shortcut's 2x2 max-pool uses
``ceil_mode`` and the strided 1x1 conv yields the same ceil(H / 2).
Blocks take and return NCHW tensors; with channels_last memory the NHWC views used by
LayerNorm and attention are free.
"""

from __future__ import annotations

import torch
from torch import nn

from coatnet.attention import CoAtNetRelativeAttention
from coatnet.linear import TokenLinear

# torchvision.ops has both of these, but importing torchvision costs every Ray Train worker
# 1.5-3 s (measured with `python -X importtime`); they are a few lines each.


class StochasticDepth(nn.Module):
    """Drops the whole residual branch per sample with probability ``p`` (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * noise.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SqueezeExcitation(nn.Module):
    """SE (Hu et al.): channel gates from globally pooled features."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean as a sum scaled on the pooled (B, C, 1, 1) side: the backward of a sum is a
        # broadcast view, where mean's divides into a new map-sized tensor that autograd then
        # adds to x's other gradient. SE fwd + bwd of CoAtNet-0's 224 px stage 1 runs 1.35x
        # faster (two fewer passes over the map).
        pooled = x.sum((2, 3), keepdim=True) / (x.shape[2] * x.shape[3])
        scale = self.fc2(self.act(self.fc1(pooled)))
        return x * scale.sigmoid()


def downsampled(size: int) -> int:
    """Side of a map after one stride-2 stage: ceil(size / 2)."""
    return (size + 1) // 2


class CoAtNetStem(nn.Module):
    """S0: ``num_convs`` 3x3 convs, the first with stride 2 (BN + GELU between convs)."""

    def __init__(self, in_channels: int, out_channels: int, *, num_convs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_convs):
            if i > 0:
                layers += [nn.BatchNorm2d(out_channels), nn.GELU()]
            layers.append(nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3,
                                    stride=2 if i == 0 else 1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _PoolProject(nn.Module):
    """Shortcut of a down-sampling block: Proj(Pool(x)), 2x2 max-pool then 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(x))


class CoAtNetConvBlock(nn.Module):
    """Pre-norm MBConv: 1x1 expand (carries the stride, Eq. 5) -> depthwise 3x3 -> SE -> 1x1.

    The hidden width is ``out_channels * expand_scale`` and SE squeezes to
    ``out_channels * se_ratio`` (sizing from the block's output reproduces the paper's counts).
    No inner skip: the only residual is the outer one.
    """

    def __init__(self, in_channels: int, out_channels: int, *, downsample: bool,
                 expand_scale: int = 4, se_ratio: float = 0.25,
                 path_dropout: float = 0.0) -> None:
        super().__init__()
        hidden = out_channels * expand_scale
        stride = 2 if downsample else 1
        if downsample:
            self.shortcut: nn.Module = _PoolProject(in_channels, out_channels)
        elif in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.shortcut = nn.Identity()
        self.norm = nn.BatchNorm2d(in_channels)
        squeeze = max(1, int(out_channels * se_ratio))
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, stride=stride, bias=False),
            nn.BatchNorm2d(hidden), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.GELU(),
            SqueezeExcitation(hidden, squeeze) if se_ratio > 0
            else nn.Identity(),
            nn.Conv2d(hidden, out_channels, 1),
        )
        self.drop_path = StochasticDepth(path_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.drop_path(self.conv(self.norm(x)))


class _FeedForward(nn.Sequential):
    def __init__(self, dim: int, *, expand_scale: int, dropout: float) -> None:
        super().__init__(TokenLinear(dim, dim * expand_scale), nn.GELU(), nn.Dropout(dropout),
                         TokenLinear(dim * expand_scale, dim), nn.Dropout(dropout))


class CoAtNetTransformerBlock(nn.Module):
    """Pre-norm relative-attention block + 4x GELU FFN.

    Down-sampling (first block of a stage): x <- Proj(Pool(x)) + Attention(Pool(Norm(x))).
    ``height``/``width`` are this block's *output* map size, which its bias table is built for.
    """

    def __init__(self, in_channels: int, out_channels: int, *, downsample: bool, heads: int,
                 height: int, width: int, ffn_expand_scale: int = 4,
                 attention_dropout: float = 0.0, ff_dropout: float = 0.0,
                 path_dropout: float = 0.0) -> None:
        super().__init__()
        self.downsample = downsample
        if downsample:
            self.shortcut: nn.Module = _PoolProject(in_channels, out_channels)
            self.pool: nn.Module = nn.MaxPool2d(2, 2, ceil_mode=True)
        elif in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
            self.pool = nn.Identity()
        else:
            self.shortcut = nn.Identity()
            self.pool = nn.Identity()
        self.norm1 = nn.LayerNorm(in_channels)
        self.attn = CoAtNetRelativeAttention(in_channels, out_channels, heads=heads,
                                             height=height, width=width,
                                             attention_dropout=attention_dropout,
                                             ff_dropout=ff_dropout)
        self.norm2 = nn.LayerNorm(out_channels)
        self.ffn = _FeedForward(out_channels, expand_scale=ffn_expand_scale, dropout=ff_dropout)
        self.drop_path = StochasticDepth(path_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        shortcut = self.shortcut(x)
        tokens = self.norm1(x.permute(0, 2, 3, 1))  # NHWC
        tokens = self.pool(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        h, w = tokens.shape[1:3]
        tokens = self.attn(tokens.reshape(b, h * w, c), h, w)
        out_c = tokens.shape[-1]
        x = shortcut.permute(0, 2, 3, 1).reshape(b, h * w, out_c) + self.drop_path(tokens)
        x = x + self.drop_path(self.ffn(self.norm2(x)))
        return x.view(b, h, w, out_c).permute(0, 3, 1, 2)
