"""The perceptual hash and the near-duplicate grouping on real images and hashes."""

import io

import numpy as np
from PIL import Image
from scipy.fft import dctn

from pipeline.data.dedupe import HASH_INPUT, groups_of, near_duplicate_pairs, perceptual_hash


def _photo(seed, size=(120, 90)):
    """Smooth random blobs (a photo-like spectrum) rather than white noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _bits(a, b):
    return bin(a ^ b).count("1")


def test_hash_is_the_dct_phash():
    """On a 32 x 32 grey image (no resampling) it is imagehash's phash: the 8 x 8 lowest
    DCT-II frequencies above their median, first row first."""
    pixels = np.asarray(_photo(0, (HASH_INPUT, HASH_INPUT)).convert("L"), dtype=np.float64)
    low = dctn(pixels, type=2)[:8, :8]
    expected = int("".join("1" if b else "0" for b in (low > np.median(low)).ravel()), 2)
    assert perceptual_hash(Image.fromarray(pixels.astype(np.uint8), "L")) == expected


def test_resized_and_reencoded_copy_stays_close_and_other_images_do_not():
    original = _photo(1, (300, 200))
    buf = io.BytesIO()
    original.resize((200, 133), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=70)
    copy = Image.open(io.BytesIO(buf.getvalue()))
    h = perceptual_hash(original)
    assert _bits(h, perceptual_hash(copy)) <= 4
    assert _bits(h, perceptual_hash(original.convert("L"))) <= 2  # colour dropped
    assert all(_bits(h, perceptual_hash(_photo(s, (300, 200)))) > 10 for s in range(2, 12))


def test_pairs_are_every_close_pair_once_across_blocks():
    """3000 hashes span several blocks of the pairwise comparison; brute force agrees."""
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 3000, dtype=np.uint64) * np.uint64(2)
    hashes[2500] = hashes[7] ^ np.uint64(0b1011)  # 3 bits from row 7, far apart in the order
    hashes[1400] = hashes[1399] ^ np.uint64(1 << 63)
    pairs = near_duplicate_pairs(hashes, 3)
    bits = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(bits <= 3, k=1))
    assert sorted(map(tuple, pairs.tolist())) == sorted(zip(i.tolist(), j.tolist(), strict=True))
    assert {(7, 2500), (1399, 1400)} <= set(map(tuple, pairs.tolist()))
    assert len(near_duplicate_pairs(hashes[:1], 3)) == 0


def test_groups_are_connected_components():
    pairs = np.array([[5, 1], [3, 5], [7, 8]])
    assert groups_of(10, pairs) == [[1, 3, 5], [7, 8]]
    assert groups_of(3, np.empty((0, 2), dtype=np.int64)) == []
