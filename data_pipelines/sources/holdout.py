"""Hold-out: the fraction of raw sources' samples kept for evaluation, chosen by a stable hash of
the sample key, so that no held-out sample is ever trained on, whatever the world size, order or
resume.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipelines.splits import split_hash

# Fixed, not the training seed: a rerun with another --seed must hold out the same samples.
HOLDOUT_SEED = 0x5EED
AUTO_HOLDOUT = 0.01


def held_out(key: str, fraction: float) -> bool:
    """Whether the sample with this key is held out for evaluation (stable everywhere)."""
    return fraction > 0 and split_hash(key.encode("utf-8"), HOLDOUT_SEED) < fraction


@dataclass(frozen=True)
class KeyFilter:
    """Keeps the samples of ``urls`` whose key is (``want=True``) or is not held out; samples of
    other shards pass. A plain object so that DataLoader workers can unpickle it."""

    urls: frozenset
    fraction: float
    want: bool

    def __call__(self, sample: dict) -> bool:
        if sample.get("__url__") not in self.urls:
            return True
        return held_out(str(sample.get("__key__", "")), self.fraction) == self.want
