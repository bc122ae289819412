"""Near-duplicate detection: a DCT perceptual hash per image and groups within a Hamming radius.

`perceptual_hash` is the classic pHash (grey, 32x32, 2-D DCT, the 8x8 lowest frequencies
against their median), so a re-encoded, resized or re-saved copy keeps nearly every bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_INPUT = 32  # side of the grey thumbnail the DCT sees: 4x the 8x8 kept frequencies
_LOW = 8  # 8 x 8 lowest frequencies = 64 bits
_BLOCK = 1 << 22  # pairwise distances computed this many at a time (32 MB of uint64)


def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first ``k`` rows of the (unscaled) DCT-II matrix of size ``n``: (k, n) float64."""
    freq = np.arange(k)[:, None]
    return np.cos(np.pi * freq * (2 * np.arange(n)[None, :] + 1) / (2 * n))


_DCT = _dct_rows(HASH_INPUT, _LOW)


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit pHash of ``image`` (any size and mode) as an unsigned int.

    Bit (8r + c), most significant first, is set where DCT coefficient (r, c) exceeds the
    median of the 64 lowest-frequency coefficients (DC included), as in the `imagehash`
    library's `phash`.
    """
    grey = image.convert("L").resize(
        (HASH_INPUT, HASH_INPUT), Image.Resampling.LANCZOS, reducing_gap=2.0
    )
    pixels = np.asarray(grey, dtype=np.float64)
    low = _DCT @ pixels @ _DCT.T  # (8, 8)
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def near_duplicate_pairs(hashes: np.ndarray, max_bits: int) -> np.ndarray:
    """Index pairs (n_pairs, 2), i < j, whose hashes differ in at most ``max_bits`` bits.

    ``hashes``: (n,) uint64. All pairs are compared, vectorised in blocks of the upper
    triangle: a few thousand images take well under a second.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    found = []
    rows = max(1, _BLOCK // max(n, 1))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        bits = np.bitwise_count(hashes[start:stop, None] ^ hashes[None, start:])
        close = bits <= max_bits
        # keep j > i: column c of this block is image start + c
        close &= np.arange(start, n)[None, :] > np.arange(start, stop)[:, None]
        i, j = np.nonzero(close)
        found.append(np.stack([i + start, j + start], axis=1))
    return np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)


def groups_of(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components (union-find) of ``pairs`` over ``n`` items, singletons left out.

    Each group is sorted and the groups are ordered by their first member.
    """
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    for i, j in pairs.tolist():
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(root(i), []).append(i)
    return sorted((g for g in members.values() if len(g) > 1), key=lambda g: g[0])
