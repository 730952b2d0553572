"""Accounting for what could not be read: samples and shards skipped, counted by reason and
logged without flooding the log, and the counts that travel with every batch to the trainer.
"""

from __future__ import annotations

import logging
from collections import Counter

from data_pipelines.sources import FetchError
from data_pipelines.sources.redact import redact

logger = logging.getLogger("data_pipelines.loader")


def unreachable_count(want: int | None, read: int) -> int:
    """The samples an unreachable shard counts for: those of it not read, where its size is known;
    else 1 (the shard itself)."""
    return max(1, want - read) if want is not None else 1


class BadSample(ValueError):
    """A sample that cannot be trained on; ``reason`` is its counter name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class SkipLog:
    """Counts skipped samples and shards by reason and warns, naming the item.

    The first ``LOG_FIRST`` items of each reason are logged, then every ``LOG_EVERY``-th: dirty
    data must not flood the log any more than it may stall the run. Used as the webdataset
    handler: it never sleeps (webdataset's warn_and_continue sleeps 0.5 s per error).
    """

    LOG_FIRST, LOG_EVERY = 10, 1000

    def __init__(self, where: str = ""):
        self.where = where
        self.counts: Counter[str] = Counter()
        self._events: Counter[str] = Counter()
        self.examples: list[str] = []
        self.mute = 0  # > 0 while samples counted before (re-read to resume a stream) are read again

    def add(self, reason: str, detail: str, count: int = 1) -> None:
        """One event (a sample, or a shard that lost ``count`` samples); none while muted."""
        if self.mute:
            return
        detail = redact(detail)  # URLs in messages lose their passwords and signatures
        self.counts[reason] += count
        self._events[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{reason}: {detail}")
        n = self._events[reason]
        if n <= self.LOG_FIRST or n % self.LOG_EVERY == 0:
            logger.warning("%sskipped (%s, %d so far): %s", self.where, reason, self.counts[reason], detail)

    def stats(self, slot: int, read: int) -> dict:
        """The counters a batch carries to the trainer (DataLoader workers are other processes)."""
        return {"slot": slot, "read": read, "skipped": dict(self.counts)}

    def handler(self, exn: Exception) -> bool:
        if isinstance(exn, FetchError):  # read_samples without retries: still its own reason
            self.add("shard_unreachable", str(exn))
        else:
            self.add("bad_shard", f"{type(exn).__name__}: {exn}")
        return True
