"""Mixing: the weighted sources a training stream draws from, and which source each sample of
a batch comes from.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from data_pipelines.loader.slots import stable_seed


@dataclass(frozen=True)
class StreamSource:
    """One source of a training stream: its shard URLs, the samples each shard holds where known
    (for the short-shard check and to step over a finished shard without opening it) and its
    weight in a mixture."""

    name: str
    shards: tuple[str, ...]
    counts: dict[str, int] | None = None
    weight: float = 1.0

    @classmethod
    def of(cls, spec) -> StreamSource:
        """From a StreamSource or a tuple (name, shard urls, counts, weight); counts: one per
        shard, a dict by url, or None."""
        if isinstance(spec, cls):
            return spec
        name, urls, counts, weight = spec
        urls = tuple(urls)
        if counts is not None and not isinstance(counts, dict):
            counts = dict(zip(urls, map(int, counts)))
        if not weight > 0:
            raise ValueError(f"source {name!r}: weight must be > 0 (got {weight})")
        return cls(str(name), urls, counts or None, float(weight))


def stream_sources(data, split: str) -> list[StreamSource]:
    """What a split is read from: a data object with weighted ``sources`` (data.sources:
    `data_pipelines.sources.SourceData`) gives one stream source per train source; anything else
    (a prepared folder) is one source, the split's shards."""
    many = data.sources
    if split == "train" and many:
        return [StreamSource(s.name, tuple(s.shards), dict(s.shard_samples) or None, float(s.weight)) for s in many]
    return [StreamSource(Path(str(data.root)).name or split, tuple(data.shards(split)), data.shard_samples(split))]


class SourceMix:
    """Draws the source of each sample of a batch in proportion to the weights, by a generator
    seeded by (seed, slot, batch); a single source needs no draw."""

    def __init__(self, weights: Sequence[float], seed: int):
        self.bounds = list(itertools.accumulate(weights))
        self.seed = seed

    def picker(self, slot: int, batch: int) -> Callable[[], int]:
        """The source index of each next sample of the slot's ``batch``-th batch."""
        n = len(self.bounds)
        if n == 1:
            return lambda: 0
        bounds = self.bounds
        draw = random.Random(stable_seed(self.seed, "mix", slot, batch)).random
        return lambda: min(bisect.bisect_right(bounds, draw() * bounds[-1]), n - 1)
