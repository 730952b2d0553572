"""One rank of the chaos soak (`benchmarks/chaos.py`): `pretrain/train.py` with hooks that say where
the run is, so the driver can kill it at a chosen moment.

    deepspeed --num_gpus 2 benchmarks/chaos_worker.py MARKERS -- <pretrain/train.py arguments>

Each hook writes MARKERS/<phase>-rank<r> ("<pid> <step> <time>") as the phase begins: ``step`` (a
micro-batch drawn), ``save`` (this rank's checkpoint files handed over, before the seal), ``write``
(the checkpoint writer about to write a file), ``eval`` (an evaluation begins). Saves, writes and
evaluations then wait a moment, so that a kill aimed at them lands inside them. Nothing here
changes what is computed: the soak compares against an uninterrupted run through the same hooks.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # started as a script by the launcher
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from pretrain.runtime.hooks import TrainerHooks  # noqa: E402

LINGER = {"save": 0.4, "write": 0.15, "eval": 0.4}


class PhaseMarkers(TrainerHooks):
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _mark(self, phase: str, rank: int, step: int) -> None:
        tmp = self.folder / f".{phase}-rank{rank}.tmp"
        tmp.write_text(f"{os.getpid()} {step} {time.time()}")
        tmp.replace(self.folder / f"{phase}-rank{rank}")
        time.sleep(LINGER.get(phase, 0.0))

    def on_batch(self, step, rank, ids):
        self._mark("step", rank, step)

    def in_save(self, step, rank, tag_dir):
        self._mark("save", rank, step)

    def before_write(self, step, rank, path):
        self._mark("write", rank, step)

    def on_evaluate(self, step, rank):
        self._mark("eval", rank, step)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--")
    # the launcher puts --local_rank=N before the script's own arguments
    local = [a for a in argv[:split] if a.startswith("--local_rank")]
    folder = Path(next(a for a in argv[:split] if not a.startswith("--local_rank")))
    rest = [*argv[split + 1 :], *local]
    from pretrain.train import main as train_main

    return train_main(rest, hooks=PhaseMarkers(folder))


if __name__ == "__main__":
    sys.exit(main())
