"""Where prepare.near_duplicate_bits comes from: how far a copy moves the pHash, and what
each radius groups on ELPV.

    .venv/bin/python bench/bench_near_duplicates.py [--crops 600] [--smoke]

Copies: random crops of scikit-learn's two sample photos, each resized by 0.5 / 0.75 / 1.25 /
2 and saved as JPEG quality 70 and 50; prints the share of copies within each radius and the
closest pair of crops from different photos. ELPV: hashing time per image, and per radius the
groups, the images in them, the largest group and the groups that mix labels. --smoke: 10
crops and ELPV's first 50 cells, to check the code runs.
"""

import argparse
import io
import time

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from pipeline.data.dedupe import groups_of, near_duplicate_pairs, perceptual_hash
from pipeline.data.sources import elpv_root

RADII = (0, 2, 4, 6, 8, 10)


def copies(n_crops: int) -> None:
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(1)
    crops, source = [], []
    for _ in range(n_crops):
        k = int(rng.integers(len(photos)))
        side = int(rng.integers(96, 300))
        width = int(side * rng.uniform(0.7, 1.4))
        x = int(rng.integers(0, photos[k].width - width))
        y = int(rng.integers(0, photos[k].height - side))
        crops.append(photos[k].crop((x, y, x + width, y + side)))
        source.append(k)
    hashes = np.array([perceptual_hash(c) for c in crops], dtype=np.uint64)
    moved = []
    for scale in (0.5, 0.75, 1.25, 2.0):
        for quality in (70, 50):
            for crop, h in zip(crops, hashes, strict=True):
                size = (max(8, round(crop.width * scale)), max(8, round(crop.height * scale)))
                buf = io.BytesIO()
                crop.resize(size, Image.Resampling.BILINEAR).save(buf, "JPEG", quality=quality)
                moved.append(bin(int(h) ^ perceptual_hash(Image.open(buf))).count("1"))
    moved = np.array(moved)
    print(
        f"copies ({len(moved)}): "
        + ", ".join(f"<= {r} bits {(moved <= r).mean():.1%}" for r in RADII)
    )
    source = np.array(source)
    bits = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    print(f"closest crops of different photos: {bits[source[:, None] != source].min()} bits")


def elpv(limit: int | None = None) -> None:
    root = elpv_root()
    rows = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line]
    rows = rows[:limit]
    images = [Image.open(root / path) for path, _, _ in rows]
    for image in images:
        image.load()
    start = time.process_time()
    hashes = np.array([perceptual_hash(image) for image in images], dtype=np.uint64)
    per_image = (time.process_time() - start) / len(images)
    print(f"ELPV: {len(images)} images, pHash {per_image * 1e3:.2f} ms of CPU each")
    label = np.array([float(p) for _, p, _ in rows])
    for radius in RADII:
        start = time.process_time()
        groups = groups_of(len(hashes), near_duplicate_pairs(hashes, radius))
        took = time.process_time() - start
        sizes = [len(g) for g in groups]
        mixed = sum(len(set(label[g])) > 1 for g in groups)
        print(
            f"  <= {radius} bits: {len(groups)} groups, {sum(sizes)} images, largest "
            f"{max(sizes, default=0)}, {mixed} mixing labels ({took:.2f} s to group)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=600)
    parser.add_argument("--smoke", action="store_true", help="10 crops, 50 ELPV cells")
    args = parser.parse_args()
    copies(10 if args.smoke else args.crops)
    elpv(50 if args.smoke else None)
