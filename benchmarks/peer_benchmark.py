"""This CoAtNet-0 against timm's ``coatnet_0_224``: training and inference images/s, as ratios.

    python benchmarks/peer_benchmark.py [--device cpu|cuda] [--out benchmarks/results/peer_cpu.md]

Both models are built at the same input size and timed in interleaved rounds, so the ratios
hold on a noisy machine, with every thread torch uses. In each round each model trains and
infers in a fresh process of its own, as a training run would: in one shared process timm's
224 px training rate swung between 5.7 and 7.2 img/s with the heap state the other model and
the earlier measurements left behind. Two setups:
- ``built``: each model exactly as its library builds it, fed NCHW batches (what a DataLoader
  yields). Ours runs channels-last internally; timm's stays NCHW unless asked.
- ``channels_last``: timm's model and input also converted to channels-last (timm's
  ``--channels-last`` training flag), i.e. the peer at its best layout.
Both use the same fused AdamW, and the same process-wide malloc setting: by default
``coatnet.cpu_memory.keep_freed_memory`` (no per-step page faults, the fastest setting for both
models); ``--malloc glibc`` leaves glibc's defaults, as a training script that does not set it
runs (timm's bigger activations suffer more from those).
MFU = 3 x 2 x forward MACs per image x images/s, over the matmul rate measured in the same run
(fp32 on CPU, bf16 on GPU). ``--per-stage`` adds forward + backward times of S0..S4 (both
models in this process: a diagnostic of where the ratio comes from).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import harness

sys.path.insert(0, str(harness.REPO))
from coatnet import CoAtNet, CoAtNetWithLinearClassifier  # noqa: E402
from coatnet.cpu_memory import keep_freed_memory  # noqa: E402


OURS, THEIRS = "coatnet (ours)", "timm coatnet_0_224"
SETUPS = ("built", "channels_last")


def allow_tf32(device: torch.device) -> None:
    """On GPU, the fp32 leftovers of bf16 autocast may use TF32, as in any GPU training."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_model(name: str, side: int, device: torch.device, setup: str) -> torch.nn.Module:
    if name == OURS:
        model = CoAtNetWithLinearClassifier(CoAtNet.CoAtNet_0(image_height=side,
                                                              image_width=side))
    else:
        import timm

        model = timm.create_model("coatnet_0_224", img_size=side, pretrained=False)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if setup == "channels_last" else model


def build_models(side: int, device: torch.device, setup: str) -> dict[str, torch.nn.Module]:
    return {name: build_model(name, side, device, setup) for name in (OURS, THEIRS)}


def rates_in_fresh_process(name: str, side: int, batch: int, setup: str,
                           args: argparse.Namespace) -> dict[str, float]:
    """Train and inference images/s of one model, measured by a child process of its own."""
    return json.loads(harness.run_child(
        __file__, ["--child", json.dumps([name, side, batch, setup]), "--device", args.device,
                   "--seconds", str(args.seconds), "--malloc", args.malloc],
        what=f"timing {name} at {side} px"))


def child_main(args: argparse.Namespace) -> None:
    name, side, batch, setup = json.loads(args.child)
    if args.malloc == "kept":
        keep_freed_memory()
    device = torch.device(args.device)
    allow_tf32(device)
    model = build_model(name, side, device, setup)
    rates = {mode: time_steps(model, batch, side, device, setup=setup, train=mode == "train",
                              amp=device.type == "cuda", seconds=args.seconds)
             for mode in ("train", "infer")}
    print(json.dumps(rates))


