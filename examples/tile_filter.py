"""A numpy tile filter with SharedArray: blur an image tile by tile, on every core.

The image and the result live in shared memory; each task gets the two ``SharedArray``
objects (sent by reference, not copied) and a tile's bounds, reads the tile plus a
one-pixel border from the input and writes its part of the output.  Run it with
``python examples/tile_filter.py [SIZE]`` (numpy needed: ``pip install 'parallelkit[numpy]'``).
"""

from __future__ import annotations

import sys
import time

import numpy as np

import parallelkit as pk

Tile = tuple[pk.SharedArray, pk.SharedArray, int, int, int, int]


def box_blur(image: np.ndarray) -> np.ndarray:
    """3x3 mean of ``image`` (edges padded with the nearest pixel), as float64."""
    padded = np.pad(image, 1, mode="edge").astype(np.float64)
    out = np.zeros(image.shape, dtype=np.float64)
    rows, cols = image.shape
    for dy in range(3):
        for dx in range(3):
            out += padded[dy : dy + rows, dx : dx + cols]
    return out / 9.0


def blur_tile(tile: Tile) -> int:
    source, target, top, bottom, left, right = tile
    image = source.array
    rows, cols = image.shape
    # The tile plus a one-pixel border (where the image has one), blurred, then cropped.
    y0, y1 = max(top - 1, 0), min(bottom + 1, rows)
    x0, x1 = max(left - 1, 0), min(right + 1, cols)
    blurred = box_blur(image[y0:y1, x0:x1])
    target.array[top:bottom, left:right] = blurred[top - y0 : bottom - y0, left - x0 : right - x0]
    return (bottom - top) * (right - left)


def tiles(size: int, step: int) -> list[tuple[int, int, int, int]]:
    return [
        (top, min(top + step, size), left, min(left + step, size))
        for top in range(0, size, step)
        for left in range(0, size, step)
    ]


def main(size: int) -> None:
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, size=(size, size)).astype(np.uint8)
    with (
        pk.SharedArray.from_array(picture) as source,
        pk.SharedArray.zeros((size, size), dtype="float64") as target,
    ):
        begin = time.perf_counter()
        work = [(source, target, *bounds) for bounds in tiles(size, 256)]
        pixels = sum(pk.run_parallel(blur_tile, work))
        elapsed = time.perf_counter() - begin
        expected = box_blur(picture)
        print(f"{size}x{size} image, {len(work)} tiles, {pixels:_} pixels in {elapsed:.2f} s")
        print(f"same as one whole-image blur: {np.allclose(target.array, expected)}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1024)
