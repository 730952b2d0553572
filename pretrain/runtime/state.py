"""The run's counters (saved with every checkpoint) and the rules that judge a step: too much bad
data, too many non-finite steps; the exit code of a preempted run; one line per evaluation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class RunState:
    """The run's counters, saved with every checkpoint (the data position is the stream's own)."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    nonfinite_skips: int = 0
    loss_scale_overflows: int = 0  # fp16 steps the dynamic loss scale refused (normal; never stop a run)
    train_losses: list[float] = field(default_factory=list)  # each step's loss since the last eval
    train_loss_sum: float = 0.0  # item losses since the last eval, over ranks (TP/SP groups count theirs
    train_items: float = 0.0  # once per rank, in both sums alike): the train loss of the gap
    samples_skipped: int = 0  # samples of skipped steps (skip_steps, rewinds): read, never trained
    spike_skips: int = 0  # steps whose update a loss spike dropped (loss_spike.action skip)
    loss_window: list[float] = field(default_factory=list)  # the loss-spike reference (`SpikeDetector`)
    spike_seen: int = 0  # steps the spike detector has judged
    spike_layout: list[int] = field(default_factory=list)  # [ranks, micro, accumulation] the window was judged at

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> RunState:
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: a checkpoint was saved on SIGTERM/SIGUSR1; run the same command to continue


class TrainingStopped(RuntimeError):
    """The run cannot go on (too much bad data, non-finite losses); the message says where."""


def bad_data_verdict(read: int, bad: int, limit: float, first_bad: str) -> str | None:
    """Why the run must stop for bad data, or None. Judged only after 100 samples, so one bad
    sample among the first few does not end a run."""
    if read + bad >= 100 and bad / (read + bad) > limit:
        return (
            f"{int(bad)} of {int(read + bad)} samples read were bad (> data.max_bad_fraction={limit}); "
            f"first: {first_bad}"
        )
    return None


def count_skip(skips: int, on_nonfinite: str, max_skips: int, where: str, what: str = "skipped") -> int:
    """One more non-finite loss or gradient whose update was not applied: the new skip count, or
    TrainingStopped when the recipe says stop or the skips pass training.max_nonfinite_skips."""
    if on_nonfinite == "stop":
        raise TrainingStopped(f"{where}; training.on_nonfinite is 'stop'")
    skips += 1
    if skips > max_skips:
        raise TrainingStopped(f"{where}: {skips} {what} so far, more than training.max_nonfinite_skips={max_skips}")
    return skips


def refused_step(precision: str, refused: bool, nonfinite_losses: int, norm_finite: bool | None) -> str | None:
    """What a step that did not train normally was: "overflow" where fp16's loss scaler refused an
    update whose losses were finite (the scale was too high; it is lowered and the run goes on: a
    few while the scale settles, then about one per ``loss_scale_window`` steps, counted apart and
    never stopping a run); "nonfinite" for non-finite losses, or a non-finite gradient anywhere
    else (judged against training.on_nonfinite / max_nonfinite_skips); None for a normal step.
    A gradient that is non-finite at every scale ends in DeepSpeed's own stop at its minimum scale."""
    if nonfinite_losses:
        return "nonfinite"
    if refused and precision == "fp16":
        return "overflow"
    if refused or norm_finite is False:
        return "nonfinite"
    return None


def describe_eval(ev: dict[str, Any]) -> str:
    """One line for the console: the val loss, the family's headline metric, the gap."""
    if ev.get("loss") is None:
        return f"val: {ev.get('note', 'no loss')}"
    extra = ""
    if "perplexity" in ev:
        extra = f" (ppl {ev['perplexity']:.1f})"
    elif "top1" in ev:  # a classifier (task classify)
        extra = f", top-1 {ev['top1']:.3f} of {ev['num_classes']} classes"
    elif "zero_shot_top1" in ev:
        extra = f", zero-shot top-1 {ev['zero_shot_top1']:.3f} of {ev['num_classes']} classes"
    if "image_to_text_R@1" in ev:
        extra += f", i->t R@1 {ev['image_to_text_R@1']:.3f}"
    return f"val loss {ev['loss']:.4f}{extra}, train loss {ev['train_loss']:.4f}, gap {ev['gap']:+.4f}"
