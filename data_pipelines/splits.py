"""Deterministic train/val/test assignment from a stable hash of a sample's content or key."""

from __future__ import annotations

import hashlib

SPLITS: tuple[str, ...] = ("train", "val", "test")

# 8 bytes of digest give 2**64 buckets: far finer than any fraction a user can ask for.
_DIGEST_BYTES = 8
_SCALE = float(2 ** (8 * _DIGEST_BYTES))


def validate_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ValueError unless both fractions are in [0, 1) and leave room for a train split."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 so that train is not empty, "
            f"got {val_fraction!r} + {test_fraction!r}"
        )


def split_hash(key: bytes, seed: int) -> float:
    """Map (seed, key) to a uniform float in [0, 1); stable across processes, runs and platforms.

    Python's hash() is salted per process, so a cryptographic hash is used instead.
    The seed is a fixed-width prefix, so (seed, key) pairs never collide by concatenation.
    """
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    digest.update(seed.to_bytes(8, "little", signed=True))
    digest.update(key)
    return int.from_bytes(digest.digest(), "little") / _SCALE


def assign_split(key: bytes, val_fraction: float, test_fraction: float, seed: int) -> str:
    """Return "train", "val" or "test" for a key; equal keys always get the same split."""
    validate_fractions(val_fraction, test_fraction)
    u = split_hash(key, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"
