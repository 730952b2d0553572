"""The training stream of one rank, shared by text and image-text data: each epoch's shards
divided among the world's slots, read from a cursor, shuffled in seeded blocks, mixed from
weighted sources and batched; endless and reproducible.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from data_pipelines.batch import Batch
from data_pipelines.loader.accounting import SkipLog, unreachable_count
from data_pipelines.loader.mixing import SourceMix, StreamSource, stream_sources
from data_pipelines.loader.prepared import PreparedShards
from data_pipelines.loader.replay import LayoutReplay, LedgerCache
from data_pipelines.loader.shard_io import ShardUnreachable, read_shard
from data_pipelines.loader.slots import Slot, epoch_shards, fresh_cursor, stable_seed
from data_pipelines.sources.transports import FetchPolicy


class EpochStream(torch.utils.data.IterableDataset, LayoutReplay):
    """The training stream of one rank, shared by text and image-text data; endless.

    Each epoch's shard list is shuffled with (seed, epoch), divided among the world's slots
    (rank x DataLoader worker; by sample when there are fewer shards than slots), read, shuffled
    in blocks and batched. Under a DataLoader with workers, DataLoader interleaves the workers'
    batches in a fixed round-robin, so the rank's stream stays deterministic.

    **Sources.** The stream draws from one or more sources (``sources``: `StreamSource`s or tuples
    (name, shard urls, counts, weight); default: the split's shards, or the data's own weighted
    ``sources``). Each source is read as above on its own; each sample of a batch comes from a
    source drawn in proportion to the weights by a generator seeded by (seed, slot, batch).

    **Shuffle.** Each source's samples are shuffled in blocks of ``shuffle_buffer``: a block is
    read, permuted by a generator seeded by (seed, slot, epoch, where the block starts) and handed
    out; blocks do not cross epochs. So the whole state of a slot in a source is a *cursor*: the
    epoch, the reading position where the current block began (shard in the slot's order, samples
    read in that shard, samples of the epoch kept) and how many of the block's items are out.

    **Resume in O(1).** Every batch carries its slot's state (cursors, batches, counters) in
    ``_stats``; `TrainStream` keeps the latest per slot. Resuming a slot skips the shards before
    its cursor without opening them, re-reads its current shard up to the cursor and the block
    (at most one shard and ``shuffle_buffer`` samples), re-permutes it and drops the items already
    handed out: the same batches follow, whatever the length of the run. Samples re-read this way
    are not counted or warned about twice. Augmentation draws come from a generator per (slot, batch).

    ``history`` lists earlier segments of the same run that used other layouts (world size,
    micro-batch size, worker count), oldest first, each ``{"world", "workers", "micro",
    "micro_batches"}`` (micro-batches pulled per rank). The stream then starts with the
    *remainder*: every sample of the epochs those segments touched that they did not consume,
    re-divided among this world's slots, and goes on from the next epoch. Within an epoch no
    sample is lost or repeated across a change of layout. Finding the consumed samples replays
    the earlier segments: a change of layout costs O(samples seen) once (the positions of the
    other layout's slots do not say which samples of their blocks this world's slots may take), and so
    does a resume that lands inside the remainder; later resumes are O(1) again.
    With ``trace`` each batch carries ``_ids``: "epoch:shard:key" of its samples.

    Subclasses say how a raw sample is decoded (``decode``: None to skip it, after logging),
    whether that happens before the shuffle (``DECODE_EARLY``: small decoded items) or after it
    (compressed images are cheaper to hold), and how items become a batch (``collate``).
    """

    DECODE_EARLY = True

    def __init__(
        self,
        data: PreparedShards,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        num_workers: int = 0,
        history: Sequence[dict] = (),
        trace: bool = False,
        sources: Sequence | None = None,
    ):
        super().__init__()
        self.data, self.split = data, split
        self.sources = [StreamSource.of(s) for s in sources] if sources else stream_sources(data, split)
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must differ: {names}")
        self.shards = [u for s in self.sources for u in s.shards]
        empty = [s.name for s in self.sources if not s.shards]
        if empty:
            raise ValueError(
                f"{data.root}: split {split!r} has no shards" + (f" (source {empty[0]})" if sources else "")
            )
        self._source_of = {u: k for k, s in enumerate(self.sources) for u in s.shards}
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.buffer, self.resampled = seed, shuffle_buffer, resampled
        self.num_workers = max(1, num_workers)
        self.set_history(history)
        self.trace = trace
        self.expected = data.shard_samples(split)
        self.keep = data.keep(split)
        # retries and timeout of shard fetches: the data object's (data.fetch_* of the recipe), else the defaults
        self.fetch = data.fetch or FetchPolicy()
        self.skips = SkipLog(f"rank {rank}: ")
        self.samples_read = 0
        self.io: Counter[str] = Counter()  # shards opened and raw samples read by this process (resume cost)
        self.rotation = 0  # DataLoader worker w plays slot (w + rotation) % workers: a resume continues the round-robin
        self._resume: dict[int, dict] = {}
        self._decoded = [0] * len(self.sources)
        self._ledger_cache = LedgerCache()

    def set_history(self, history: Sequence[dict]) -> None:
        """Earlier segments of the run read with other layouts (see the class docstring)."""
        if history and self.resampled:
            raise ValueError(
                "data.resampled draws shards with replacement: there is no epoch position to re-divide "
                "when the world size, micro_batch_size or data.num_workers changes"
            )
        self.history = [dict(h) for h in history]

    def resume_from(self, slots: dict[int, dict], rotation: int = 0) -> None:
        """Continue each slot from its saved state (``_stats`` of its last batch handed out)."""
        self._resume = {int(k): dict(v) for k, v in slots.items()}
        self.rotation = rotation

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    # -- what a subclass provides
    def decode(self, sample: dict):
        raise NotImplementedError

    def collate(self, items: list, state) -> dict:
        raise NotImplementedError

    def finish(self, batch: dict) -> dict:
        """Last touches in the consuming process, after a batch left a DataLoader worker
        (the image stream normalises uint8 pixels here); by default none."""
        return batch

    def slot_state(self, slot: Slot, batch: int):
        """State for collating a slot's ``batch``-th batch (e.g. the augmentation generator)."""
        return None

    def replica(
        self, batch_size: int, rank: int, world_size: int, num_workers: int, history: Sequence[dict]
    ) -> EpochStream:
        """The same stream as another world had it (for replaying earlier segments)."""
        raise NotImplementedError

    # -- the shared machinery
    def _slot(self) -> Slot:
        info = torch.utils.data.get_worker_info()
        worker = (info.id + self.rotation) % self.num_workers if info is not None else 0
        return Slot(self.rank, self.world_size, worker, self.num_workers)

    def _source_seed(self, k: int) -> int:
        # One source keeps the run's seed, so a plain run reads its shards as it always has.
        return self.seed if len(self.sources) == 1 else stable_seed(self.seed, "source", self.sources[k].name)

    def _read(
        self,
        k: int,
        urls: list[str],
        by_sample: bool,
        slot: Slot,
        epoch: int,
        shard: int = 0,
        offset: int = 0,
        kept: int = 0,
        cut: Sequence[Sequence[int]] = (),
    ) -> Iterator[tuple[tuple[int, int, int], tuple, dict]]:
        """(position after it, ident, raw sample) of the samples this slot takes from ``urls``, read
        from the position (shard, offset, kept): shards before ``shard`` are not opened, the first
        ``offset`` samples of ``shard`` are read and dropped quietly (a tar stream cannot be entered in
        the middle; they were counted when first read). ``kept`` counts the epoch's samples that
        passed the split's filter, by which slots share shards when there are fewer shards than slots.

        A shard that cannot be fetched after ``data.fetch_retries`` retries (`read_shard`) is counted
        ("shard_unreachable") and passed over: a *marker* (position after the shard, None, (shard,
        samples read of it)) follows its samples, so that a cursor moves past it. ``cut`` lists such
        (shard, samples) pairs found when a block now being rebuilt was first read: those shards are
        read to that many samples and passed over again, without fetching more or counting again."""
        log, src = self.skips, self.sources[k]
        cuts = {int(i): int(n) for i, n in cut}
        for i in range(shard, len(urls)):
            url = urls[i]
            skip = offset if i == shard else 0
            self.io["shards_opened"] += 1
            n = 0
            gone = None
            if skip:
                log.mute += 1
            try:
                for sample in read_shard(url, log, self.fetch, cuts.get(i)):
                    n += 1
                    self.io["raw_samples"] += 1
                    if skip:
                        if n == skip:
                            skip = 0
                            log.mute -= 1
                        continue
                    if self.keep is not None and not self.keep(sample):
                        continue
                    index, kept = kept, kept + 1
                    if by_sample and index % slot.count != slot.index:
                        continue
                    yield (i, n, kept), self._ident(epoch, sample), sample
            except ShardUnreachable as e:
                gone = e
            finally:
                if skip:
                    log.mute -= 1
            want = (src.counts or self.expected or {}).get(url)
            if gone is not None or i in cuts:
                if gone is not None:  # samples before offset were counted as read when first read
                    log.add(
                        "shard_unreachable",
                        str(gone),
                        count=unreachable_count(want, max(n, offset if i == shard else 0)),
                    )
                yield (i + 1, 0, kept), None, (i, n)
                continue
            if want is not None and n < want:
                log.add("short_shard", f"{url}: {n} of {want} samples (truncated?)", count=want - n)

    def _early(self, sample: dict):
        """The item the shuffle holds: decoded when DECODE_EARLY (None: a bad sample, skipped)."""
        if not self.DECODE_EARLY:
            return sample
        item = self.decode(sample)
        if item is not None and not self.skips.mute:
            self.samples_read += 1
        return item

    def samples(self, slot: Slot) -> Iterator[tuple[tuple, object]]:
        """(epoch, shard, key) and item of every sample this slot reads of the first source, in
        reading order, epoch after epoch (items decoded when DECODE_EARLY, raw otherwise)."""
        epoch = 0
        while True:
            urls, by_sample = epoch_shards(
                list(self.sources[0].shards), slot, epoch, self._source_seed(0), self.resampled
            )
            for _, ident, sample in self._read(0, urls, by_sample, slot, epoch):
                if ident is None:  # an unreachable shard passed over
                    continue
                item = self._early(sample)
                if item is not None:
                    yield ident, item
            epoch += 1

    def _source_items(self, k: int, slot: Slot, cur: dict) -> Iterator[tuple[tuple, object]]:
        """Endless (ident, item) of source k for this slot, block-shuffled. ``cur`` is the cursor
        (see the class docstring), kept current: after each item it says where the source is."""
        src, seed = self.sources[k], self._source_seed(k)
        size = max(1, self.buffer)
        mid_epoch = any(cur[f] for f in ("shard", "offset", "kept", "emitted"))
        while True:
            epoch = cur["epoch"]
            urls, by_sample = epoch_shards(list(src.shards), slot, epoch, seed, self.resampled)
            reader = self._read(
                k, urls, by_sample, slot, epoch, cur["shard"], cur["offset"], cur["kept"], cur.get("unreachable", ())
            )
            got, decoded = int(mid_epoch), self._decoded[k]
            while True:
                start = (cur["shard"], cur["offset"], cur["kept"])
                rebuild = cur["emitted"] > 0  # this block was read before the checkpoint: quietly
                block, end, gone = [], start, []
                self.skips.mute += rebuild
                try:
                    for end, ident, sample in reader:  # noqa: B007 - end is the cursor after the loop
                        if ident is None:  # an unreachable shard: the cursor of a resume must pass it too
                            gone.append(list(sample))
                            continue
                        item = self._early(sample)
                        if item is not None:
                            block.append((ident, item))
                            if len(block) == size:
                                break
                finally:
                    self.skips.mute -= rebuild
                if rebuild and len(block) <= cur["emitted"]:
                    raise RuntimeError(
                        f"cannot resume {src.name} at epoch {epoch}: the block at shard "
                        f"{urls[min(start[0], len(urls) - 1)]} holds {len(block)} samples now, "
                        f"{cur['emitted']}+ when saved (were the shards rewritten?)"
                    )
                if not block:
                    break
                if size > 1:
                    random.Random(stable_seed(seed, "block", slot.index, epoch, start[2])).shuffle(block)
                shard, offset, kept = end
                want = (src.counts or self.expected or {}).get(urls[shard]) if shard < len(urls) else None
                if want is not None and offset >= want:  # the shard is done: a resume need not open it
                    shard, offset = shard + 1, 0
                for j in range(cur["emitted"], len(block)):
                    if j + 1 == len(block):
                        cur.update(shard=shard, offset=offset, kept=kept, emitted=0)
                        cur.pop("unreachable", None)
                    else:
                        cur["emitted"] = j + 1
                        if gone:  # a resume inside this block rebuilds it passing over the same shards
                            cur["unreachable"] = gone
                    got += 1
                    yield block[j]
            if not self.DECODE_EARLY and not mid_epoch and got:
                # the consumer decodes each item before asking for the next: all of this epoch's are done
                got = self._decoded[k] - decoded
            if got == 0:
                raise RuntimeError(
                    f"rank {self.rank}: a whole epoch of {len(urls)} shard(s) of {src.name} gave no "
                    f"samples (skipped: {dict(self.skips.counts)}; first: {self.skips.examples[:3]}); "
                    "fewer samples than ranks x workers, or unreadable shards"
                )
            cur.update(fresh_cursor(), epoch=epoch + 1)
            mid_epoch = False

    @staticmethod
    def _ident(epoch: int, sample: dict) -> tuple:
        return epoch, sample.get("__url__"), sample.get("__key__")

    def _batches(self, slot: Slot) -> Iterator[tuple[list[tuple], list, int]]:
        """(idents, items, batch index) of this slot's batches; ``self.slot_stats`` is the slot's
        state after the batch last yielded."""
        saved = self._resume.get(slot.index)
        n = len(self.sources)
        if saved is not None:
            cursors = [dict(c) for c in saved["cursors"]]
            batch, by_source = int(saved["batches"]), [int(saved["by_source"].get(s.name, 0)) for s in self.sources]
            self.samples_read = int(saved["read"])
            self.skips.counts = Counter(saved["skipped"])
            streams = [self._source_items(k, slot, cursors[k]) for k in range(n)]
        else:
            cursors, batch, by_source = [fresh_cursor() for _ in range(n)], 0, [0] * n
            ledger = self._ledger() if self.history else None
            for c in cursors if ledger is not None else ():
                c["remainder"] = True  # now, not when first drawn from: a source may wait several batches
            streams = [
                self._source_items(k, slot, cursors[k])
                if ledger is None
                else self._with_remainder(k, slot, cursors[k], ledger)
                for k in range(n)
            ]
        mix = SourceMix([s.weight for s in self.sources], self.seed)
        self._decoded = [0] * n  # items of each source that decoded (the late-decoding streams' epoch check)
        while True:
            pick = mix.picker(slot.index, batch)
            ids, items, taken = [], [], []
            while len(items) < self.batch_size:
                k = pick()
                ident, item = self._next_item(k, streams[k])
                ids.append(ident)
                items.append(item)
                taken.append(k)
            for k in taken:
                by_source[k] += 1
            self.slot_stats = {
                "slot": slot.index,
                "read": self.samples_read,
                "skipped": dict(self.skips.counts),
                "batches": batch + 1,
                "by_source": dict(zip(self.source_names, by_source)),
                "cursors": [dict(c) for c in cursors],
            }
            yield ids, items, batch
            batch += 1

    # A drawn source keeps its draw until one of its samples decodes: drawing again would make a
    # source's share w(1 - bad) / sum w(1 - bad) instead of its weight's.
    MAX_UNDECODABLE_RUN = 10_000

    def _next_item(self, k: int, stream: Iterator[tuple[tuple, object]]) -> tuple[tuple, object]:
        """The next item of source ``k`` (decoded here for the streams that decode late), skipping
        and counting the undecodable ones; a source that yields nothing but undecodable samples for
        `MAX_UNDECODABLE_RUN` in a row stops the stream with its name."""
        for _ in range(self.MAX_UNDECODABLE_RUN):
            ident, item = next(stream)
            if self.DECODE_EARLY:
                return ident, item
            item = self.decode(item)
            if item is not None:
                self.samples_read += 1
                self._decoded[k] += 1
                return ident, item
        raise ValueError(
            f"source {self.sources[k].name!r}: {self.MAX_UNDECODABLE_RUN} samples in a row could not be decoded "
            f"(last: {ident[1]} key {ident[2]}); see the skip counts for why"
        )

    def _trace_id(self, ident: tuple) -> str:
        epoch, url, key = ident
        name = Path(url).name if url else "?"
        if len(self.sources) > 1:
            name = f"{self.sources[self._source_of[url]].name}/{name}"
        return f"{epoch}:{name}:{key}"

    def __iter__(self) -> Iterator[dict]:
        slot = self._slot()
        for ids, items, batch in self._batches(slot):
            # The slot's state and counters travel with the batch: DataLoader workers are other processes.
            out = Batch(self.collate(items, self.slot_state(slot, batch)), {"stats": self.slot_stats})
            if self.trace:
                out.meta["ids"] = [self._trace_id(i) for i in ids]
            yield out
