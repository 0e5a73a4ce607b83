"""What each of the model's CPU speed choices is worth: training images/s with one switched off.

    python benchmarks/cpu_ablation.py [--cases 64:16,224:8,224:32]
        [--out benchmarks/results/cpu_ablation.md]

Variants, all on one CoAtNet-0 in one process, timed in interleaved rounds so the ratios hold
on a noisy machine (each round times every variant once, in an order rotated by one each round,
so no variant always runs right after the child processes; the ratio is the median over rounds):
- shipped: the model as built, fed NCHW batches like a DataLoader gives.
- NCHW layout: weights and activations kept in NCHW (no channels-last conversion).
- 1x1 conv kernels: ``TokenLinear``'s products as oneDNN 1x1 convolutions instead of oneDNN
  inner products: ``F.conv2d`` on the rows viewed as one (1, C, rows, 1) channels-last image,
  differentiated by autograd (the hand-written backward that shipped before was about 2%
  faster at 64 px).
- nn.Linear: ``TokenLinear`` replaced by plain ``F.linear`` (BLAS for every token product).
- SE mean-pooled: squeeze-excitation pooling with ``x.mean``, whose backward divides into a new
  map-sized tensor (the shipped sum-then-scale backward is a broadcast view).
- Inductor MBConv blocks: not a shipped choice but the obvious one for the elementwise batch
  norm / GELU / SE passes: every MBConv block under ``torch.compile`` (Inductor's fused C++
  kernels; compiled in the warm-up step, not timed).
- glibc malloc defaults: the shipped model in a fresh child process (one per round) that does
  not call ``coatnet.cpu_memory.keep_freed_memory()``; every other variant runs with it, as the
  search's training workers do.
- mmap above 32 MiB: the same child with glibc's thresholds pinned (``MALLOC_MMAP_THRESHOLD_``
  at its 32 MiB ceiling, ``MALLOC_TRIM_THRESHOLD_`` 1 GiB) but mmap left on, so blocks over
  32 MiB still come as fresh pages every step (what ``keep_freed_memory`` did before it
  turned mmap off).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import harness

sys.path.insert(0, str(harness.REPO))
import coatnet.linear  # noqa: E402
from coatnet import CoAtNet, CoAtNetWithLinearClassifier  # noqa: E402
from coatnet.blocks import CoAtNetConvBlock, SqueezeExcitation  # noqa: E402
from coatnet.cpu_memory import keep_freed_memory  # noqa: E402
from coatnet.model import CoAtNetBackbone  # noqa: E402


@contextlib.contextmanager
def nchw_layout(model: torch.nn.Module) -> Iterator[None]:
    model.to(memory_format=torch.contiguous_format)
    shipped_forward = CoAtNetBackbone.forward

    def forward(self: CoAtNetBackbone, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    CoAtNetBackbone.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        CoAtNetBackbone.forward = shipped_forward  # type: ignore[method-assign]
        model.to(memory_format=torch.channels_last)


@contextlib.contextmanager
def plain_linear(model: torch.nn.Module) -> Iterator[None]:
    shipped = coatnet.linear.TokenLinear.forward
    coatnet.linear.TokenLinear.forward = (  # type: ignore[method-assign]
        lambda self, x: F.linear(x, self.weight, self.bias))
    try:
        yield
    finally:
        coatnet.linear.TokenLinear.forward = shipped  # type: ignore[method-assign]


@contextlib.contextmanager
def conv_kernels(model: torch.nn.Module) -> Iterator[None]:
    def forward(self: coatnet.linear.TokenLinear, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        image = x.reshape(1, b * n, 1, c).permute(0, 3, 1, 2)  # channels-last view of the rows
        out = F.conv2d(image, self.weight[:, :, None, None], self.bias)
        return out.permute(0, 2, 3, 1).reshape(b, n, self.out_features)

    shipped = coatnet.linear.TokenLinear.forward
    coatnet.linear.TokenLinear.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        coatnet.linear.TokenLinear.forward = shipped  # type: ignore[method-assign]


@contextlib.contextmanager
def mean_pooled_se(model: torch.nn.Module) -> Iterator[None]:
    def forward(self: SqueezeExcitation, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()

    shipped = SqueezeExcitation.forward
    SqueezeExcitation.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        SqueezeExcitation.forward = shipped  # type: ignore[method-assign]


@contextlib.contextmanager
def inductor_mbconv(model: torch.nn.Module) -> Iterator[None]:
    # one compiled graph per block shape and case; Dynamo's default limit would fall back to eager
    torch._dynamo.config.recompile_limit = 64
    blocks = [m for m in model.modules() if isinstance(m, CoAtNetConvBlock)]
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=False)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


VARIANTS: dict[str, Callable[[torch.nn.Module], contextlib.AbstractContextManager[None]]] = {
    "shipped": lambda model: contextlib.nullcontext(),
    "NCHW layout": nchw_layout,
    "1x1 conv kernels": conv_kernels,
    "nn.Linear": plain_linear,
    "SE mean-pooled": mean_pooled_se,
    "Inductor MBConv blocks": inductor_mbconv,
}


# Variants that need a fresh process: glibc reads its MALLOC_* settings once, at start-up.
CHILD_VARIANTS: dict[str, dict[str, str]] = {
    "glibc malloc defaults": {},
    "mmap above 32 MiB": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                          "MALLOC_TRIM_THRESHOLD_": str(1 << 30)},
}
_MALLOC_ENV = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD")


def images_per_second(step: Callable[[], None], batch: int, seconds: float) -> float:
    # one warm-up step: oneDNN primitive creation for this variant's shapes
    return batch * harness.calls_per_second(step, seconds, warmup=1, min_calls=2)


def build(side: int, batch: int) -> tuple[torch.nn.Module, Callable[[], None]]:
    """CoAtNet-0 and its training step (fused AdamW) on an NCHW batch, as a DataLoader yields."""
    torch.manual_seed(0)
    model = CoAtNetWithLinearClassifier(CoAtNet.CoAtNet_0(image_height=side,
                                                          image_width=side)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, side, side)
    y = torch.randint(0, 1000, (batch,))

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def child_rate(side: int, batch: int, seconds: float, malloc_env: dict[str, str]) -> float:
    """The shipped model in a fresh process with these malloc settings and no others."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_MALLOC_ENV)}
    return float(harness.run_child(__file__, ["--child", f"{side}:{batch}",
                                              "--seconds", str(seconds)],
                                   env={**env, **malloc_env}, what=f"timing {side} px"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="64:16,224:8,224:32", help="side:batch,...")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per variant and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", metavar="SIDE:BATCH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, batch = (int(v) for v in args.child.split(":"))
        print(images_per_second(build(side, batch)[1], batch, args.seconds))
        return
    kept = keep_freed_memory()
    results = harness.Results.dated(
        "CPU ablation: CoAtNet-0 training images/s per speed choice", script=__file__,
        machine=f"{harness.machine()}; keep_freed_memory() in this process: {kept}")
    results.table("size", "batch", "variant", "train img/s (median)",
                  "vs shipped (median of rounds)")
    for side, batch in harness.parse_cases(args.cases):
        model, step = build(side, batch)

        def measure(name: str) -> float:
            if name in CHILD_VARIANTS:
                return child_rate(side, batch, args.seconds, CHILD_VARIANTS[name])
            with VARIANTS[name](model):
                return images_per_second(step, batch, args.seconds)

        def progress(round_index: int, rates: dict[str, list[float]]) -> None:
            print(f"{side}px round {round_index + 1}/{args.rounds}: "
                  + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()), flush=True)

        rates = harness.interleaved_rounds([*VARIANTS, *CHILD_VARIANTS], args.rounds, measure,
                                           progress=progress)
        for name, values in rates.items():
            results.row(side, batch, name, f"{statistics.median(values):.1f}",
                        f"{harness.median_ratio(values, rates['shipped']):.3f}")
    results.write(args.out)


if __name__ == "__main__":
    main()
