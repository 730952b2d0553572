"""Who reads what: the readers of a world (slots), the shards each reads in an epoch, the seeds
of every draw and the cursor a slot keeps in a source.

Every choice is a pure function of (seed, epoch, rank, worker, position), so a stream is
reproducible and resumes from a small cursor.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass


def stable_seed(*parts: int | str) -> int:
    """A stable 64-bit seed from several parts (Python's hash() is salted per process)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True)
class Slot:
    """One reader: a (rank, worker) pair out of world_size x num_workers."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def epoch_shards(
    shards: list[str], slot: Slot, epoch: int, seed: int, resampled: bool = False
) -> tuple[list[str], bool]:
    """The shards this slot reads in an epoch, and whether it must also take every
    ``slot.count``-th sample of them (when there are fewer shards than slots)."""
    rng = random.Random(stable_seed(seed, "shards", epoch))
    if resampled:
        # Each slot draws its own shards with replacement: any shard count works for any world size.
        srng = random.Random(stable_seed(seed, "resample", epoch, slot.index))
        per_slot = max(1, len(shards) // slot.count)
        return [srng.choice(shards) for _ in range(per_slot)], False
    order = list(shards)
    rng.shuffle(order)
    if len(order) >= slot.count:
        return order[slot.index :: slot.count], False
    return order, True


def fresh_cursor() -> dict:
    """A slot's position in a source before it reads anything (see `EpochStream`)."""
    return {"epoch": 0, "shard": 0, "offset": 0, "kept": 0, "emitted": 0}
