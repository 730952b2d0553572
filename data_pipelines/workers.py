"""Worker processes for the prepare commands: an ordered map over a bounded window of tasks.

Both prepare commands send tasks (a batch of texts, a chunk of images) to a process pool and
consume the results in input order, so their output is the same for any worker count.
`Pool.imap` would read the whole input ahead into memory; this keeps a window in flight
instead: at least a few tasks per worker, and more while their input is small, meant to
keep the workers busy while the parent stalls (the first shard write imports webdataset, and
with it torch: about a second). On the 2-core VM this, with the import moved onto a thread
(`BackgroundImports`), did not change the 2-worker / 1-worker ratio of either prepare command
beyond noise (benchmarks/README.md): there the parent's import competes with the workers for
the same two cores.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

K = TypeVar("K")

MIN_TASKS_PER_WORKER = 4
MAX_TASKS_PER_WORKER = 64  # results wait in the window too: it must not grow without bound
# Input bytes per worker below which more tasks are sent: ~1-2 s of image or text work here.
WINDOW_BYTES_PER_WORKER = 64 << 20


def ordered_map(
    fn: Callable[[Any], Any],
    tasks: Iterable[tuple[K, Any, int]],
    workers: int,
    *,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    on_start: Callable[[], Any] | None = None,
    min_tasks: int = MIN_TASKS_PER_WORKER,
    max_tasks: int = MAX_TASKS_PER_WORKER,
    window_bytes: int = WINDOW_BYTES_PER_WORKER,
) -> Iterator[tuple[K, Any]]:
    """(key, fn(arg)) for every (key, arg, nbytes) of `tasks`, computed in `workers` processes
    and yielded in input order. In flight: `min_tasks` to `max_tasks` per worker, as many as
    keep their `nbytes` under `window_bytes` per worker. `on_start` is called once the
    processes exist (after the fork), to start work in the parent that overlaps theirs."""
    with multiprocessing.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        if on_start is not None:
            on_start()
        pending: deque[tuple[K, int, Any]] = deque()
        in_flight = 0
        for key, arg, nbytes in tasks:
            pending.append((key, nbytes, pool.apply_async(fn, (arg,))))
            in_flight += nbytes
            while len(pending) >= min_tasks * workers and (
                in_flight >= window_bytes * workers or len(pending) >= max_tasks * workers
            ):
                done, size, result = pending.popleft()
                in_flight -= size
                yield done, result.get()
        while pending:
            done, _, result = pending.popleft()
            yield done, result.get()


def import_shard_writer() -> None:
    """Import webdataset (and torch, which it imports: ~1 s here), as the first shard write would."""
    import webdataset

    del webdataset  # imported for its side effect: loaded for the first write


class BackgroundImports:
    """`steps` (imports, typically) run in order on a daemon thread from `start`, which a parent
    calls once its workers are forked, so that the work overlaps theirs instead of delaying the
    parent's next use of it. Never before a fork: a child forked while another thread holds an
    import lock can deadlock on its first import. A step that fails is left for the parent's
    own use of it to report. `join` leaves no thread behind (a no-op if never started)."""

    def __init__(self, *steps: Callable[[], Any]) -> None:
        self.steps = list(steps)
        self.thread: threading.Thread | None = None

    def _run(self) -> None:
        for step in self.steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - see the docstring
                pass

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="background-imports", daemon=True)
        self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
