"""metrics.jsonl, TensorBoard and the trackers (wandb, MLflow): the same scalars, written by rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pretrain.runtime.trackers import Trackers


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity (at any depth) replaced by None: JSON has no NaN, and
    strict readers (jq, JavaScript, most languages' parsers) reject Python's bare ``NaN``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """json.dumps that writes null for a non-finite number and can never write a bare NaN."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


class MetricsLogger:
    """Appends one JSON object per call to RUN/metrics.jsonl and mirrors numbers to TensorBoard.

    Appending (not truncating) keeps the history of a resumed run in one file.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        append: bool = True,
        trackers: Trackers | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._trackers = trackers if enabled else None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a" if append else "w", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            if self._trackers is not None:  # after the truncation above: they read this file
                self._trackers.start()

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._fh.write(dumps(record) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            # events (a loss spike, a rewind, skipped data, a checkpoint) get their own curves, apart from train/
            prefix = record.get("split") or (f"events/{record['event']}" if record.get("event") else "train")
            for k, v in record.items():
                if k not in ("step", "split") and _number(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
                elif isinstance(v, dict):  # samples_by_source, data_skipped_by_reason: a curve per entry
                    for name, n in v.items():
                        if _number(n):
                            self._tb.add_scalar(f"{prefix}/{k}/{name}", n, step)
        if self._trackers is not None:  # the line is on disk (line-buffered); they take what is sealed
            self._trackers.pump()

    def close(self, finished: bool = False) -> None:
        """``finished``: the run reached its last step, so every line is final and goes to the trackers
        (otherwise only the lines up to the sealed checkpoint, which a resume keeps)."""
        if self.enabled:
            self._fh.close()
            if self._tb is not None:
                self._tb.close()
            if self._trackers is not None:
                self._trackers.close(finished)
                self._trackers = None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def rewind(run_dir: str | Path, step: int) -> int:
    """Before a resumed run logs again: keep the lines of steps <= ``step`` and move the later
    ones (logged after the checkpoint by the run that died) to metrics-discarded.jsonl, so
    metrics.jsonl reads as one uninterrupted run. A partial last line, which a kill -9 in the
    middle of a write leaves, is discarded too. Returns how many lines were moved."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    keep, drop = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            drop.append(line)
            continue
        (keep if int(record.get("step", 0)) <= step else drop).append(line)
    if drop:
        with (path.parent / "metrics-discarded.jsonl").open("a") as fh:
            fh.write("".join(d + "\n" for d in drop))
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)
    return len(drop)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
