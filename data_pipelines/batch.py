"""The micro-batch a training stream hands out."""

from __future__ import annotations

from typing import Any


class Batch(dict):
    """A micro-batch: its items are the model's inputs (tensors, by the names the model's forward
    takes); ``meta`` is the stream's bookkeeping, which is never fed to the model: ``stats`` (the
    reading slot's counters and position, travelling from DataLoader worker processes to the
    stream) and, when asked for, ``ids`` ("epoch:shard:key" of every row, for traces). A dict, so
    DataLoader workers pickle it and ``**batch`` calls the model; ``meta`` pickles with it."""

    def __init__(self, inputs: dict[str, Any] | None = None, meta: dict[str, Any] | None = None):
        super().__init__(inputs or {})
        self.meta = dict(meta or {})

    def __reduce__(self):
        return Batch, (dict(self), self.meta)
