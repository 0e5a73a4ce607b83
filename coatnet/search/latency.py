"""``latency_ms``: a candidate's inference latency on the device its trial runs on.

Measured once per candidate, before it trains (an untrained model runs as fast as a trained
one): ``warmup`` untimed forward passes, then the median of ``repeats`` timed ones, each a
batch of ``batch_size`` images under ``torch.inference_mode`` with ``threads`` CPU threads
(the thread count is restored after). On CUDA every pass is synchronised. The result says
which device it was measured on, since a figure means nothing without it.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch

__all__ = ["Latency", "device_name", "measure_latency"]


@dataclass(frozen=True)
class Latency:
    """Median milliseconds per batch, and what it was measured with."""

    ms: float
    device: str
    batch_size: int
    threads: int
    repeats: int


def device_name(device: torch.device) -> str:
    """``cuda:NVIDIA H200`` or ``cpu:<processor>`` (the machine when the processor is unnamed)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def measure_latency(model: torch.nn.Module, *, image_size: int, image_channel: int,
                    device: torch.device, batch_size: int = 1, threads: int = 1,
                    warmup: int = 3, repeats: int = 10) -> Latency:
    """The model's median inference latency (model and input on ``device``; the model's
    training mode is restored after)."""
    if batch_size < 1 or threads < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"need batch_size, threads, repeats >= 1 and warmup >= 0; got "
                         f"{batch_size}, {threads}, {repeats}, {warmup}")
    was_training = model.training
    previous_threads = torch.get_num_threads()
    # a generator of its own: measuring must not move the trial's seeded random streams
    images = torch.randn(batch_size, image_channel, image_size, image_size,
                         generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[float] = []
    try:
        torch.set_num_threads(threads)
        model.eval()
        with torch.inference_mode():
            for index in range(warmup + repeats):
                sync()
                start = time.perf_counter()
                model(images)
                sync()
                if index >= warmup:
                    times.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    return Latency(ms=statistics.median(times), device=device_name(device),
                   batch_size=batch_size, threads=threads, repeats=repeats)
