"""A faithful PyTorch CoAtNet (Dai et al. 2021, arXiv 2106.04803) with ComVEX's public API."""

from coatnet.attention import CoAtNetRelativeAttention
from coatnet.blocks import CoAtNetConvBlock, CoAtNetTransformerBlock
from coatnet.complexity import ModelComplexity, count_params_and_macs
from coatnet.config import CoAtNet, CoAtNetConfig
from coatnet.model import CoAtNetBackbone, CoAtNetBase, CoAtNetWithLinearClassifier

__all__ = [
    "CoAtNet",
    "CoAtNetBackbone",
    "CoAtNetBase",
    "CoAtNetConfig",
    "CoAtNetConvBlock",
    "CoAtNetRelativeAttention",
    "CoAtNetTransformerBlock",
    "CoAtNetWithLinearClassifier",
    "ModelComplexity",
    "count_params_and_macs",
]
