"""Parameter and MAC counts of a config, computed on the meta device (no weights allocated).

MACs count what the paper counts: convolutions, linear layers and attention matmuls
(``torch.utils.flop_counter.FlopCounterMode`` reports FLOPs = 2 x MACs for exactly these).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from coatnet.config import CoAtNetConfig


@dataclass(frozen=True)
class ModelComplexity:
    params: int
    macs: int
    image_height: int
    image_width: int

    def __str__(self) -> str:
        return (f"{self.params / 1e6:.2f} M params, {self.macs / 1e9:.2f} G MACs at "
                f"{self.image_height}x{self.image_width}")


def count_params_and_macs(config: CoAtNetConfig, *, image_height: int | None = None,
                          image_width: int | None = None) -> ModelComplexity:
    """Params and forward MACs (batch 1) of ``CoAtNetWithLinearClassifier(config)``.

    The image size defaults to the config's; another size counts the model as built for the
    config but run at that size (the relative-bias tables are interpolated, as in fine-tuning).
    Results are cached: configs are frozen and hashable.
    """
    height = config.image_height if image_height is None else image_height
    width = config.image_width if image_width is None else image_width
    return _count(config, height, width)


@functools.lru_cache(maxsize=4096)
def _count(config: CoAtNetConfig, height: int, width: int) -> ModelComplexity:
    from coatnet.model import CoAtNetWithLinearClassifier

    with torch.device("meta"):
        model = CoAtNetWithLinearClassifier(config).eval()
        image = torch.empty(1, config.image_channel, height, width)
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    return ModelComplexity(params=params, macs=counter.get_total_flops() // 2,
                           image_height=height, image_width=width)
