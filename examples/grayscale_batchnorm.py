"""The seed example: a grayscale image through a server-side BatchNorm2d(1) in train mode.

Start a server first (./scripts/serve.sh), then:

    .venv/bin/python examples/grayscale_batchnorm.py [--target 127.0.0.1:50051]

The image is generated (a smooth 256x256 pattern with noise, scaled to mean 0.4865 and
std 0.1834 like the seed's photo). Train mode normalizes with the batch's own statistics,
so the output has mean ~0 and std ~1; weight and bias start at 1 and 0.
"""

from __future__ import annotations

import argparse
import uuid

import numpy as np

from normserve.client import Client

TARGET_MEAN, TARGET_STD = 0.4865, 0.1834


def grayscale_image(size: int = 256, seed: int = 0) -> np.ndarray:
    """A (1, 1, H, W) float32 image in [0, 1] with the seed photo's mean and std."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    pattern = np.sin(6 * xx) * np.cos(4 * yy) + 0.5 * np.sin(15 * (xx + yy)) + 0.3 * rng.standard_normal((size, size))
    img = (pattern - pattern.mean()) / pattern.std() * TARGET_STD + TARGET_MEAN
    return np.clip(img, 0.0, 1.0).astype(np.float32)[None, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    args = parser.parse_args()

    image = grayscale_image()
    name = f"example-bn-{uuid.uuid4().hex[:8]}"
    with Client(args.target, timeout=30) as client:
        client.create_layer(name, "BatchNorm2d", num_features=1)
        state = client.get_state(name)
        out = client.normalize(name, image, mode="train")
        client.delete_layer(name)

    print(f"input : mean={image.mean():.4f} std={image.std(ddof=1):.4f}")
    print(f"output: mean={out.mean():.4f} std={out.std(ddof=1):.4f}")
    print(f"weight={state['weight'][0]:.1f} bias={state['bias'][0]:.1f}")


if __name__ == "__main__":
    main()
