"""Layout-change replay: after a change of world size, micro-batch size or worker count, the
samples the earlier segments of a run consumed are found by replaying them, and the rest of the
epochs they touched is re-divided among the new slots.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator

from data_pipelines.loader.slots import Slot, epoch_shards, fresh_cursor, stable_seed

Ledger = tuple[set, list[int]]


class LedgerCache:
    """The ledger of one run's history at a time, shared by a stream and the replicas it replays,
    so that each earlier segment is replayed once. It pickles as a fresh, empty cache: a DataLoader
    worker replays for itself."""

    def __init__(self) -> None:
        self._ledgers: dict[tuple, Ledger] = {}

    def get(self, key: tuple, replay: Callable[[], Ledger]) -> Ledger:
        if key not in self._ledgers:
            self._ledgers.clear()  # one run's history at a time
            self._ledgers[key] = replay()
        return self._ledgers[key]

    def __reduce__(self):
        return LedgerCache, ()


class LayoutReplay:
    """The part of `EpochStream` that starts a stream after a change of layout (``history``; see
    its docstring): mixed into it, and using its reading, shuffling and batching."""

    def _with_remainder(self, k: int, slot: Slot, cur: dict, ledger: Ledger) -> Iterator[tuple[tuple, object]]:
        """Source k after a change of layout: the unconsumed rest of the epochs the earlier segments
        touched (shuffled in blocks too), then the source from the next epoch on. The cursor says
        "remainder" meanwhile: such a position is resumed by replaying."""
        consumed, last_epoch = ledger
        cur["remainder"] = True
        size, block, n = max(1, self.buffer), [], 0
        for item in self._remainder(k, slot, consumed, last_epoch[k]):
            block.append(item)
            if len(block) == size:
                random.Random(stable_seed(self._source_seed(k), "remainder", slot.index, n)).shuffle(block)
                yield from block
                block, n = [], n + 1
        random.Random(stable_seed(self._source_seed(k), "remainder", slot.index, n)).shuffle(block)
        yield from block
        cur.update(fresh_cursor(), epoch=last_epoch[k] + 1)
        cur.pop("remainder")
        yield from self._source_items(k, slot, cur)

    def _remainder(self, k: int, slot: Slot, consumed: set, last_epoch: int) -> Iterator[tuple[tuple, object]]:
        """Epochs 0..last_epoch of source k without the consumed samples, divided among this world's slots."""
        for epoch in range(last_epoch + 1):
            order, _ = epoch_shards(list(self.sources[k].shards), Slot(), epoch, self._source_seed(k))
            by_shard = len(order) >= slot.count
            urls = order[slot.index :: slot.count] if by_shard else order
            left = (
                (ident, s)
                for _, ident, s in self._read(k, urls, False, Slot(), epoch)
                if ident is not None and ident not in consumed
            )
            for n, (ident, sample) in enumerate(left):
                if by_shard or n % slot.count == slot.index:
                    item = self._early(sample)
                    if item is not None:
                        yield ident, item

    def _ledger(self) -> Ledger:
        """The samples all earlier segments consumed, and the last epoch they touched per source."""
        sources = tuple((s.name, s.shards[0], len(s.shards), s.weight) for s in self.sources)
        key = (
            str(self.data.root),
            sources,
            self.split,
            self.seed,
            self.buffer,
            type(self).__name__,
            repr(self.history),
        )
        return self._ledger_cache.get(key, self._replay)

    def _replica(self, batch_size: int, rank: int, world_size: int, num_workers: int, history: list[dict]):
        """`replica`, sharing this stream's ledger cache: each earlier segment is replayed once."""
        old = self.replica(batch_size, rank, world_size, num_workers, history)
        old._ledger_cache = self._ledger_cache
        return old

    def _replay(self) -> Ledger:
        *earlier, last = self.history
        consumed: set = set()
        last_epoch = [-1] * len(self.sources)
        if earlier:
            before, last_epoch = self._replica(1, 0, 1, 0, earlier)._ledger()
            consumed |= before
            last_epoch = list(last_epoch)
        world, workers, micro = int(last["world"]), max(1, int(last["workers"])), int(last["micro"])
        pulled = int(last["micro_batches"])
        # ranges skipped ahead of the segment's position (a rewind's, not yet reached) count as consumed
        skipped = [(int(a), int(b)) for a, b in last.get("skipped", ())]
        end = max([pulled, *(b for _, b in skipped)])
        for rank in range(world):
            old = self._replica(micro, rank, world, workers, earlier)
            for worker in range(workers):
                taken = len(range(worker, end, workers))  # DataLoader round-robin: batch m from worker (m-1) % W
                for j, (ids, _, _) in enumerate(
                    itertools.islice(old._batches(Slot(rank, world, worker, workers)), taken)
                ):
                    m = j * workers + worker + 1
                    if m > pulled and not any(a <= m <= b for a, b in skipped):
                        continue
                    consumed.update(ids)
                    for epoch, url, _ in ids:
                        k = self._source_of[url]
                        last_epoch[k] = max(last_epoch[k], epoch)
        return consumed, last_epoch
