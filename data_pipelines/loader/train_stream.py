"""The stateful iterator a trainer pulls from: one rank's training batches, run in this process
or in DataLoader workers, and the position in them that a checkpoint saves and restores.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch

from data_pipelines.loader.stream import EpochStream


class TrainStream:
    """One rank's endless training batches, and where in them it is (an iterator with
    ``state_dict`` / ``load_state_dict``, the shape of torchdata's StatefulDataLoader).

    It runs an `EpochStream` in this process or in DataLoader workers and counts the batches it
    hands out. ``state_dict()`` is the whole position, a small dict of plain values:

        world, workers, micro   the layout it is read with (ranks, DataLoader workers, batch size)
        micro_batches           batches handed out in this layout
        data_history            earlier segments of the run that used other layouts
        sources                 the names of the sources mixed
        slots                   per slot (rank x worker) the state its last batch handed out carried:
                                a cursor per source, batches, samples read, skipped, taken per source
        skips                   data ranges read and not trained (loss-spike rewinds, skip_steps): each
                                {"segment", "first", "last", "steps", "at_step", "why"}, micro-batches
                                first..last of this rank's stream in segment ``segment`` (the index of
                                the layout in data_history; the current one is len(data_history))

    ``load_state_dict(state)``, before the first batch, continues exactly where ``state`` was.
    In the same layout each slot starts from its cursors (O(1) in the length of the run; see
    `EpochStream`) and the DataLoader's round-robin is rotated to start at the worker whose turn
    it was. States without cursors (older checkpoints, or a position inside the remainder after a
    change of layout) are replayed batch by batch. In any other layout (another world size,
    micro_batch_size or data.num_workers) the saved segment is closed and the unconsumed samples
    of the epochs it touched are re-divided among the new slots, so that within an epoch no sample
    is lost or repeated. Every rank may be given the same state (any rank's, as all ranks pull the
    same number of batches) when the world size changes.

    It also keeps the latest counters of each slot it reads (``counts()``, ``samples_by_source()``):
    DataLoader workers are other processes, so the counters travel inside the batches as ``_stats``.
    """

    def __init__(self, dataset: EpochStream, num_workers: int = 0):
        self.dataset, self.num_workers = dataset, num_workers
        self.micro_batches = 0
        self.skips: list[dict] = []
        self.slot_stats: dict[int, dict] = {}
        self._it: Iterator[dict] | None = None

    def coverage(self) -> list[str]:
        """How an epoch of each source is divided among the world's reading slots, where it is
        uneven (`data_pipelines.loader.slots.epoch_coverage`), for the log at start."""
        from data_pipelines.loader.slots import epoch_coverage

        d = self.dataset
        lines = (epoch_coverage(s.name, len(s.shards), d.world_size, d.num_workers, d.resampled) for s in d.sources)
        return [line for line in lines if line]

    def layout(self) -> dict[str, int]:
        return {"world": self.dataset.world_size, "workers": self.num_workers, "micro": self.dataset.batch_size}

    def state_dict(self) -> dict:
        return {
            **self.layout(),
            "micro_batches": self.micro_batches,
            "data_history": [dict(h) for h in self.dataset.history],
            "sources": self.dataset.source_names,
            "slots": {str(i): s for i, s in sorted(self.slot_stats.items())},
            "skips": [dict(r) for r in self.skips],
        }

    @property
    def segment(self) -> int:
        """The index of the current layout's segment in the run's data history."""
        return len(self.dataset.history)

    def add_skips(self, ranges: list[dict]) -> None:
        """Record ranges to skip (or already skipped), once each; call after ``load_state_dict``."""
        for r in ranges:
            if not any(all(int(r[k]) == int(q[k]) for k in ("segment", "first", "last")) for q in self.skips):
                self.skips.append(dict(r))

    def pending_skip(self, at_step: int) -> dict | None:
        """The recorded range that starts at this stream's next micro-batch and was decided for
        optimizer step ``at_step``, if any (a range a resume found in the run's ledger). Of ranges
        starting there (a second rewind to the same checkpoint covers the first's), the longest."""
        due = [
            r
            for r in self.skips
            if int(r["segment"]) == self.segment
            and int(r["first"]) == self.micro_batches + 1
            and int(r.get("at_step", at_step)) == at_step
        ]
        return max(due, key=lambda r: int(r["last"])) if due else None

    def skip(self, n: int) -> tuple[int, int]:
        """Read the next ``n`` micro-batches and drop them; (first, last), their numbers."""
        first = self.micro_batches + 1
        for _ in range(n):
            next(self)
        return first, self.micro_batches

    def load_state_dict(self, state: dict) -> None:
        if self._it is not None:
            raise RuntimeError("TrainStream.load_state_dict: the stream has already started")
        saved = {k: int(state[k]) for k in ("world", "workers", "micro")}
        names = state.get("sources")
        if names is not None and list(names) != self.dataset.source_names:
            raise ValueError(
                f"the data sources changed: the checkpoint read {list(names)}, this run reads "
                f"{self.dataset.source_names}; keep data.sources' names and order to resume"
            )
        history = [dict(h) for h in state.get("data_history", [])]
        pulled = int(state["micro_batches"])
        skips = [dict(r) for r in state.get("skips", [])]
        if _same_layout(saved, self.layout()):
            self.skips = skips
            self.dataset.set_history(history)
            slots = {int(k): v for k, v in (state.get("slots") or {}).items()}
            if pulled and slots and all(_resumable(s) for s in slots.values()):
                self.dataset.resume_from(slots, rotation=pulled % max(1, self.num_workers))
                self.micro_batches, self.slot_stats = pulled, dict(slots)
            else:
                for _ in range(pulled):  # replay the deterministic stream to the position
                    next(self)
        else:
            closed = {**saved, "micro_batches": pulled}
            # ranges of the closing segment not read yet are consumed with it: the re-division of its
            # epochs among the new slots leaves them out (`LayoutReplay._replay`)
            ahead = [
                [max(int(r["first"]), pulled + 1), int(r["last"])]
                for r in skips
                if int(r["segment"]) == len(history) and int(r["last"]) > pulled
            ]
            if ahead:
                closed["skipped"] = ahead
            self.dataset.set_history([*history, closed])
            self.micro_batches = 0
            self.skips = skips

    def counts(self) -> tuple[int, dict[str, int]]:
        """(samples read, skipped samples by reason) of this rank, over its slots."""
        read, skipped = 0, Counter()
        for stats in self.slot_stats.values():
            read += stats["read"]
            skipped.update(stats["skipped"])
        return read, dict(skipped)

    def samples_by_source(self) -> dict[str, int]:
        """Samples this rank consumed from each source so far (in the batches handed out)."""
        total: Counter[str] = Counter()
        for stats in self.slot_stats.values():
            total.update(stats.get("by_source", {}))
        return {name: total.get(name, 0) for name in self.dataset.source_names}

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._start()
        batch = self.dataset.finish(next(self._it))
        self.micro_batches += 1
        self.slot_stats[batch.meta["stats"]["slot"]] = batch.meta["stats"]
        return batch

    def _start(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return iter(self.dataset)
        return iter(
            torch.utils.data.DataLoader(
                self.dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=True, prefetch_factor=4
            )
        )


def _resumable(slot_state: dict) -> bool:
    cursors = slot_state.get("cursors")
    return cursors is not None and not any(c.get("remainder") for c in cursors)


def _same_layout(a: dict[str, int], b: dict[str, int]) -> bool:
    """One DataLoader worker reads what the rank itself would: workers 0 and 1 are the same layout."""
    return (a["world"], max(1, a["workers"]), a["micro"]) == (b["world"], max(1, b["workers"]), b["micro"])
