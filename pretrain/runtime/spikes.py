"""Loss spikes and skipped data: the rule that calls a step's loss a spike (pure), and the run's
ledger of the data it skipped, which outlives any one checkpoint.

The rule. Every rank computes the loss of its own micro-batches; a step is judged on the highest
of them, so a spike on one rank cannot hide in the mean. The reference is robust: the median of
the last ``window`` judged steps' values and their median absolute deviation (MAD), which one
spike cannot move. A value above ``median + threshold x sigma`` is a spike, with sigma = 1.4826 x
MAD (the standard deviation, for Gaussian noise) but at least 1% of the median, so that a window
of near-equal losses does not turn rounding into a spike. Spikes are kept out of the window. All
ranks see the same values and run the same arithmetic, so they reach the same verdict.

The ledger. A rewind skips data that no checkpoint before it knows about: if the run dies before
its next checkpoint, the resume starts from that older checkpoint and would read the bad data
again. So every skipped range is also written to ``RUN/skipped-data.json`` (atomically, by rank 0)
the moment it is decided, and a resume merges the ledger's ranges into the data position it loads.
Ranges are data-stream positions (micro-batches of each rank's stream, in the numbering of the
stream segment they belong to), not step numbers: a change of gradient accumulation or world size
does not change what they name (see `data_pipelines.loader.train_stream.TrainStream`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from statistics import median
from typing import Any

from pretrain.run.feature import Feature, RunContext

LEDGER = "skipped-data.json"
SPIKES_EXIT = 76  # the run met more loss spikes than training.loss_spike.max_rewinds allows
MIN_WINDOW = 5  # fewer judged steps than this say nothing about the noise


def spike_limit(window: list[float], threshold: float) -> float | None:
    """The loss above which a step is a spike, from the window of recent judged values (None while
    the window is too short to say)."""
    if len(window) < MIN_WINDOW:
        return None
    mid = median(window)
    mad = median(abs(x - mid) for x in window)
    sigma = max(1.4826 * mad, 0.01 * abs(mid))
    return mid + threshold * sigma


class SpikeDetector:
    """The running reference of ``training.loss_spike``; its state travels with the run's counters
    (``window``, ``seen``), so that a resumed run judges exactly as the uninterrupted one."""

    def __init__(self, cfg: Any, window: list[float] | None = None, seen: int = 0):
        self.cfg = cfg
        self.window = list(window or [])[-cfg.window :]
        self.seen = seen

    def limit(self) -> float | None:
        """The limit the next step is judged against (None: not judging yet)."""
        if self.seen < self.cfg.min_steps:
            return None
        return spike_limit(self.window, self.cfg.threshold)

    def judge(self, step: int, rank_losses: list[float]) -> dict[str, Any] | None:
        """The step's verdict from every rank's loss: the spike (for the log and the action), or
        None, in which case the step's highest loss joins the window."""
        finite = [(v, r) for r, v in enumerate(rank_losses) if v == v and abs(v) != float("inf")]
        if not finite:  # a non-finite step is the non-finite rules' business
            return None
        value, rank = max(finite)
        limit = self.limit()
        if limit is not None and value > limit:
            return {
                "step": step,
                "event": "loss_spike",
                "loss_max": value,
                "rank": rank,
                "limit": limit,
                "median": median(self.window),
                "action": self.cfg.action,
            }
        self.seen += 1
        self.window = [*self.window, value][-self.cfg.window :]
        return None


def same_range(a: dict, b: dict) -> bool:
    return all(int(a[k]) == int(b[k]) for k in ("segment", "first", "last"))


class SkipLedger:
    """``RUN/skipped-data.json``: every data range the run skipped (rewinds and skip_steps) and its
    rewinds, in the order they happened. Every rank reads it; rank 0 writes it."""

    def __init__(self, run_dir: Path, write: bool):
        self.path = Path(run_dir) / LEDGER
        self.write = write
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.ranges: list[dict] = list(data.get("ranges", []))
        self.rewinds: list[dict] = list(data.get("rewinds", []))

    def reset(self) -> None:
        """A run started afresh (not resumed): an earlier run's ledger does not describe its data."""
        self.ranges, self.rewinds = [], []
        if self.write:
            self.path.unlink(missing_ok=True)

    def add(self, data_range: dict, rewind: dict | None = None) -> None:
        if not any(same_range(data_range, r) for r in self.ranges):
            self.ranges.append(dict(data_range))
        if rewind is not None:
            self.rewinds.append(dict(rewind))
        if self.write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with open(tmp, "w") as f:
                f.write(json.dumps({"ranges": self.ranges, "rewinds": self.rewinds}, indent=2))
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)

    def lr_lowered(self, step: int) -> tuple[float, int] | None:
        """(factor, last step) of the LR lowering a rewind asked for that is still on at ``step``."""
        for r in reversed(self.rewinds):
            if r.get("lr_steps") and int(r["spike_step"]) < step <= int(r["lr_until"]):
                return float(r["lr_factor"]), int(r["lr_until"])
        return None


class LossSpikeRules(Feature):
    """``training.loss_spike`` and ``skip_steps``: what this run's optimizer can do with them."""

    name = "loss spikes"

    def problems(self, ctx: RunContext) -> list[str]:
        spike, found = ctx.recipe.training.loss_spike, []
        if ctx.recipe.task == "classify" and (ctx.recipe.training.skip_steps or (spike and spike.action == "rewind")):
            found.append(
                "training.skip_steps / loss_spike.action rewind: the labelled-folder stream of task classify keeps no "
                "data position to skip in; use loss_spike.action warn or skip"
            )
        if spike is not None and spike.action == "skip" and ctx.deepspeed is not None and ctx.zero_stage == 0:
            found.append(
                "training.loss_spike.action: skip drops a step's update by making its gradient non-finite, which only "
                "ZeRO stages 1-3 refuse to apply; this run uses ZeRO-0: use action rewind or warn, or ZeRO stage 1"
            )
        return found
