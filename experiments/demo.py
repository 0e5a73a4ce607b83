"""Build CoAtNet-0, print its size and cost, and run one image at 224 and at 384.

    python experiments/demo.py [--preset CoAtNet_0]
"""

from __future__ import annotations

import argparse
import time

import torch

from coatnet import CoAtNet, CoAtNetWithLinearClassifier, count_params_and_macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="CoAtNet_0", choices=CoAtNet.PRESETS)
    args = parser.parse_args()

    config = CoAtNet.by_name(args.preset)
    print(f"{args.preset}: {count_params_and_macs(config)}")
    print(f"{args.preset}: {count_params_and_macs(config, image_height=384, image_width=384)}"
          " (run at 384, tables interpolated)")
    model = CoAtNetWithLinearClassifier(config).eval()
    for side in (224, 384):
        image = torch.randn(1, 3, side, side)
        start = time.perf_counter()
        with torch.inference_mode():
            logits = model(image)
        print(f"forward at {side}x{side}: logits {tuple(logits.shape)} "
              f"in {time.perf_counter() - start:.2f} s")
    model.update_relative_bias_and_indices(384, 384)
    print("stored 384x384 relative-bias tables: later forwards at 384 do no interpolation")


if __name__ == "__main__":
    main()