def forward_macs(model: torch.nn.Module, side: int, device: torch.device) -> int:
    """Each model's own forward MACs (conv, linear, attention matmuls), batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, side, side, device=device))
    return counter.get_total_flops() // 2


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / harness.timer_median("a @ b", {"a": a, "b": b}, seconds)


def conv1x1_rate(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """A second ceiling: oneDNN/cuDNN 1x1 convolution, which on CPU runs about twice as fast
    as the BLAS matmul (so MFU against the matmul rate alone can exceed what is attainable)."""
    x = torch.randn(32, 1024, 16, 16, device=device, dtype=dtype).to(
        memory_format=torch.channels_last)
    w = torch.randn(1024, 1024, 1, 1, device=device, dtype=dtype)
    return 2 * 32 * 16 * 16 * 1024 * 1024 / harness.timer_median(
        "torch.nn.functional.conv2d(x, w)", {"x": x, "w": w, "torch": torch}, seconds)


def time_steps(model: torch.nn.Module, batch: int, side: int, device: torch.device, *,
               setup: str, train: bool, amp: bool, seconds: float) -> float:
    x = torch.randn(batch, 3, side, side, device=device)
    if setup == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    # The fused AdamW kernel (CPU and CUDA) keeps the optimizer's per-parameter overhead, which
    # both models share, from diluting the ratio.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def train_step() -> None:
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step() -> None:
        with torch.inference_mode(), autocast:
            model(x)

    model.train(train)
    step = train_step if train else infer_step
    for _ in range(2):
        step()
    sync = "torch.cuda.synchronize()" if device.type == "cuda" else "pass"
    return batch / harness.timer_median(f"step(); {sync}", {"step": step, "torch": torch},
                                        seconds)


def stages(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """S0..S4 of either model, for the per-stage table."""
    if isinstance(model, CoAtNetWithLinearClassifier):
        stem, rest = model.backbone.stem, list(model.backbone.stages)
    else:  # timm's MaxxVit
        stem, rest = model.stem, list(model.stages)
    return [("S0 (stem)", stem)] + [(f"S{i}", stage) for i, stage in enumerate(rest, start=1)]


def stage_times(models: dict[str, torch.nn.Module], batch: int, side: int,
                device: torch.device, *, setup: str, rounds: int) -> list[str]:
    """Forward + backward ms of each stage on its real input, medians of interleaved rounds:
    where the whole-model ratio comes from."""
    timed: dict[str, list[tuple[str, torch.Tensor, torch.nn.Module]]] = {}
    for name, model in models.items():
        x = torch.randn(batch, 3, side, side, device=device)
        if setup == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        timed[name] = []
        with torch.no_grad():
            for stage_name, stage in stages(model.train()):
                timed[name].append((stage_name, x, stage))
                x = stage(x)
    ms: dict[tuple[str, str], list[float]] = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    for _ in range(rounds):
        for name, items in timed.items():
            for stage_name, x, stage in items:
                x = x.detach().requires_grad_(not stage_name.startswith("S0"))

                def forward_backward(stage: torch.nn.Module = stage, x: torch.Tensor = x) -> None:
                    out = stage(x)
                    out.backward(torch.ones_like(out))

                ms.setdefault((name, stage_name), []).extend(
                    t * 1e3 for t in harness.timed_repeats(forward_backward, repeats=2,
                                                           warmup=1, sync=sync))
                stage.zero_grad(set_to_none=True)
    lines = []
    for stage_name, _, _ in timed[OURS]:
        ours, theirs = (statistics.median(ms[(n, stage_name)]) for n in (OURS, THEIRS))
        lines.append(harness.row(side, batch, setup, stage_name, f"{ours:.1f} / {theirs:.1f}",
                                 f"{theirs / ours:.2f}x"))
    return lines


def compare(side: int, batch: int, setup: str, device: torch.device, peaks: tuple[float, float],
            args: argparse.Namespace) -> str:
    """One row of the main table: both models' medians over interleaved rounds (each model in
    a fresh process each round)."""
    macs = {name: forward_macs(model, side, device)
            for name, model in build_models(side, device, setup).items()}

    def progress(round_index: int, results: dict[str, list[dict[str, float]]]) -> None:
        print(f"{side}px {setup} round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{n} {r[-1]['train']:.1f} img/s" for n, r in results.items()), flush=True)

    rounds = harness.interleaved_rounds(
        list(macs), args.rounds,
        lambda name: rates_in_fresh_process(name, side, batch, setup, args), progress=progress)
    results = {n: {m: [r[m] for r in per_round] for m in ("train", "infer")}
               for n, per_round in rounds.items()}
    med = {n: {m: statistics.median(v) for m, v in r.items()} for n, r in results.items()}
    ours, theirs = med[OURS], med[THEIRS]
    # Each round times both models back to back: the median of per-round ratios.
    ratio = {m: harness.median_ratio(results[OURS][m], results[THEIRS][m])
             for m in ("train", "infer")}
    mfu = {n: 6 * macs[n] * med[n]["train"] for n in med}
    peak, conv_peak = peaks
    return harness.row(
        side, batch, setup, f"{ours['train']:.1f} / {theirs['train']:.1f}",
        f"**{ratio['train']:.2f}x**", f"{ours['infer']:.1f} / {theirs['infer']:.1f}",
        f"{ratio['infer']:.2f}x", f"{macs[OURS] / 1e9:.2f} / {macs[THEIRS] / 1e9:.2f}",
        f"{mfu[OURS] / peak:.1%} / {mfu[THEIRS] / peak:.1%} "
        f"({mfu[OURS] / conv_peak:.1%} / {mfu[THEIRS] / conv_peak:.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=6.0, help="timing per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--cases", default="224:8,64:16", help="side:batch,...")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help=f"comma-separated, from {', '.join(SETUPS)}")
    parser.add_argument("--per-stage", action="store_true",
                        help="also time forward + backward of each stage (S0..S4) of both models")
    parser.add_argument("--malloc", choices=("kept", "glibc"), default="kept",
                        help="kept: call keep_freed_memory() for both models; glibc: defaults")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    setups = args.setups.split(",")
    if unknown := sorted(set(setups) - set(SETUPS)):
        parser.error(f"--setups: unknown {unknown}; allowed: {', '.join(SETUPS)}")
    cases = harness.parse_cases(args.cases)
    device = torch.device(args.device)
    kept = keep_freed_memory() if args.malloc == "kept" else False
    allow_tf32(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    peak = matmul_rate(device, dtype, args.seconds)
    conv_peak = conv1x1_rate(device, dtype, args.seconds)
    gpu = f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""
    results = harness.Results.dated(
        "Peer benchmark: CoAtNet-0, this project vs timm", script=__file__,
        machine=f"{harness.machine()}, device {device}{gpu}; keep_freed_memory(): {kept}",
        notes=[f"Measured {str(dtype).removeprefix('torch.')} matmul rate: "
               f"{peak / 1e12:.3f} TFLOP/s (MFU's denominator); 1x1-conv rate: "
               f"{conv_peak / 1e12:.3f} TFLOP/s (MFU vs conv in brackets)"])
    results.table("size", "batch", "setup", "train img/s ours / timm", "train ratio",
                  "infer img/s ours / timm", "infer ratio", "GMACs ours / timm",
                  "train MFU ours / timm")
    for side, batch in cases:
        for setup in setups:
            results.add(compare(side, batch, setup, device, (peak, conv_peak), args), echo=True)
    if args.per_stage:
        results.add("", "Per stage, forward + backward on the stage's real input (ms, medians):",
                    "")
        results.table("size", "batch", "setup", "stage", "ms ours / timm", "timm/ours")
        for side, batch in cases:
            for setup in setups:
                results.add(*stage_times(build_models(side, device, setup), batch, side, device,
                                         setup=setup, rounds=args.rounds), echo=True)
    results.write(args.out)


if __name__ == "__main__":
    main()
