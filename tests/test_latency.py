"""latency_ms of a real (small) CoAtNet on this machine's CPU."""

from __future__ import annotations

import pytest
import torch

from coatnet import CoAtNetConfig, CoAtNetWithLinearClassifier
from coatnet.search.latency import measure_latency


def _model(channels: list[int]) -> torch.nn.Module:
    config = CoAtNetConfig(image_height=32, image_width=32, image_channel=1,
                           num_blocks_in_layers=[1, 1, 1, 1, 1],
                           block_type_in_layers=["C", "C", "T", "T"],
                           num_channels_in_layers=channels, expand_scale_in_layers=2,
                           heads=2, num_classes=10)
    return CoAtNetWithLinearClassifier(config)


def test_latency_is_positive_named_and_leaves_the_model_as_it_was() -> None:
    model = _model([16, 16, 32, 64, 64]).train()
    threads = torch.get_num_threads()
    measured = measure_latency(model, image_size=32, image_channel=1,
                               device=torch.device("cpu"), batch_size=2, threads=1,
                               warmup=1, repeats=5)
    assert measured.ms > 0 and measured.device.startswith("cpu:")
    assert (measured.batch_size, measured.threads, measured.repeats) == (2, 1, 5)
    assert model.training and torch.get_num_threads() == threads


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(_model([16, 16, 32, 64, 64]), image_size=32, image_channel=1,
                        device=torch.device("cpu"), repeats=0)
