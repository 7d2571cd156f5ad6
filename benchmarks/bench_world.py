"""Synthetic-world generation speed: images/s in one process, at several image sizes.

    python benchmarks/bench_world.py [--seconds 2] [--sizes 32 64 224]

"full labels": every sample key (caption, QA, boxes, masks) as a ``WorldDataset`` item;
"image only": the image, label and objects (``task="classification"``). Each row times
fresh scene indices (templates are cached after the first scenes, as in a real epoch).
"""
from __future__ import annotations

import argparse
import time

from vlkit.data.world import WorldConfig, WorldDataset


def images_per_second(dataset: WorldDataset, seconds: float) -> float:
    """Items fetched per second over at least ``seconds`` (after a short warm-up)."""
    for i in range(20):
        dataset[i]
    start, n = time.perf_counter(), 20
    while time.perf_counter() - start < seconds:
        for i in range(n, n + 50):
            dataset[i % len(dataset)]
        n += 50
    return (n - 20) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224], help="image sizes")
    args = parser.parse_args()
    print(f"{'size':>5} | {'full labels img/s':>17} | {'image only img/s':>16}")
    for size in args.sizes:
        cfg = WorldConfig(image_size=size, train_length=1_000_000)
        full = images_per_second(WorldDataset(cfg, "train", task="all"), args.seconds)
        image = images_per_second(WorldDataset(cfg, "train", task="classification"), args.seconds)
        print(f"{size:>5} | {full:>17,.0f} | {image:>16,.0f}")


if __name__ == "__main__":
    main()
