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


def epoch_coverage(name: str, num_shards: int, ranks: int, workers: int, resampled: bool = False) -> str | None:
    """How an epoch of a source's shards is covered by ranks x workers reading slots (see
    `epoch_shards`), in words, where it is not simply "each slot reads as many shards"; None
    where it is (or where there is no epoch: shards drawn with replacement)."""
    slots = ranks * max(1, workers)
    where = f"{name}: {num_shards} shard(s) for {slots} reading slots ({ranks} rank(s) x {max(1, workers)} worker(s))"
    if resampled or num_shards == 0 or num_shards % slots == 0:
        return None
    if num_shards < slots:
        return (
            f"{where}: every slot reads every shard and keeps one sample in {slots}, so each sample is trained "
            f"once an epoch but each shard is read {slots} times; {slots} or more shards are read once each"
        )
    per, extra = divmod(num_shards, slots)
    return (
        f"{where}: {_span(0, extra - 1)} {per + 1} shards an epoch and {_span(extra, slots - 1)} {per} "
        f"(slot = rank x {max(1, workers)} + worker). Every rank draws as many batches, so the slots with fewer "
        "shards start the next epoch (reshuffled) while the others finish this one: no shard is read twice "
        f"within its epoch, but epochs overlap by up to a shard per slot; a multiple of {slots} shards of equal "
        "size (or data.resampled) avoids it"
    )


def _span(first: int, last: int) -> str:
    return f"slot {first} reads" if first == last else f"slots {first}-{last} read"


def fresh_cursor() -> dict:
    """A slot's position in a source before it reads anything (see `EpochStream`)."""
    return {"epoch": 0, "shard": 0, "offset": 0, "kept": 0, "emitted": 0}
