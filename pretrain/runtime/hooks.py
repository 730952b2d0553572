"""Seams for watching or disturbing a run from outside the trainer.

The trainer calls these at fixed points; the base class does nothing. Tests pass a subclass
(`tests/faults.py`: NaN losses, NaN gradients, a stall inside a save, a per-sample trace) through
`pretrain.train.main(argv, hooks=...)`; the command line never builds one, and no production
module reads a fault switch from the environment.
"""

from __future__ import annotations

from pathlib import Path

import torch


class TrainerHooks:
    #: ask the data stream for per-sample ids ("epoch:shard:key"), which `on_batch` then receives
    sample_ids: bool = False

    def on_batch(self, step: int, rank: int, ids: list[str] | None) -> None:
        """A micro-batch was drawn for optimizer step ``step`` (1-based)."""

    def on_loss(self, step: int, micro: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of micro-batch ``micro`` of step ``step``, before the finiteness check and the
        backward pass; what it returns is used instead."""
        return loss

    def in_save(self, step: int, rank: int, tag_dir: Path) -> None:
        """This rank's checkpoint files are written, or handed to the background writer; the tag is not sealed yet."""

    def before_write(self, step: int, rank: int, path: Path) -> None:
        """The checkpoint writer (a background thread unless checkpoint.background is off) is about
        to write ``path`` of step ``step``'s checkpoint; an OSError raised here fails that write."""

    def on_evaluate(self, step: int, rank: int) -> None:
        """An evaluation of the model after step ``step`` begins."""

    def close(self) -> None:
        """The run is over (finished, stopped or preempted)."""
