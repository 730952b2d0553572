"""Checkpoint files written in the background, and the seal that waits for every rank's writes.

`FileWriter` takes the place of DeepSpeed's checkpoint engine (``engine.checkpoint_engine``): its
``save(state_dict, path)`` copies the tensors to host memory (the only part a step waits for) and
hands the file to one writer thread per rank, which serialises it with ``torch.save`` through a
hashing file object (`ckpt_verify.HashingFile`), fsyncs it and records its size and SHA-256. With
``background`` off the same work runs in the caller, before the save returns.

`Saves` keeps the one save in flight. No collective ever runs in the writer thread: the step loop
asks (`Saves.poll`, one small all-reduce per step while a save is in flight) whether every rank's
writes ended; when they all did, rank 0 seals the tag (the files' checksums gathered from every
rank) and moves ``latest``, or, if a write failed on any rank, the tag is removed and the run stops
(``on_error`` "stop") or logs it and saves again next time ("continue"). `Saves.flush` waits.
"""

from __future__ import annotations

import copy
import errno
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.runtime.ckpt_verify import HashingFile, fsync_dir
from pretrain.runtime.state import TrainingStopped

# DeepSpeed's engine calls its checkpoint engine by duck typing (no isinstance check in 0.19.8), so the
# writer does not subclass DeepSpeed's CheckpointEngine: importing deepspeed here would print its accelerator
# line on stdout in every command that reads checkpoints (pretrain-eval --json, pretrain-ckpt verify --json).
_EngineBase = object


class Staging:
    """Host buffers for the copies of one save, kept for the next: the n-th tensor of a save is copied
    into the n-th buffer when its shape and dtype match (a save holds the same tensors in the same
    order every time). Filling warm buffers costs a memory copy; fresh ones (first-touch page faults)
    cost about 3x as much. A save reuses them only after the one before was written (`Saves.flush`).
    Costs host memory the size of one checkpoint of this rank, as torch.distributed.checkpoint's
    cached staging does. Pinned when the tensors are on a GPU, for fast copies from the device."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []
        self.next = 0

    def reset(self) -> None:
        self.next = 0

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        i, self.next = self.next, self.next + 1
        if i < len(self.buffers) and self.buffers[i].shape == t.shape and self.buffers[i].dtype == t.dtype:
            buf = self.buffers[i]
        else:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            if i < len(self.buffers):
                self.buffers[i] = buf
            else:
                self.buffers.append(buf)
        return buf.copy_(t, non_blocking=t.is_cuda)


def snapshot(obj: Any, staging: Staging | None = None) -> Any:
    """``obj`` with every tensor copied to host memory (into ``staging``'s buffers if given;
    containers rebuilt, their types kept), so that training may change the originals while the copy
    is written. Copies from a GPU may still be in flight: synchronise before reading them."""
    if isinstance(obj, torch.Tensor):
        return staging.copy(obj) if staging is not None else obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # dict, OrderedDict, defaultdict: same type and factory
        for k, v in obj.items():
            out[k] = snapshot(v, staging)
        return out
    if isinstance(obj, list):
        return [snapshot(v, staging) for v in obj]
    if isinstance(obj, tuple):
        items = [snapshot(v, staging) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def describe_error(path: str | Path, e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        name = errno.errorcode.get(e.errno, "")
        return f"{path}: [Errno {e.errno} {name}] {e.strerror}"
    return f"{path}: {type(e).__name__}: {e}"


@dataclass
class TagWrite:
    """One rank's writes of one tag."""

    tag_dir: Path
    step: int
    files: dict[str, dict] = field(default_factory=dict)  # relative path -> size and checksum
    error: str | None = None  # the first failed write: path, errno, message
    done: threading.Event = field(default_factory=threading.Event)


class FileWriter(_EngineBase):
    """DeepSpeed's checkpoint engine with writes in a thread (or inline) that hash and fsync."""

    def __init__(self, inner, rank: int, background: bool, before_write: Callable | None = None):
        self.inner, self.rank, self.background, self.before_write = inner, rank, background, before_write
        self.name = f"toolkit FileWriter ({'background' if background else 'synchronous'})"
        self.zipfile = getattr(inner, "zipfile_serialization", True)
        self.current: TagWrite | None = None
        self.staging = Staging()
        self._held: list[tuple] = []  # this tag's copies, handed to the thread together at `end`
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def __getattr__(self, name):  # anything else DeepSpeed asks of its engine
        inner = self.__dict__.get("inner")
        if inner is None:  # not built yet (a copy being made): no such attribute
            raise AttributeError(name)
        return getattr(inner, name)

    # -- the toolkit's calls
    def begin(self, tag_dir: Path, step: int) -> TagWrite:
        """A tag's files follow (the writes of the tag before it ended: `Saves.flush`)."""
        self.current = TagWrite(Path(tag_dir), step)
        self.staging.reset()
        return self.current

    def end(self) -> TagWrite:
        """No more files for the current tag: the thread writes them now (not during the copies, which
        it would slow), and sets ``done`` once they are all on disk."""
        write, self.current = self.current, None
        if self.background and torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies from the device have landed
        held, self._held = self._held, []
        for job in held:
            self._submit(*job)
        self._submit(write, None, None)
        return write

    # -- DeepSpeed's CheckpointEngine interface
    def create(self, info):
        return self.inner.create(info)

    def makedirs(self, path, exist_ok=False):
        return self.inner.makedirs(path, exist_ok=exist_ok)

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location=map_location)

    def commit(self, info):
        return True  # the toolkit seals once every rank's writes ended (`Saves`)

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self):
        return False

    def preserves_storage_sharing(self):
        return self.inner.preserves_storage_sharing()

    def cleanup(self):
        pass

    def save(self, state_dict, path: str):
        write = self.current
        if write is None:  # a save outside the toolkit's (none is made): write it plainly
            return self.inner.save(state_dict, path)
        if not self.background:
            self._submit(write, Path(path), state_dict)
        else:
            self._held.append((write, Path(path), snapshot(state_dict, self.staging)))

    # -- the writing
    def _submit(self, write: TagWrite, path: Path | None, obj) -> None:
        if not self.background:
            self._run(write, path, obj)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"checkpoint-writer-rank{self.rank}", daemon=True)
            self._thread.start()
        self._queue.put((write, path, obj))

    def _loop(self) -> None:
        while True:
            write, path, obj = self._queue.get()
            self._run(write, path, obj)
            del obj

    def _run(self, write: TagWrite, path: Path | None, obj) -> None:
        if path is None:  # the end of the tag
            if write.error is None:
                fsync_dir(write.tag_dir)
            write.done.set()
            return
        if write.error is not None:
            return
        try:
            if self.before_write is not None:
                self.before_write(write.step, self.rank, path)
            with open(path, "wb") as f:
                out = HashingFile(f)
                torch.save(obj, out, _use_new_zipfile_serialization=self.zipfile)
                f.flush()
                os.fsync(f.fileno())
            write.files[path.relative_to(write.tag_dir).as_posix()] = out.entry()
        except Exception as e:  # noqa: BLE001 - reported to every rank by the step loop, never raised here
            write.error = describe_error(path, e)


@dataclass
class Pending:
    write: TagWrite
    meta: dict  # the seal's fields, known when the save began
    started: float  # perf_counter at the save's start
    blocking: float  # seconds the step loop has waited for it so far


class Saves:
    """The save in flight on this rank, and its collective ending (see the module's docstring).
    ``seal(tag_dir, meta, files)`` is rank 0's: checksums of every rank's files in, seal written."""

    def __init__(
        self,
        *,
        rank: int,
        world: int,
        background: bool,
        on_error: str,
        seal: Callable[[Path, dict, dict], None],
        before_write: Callable | None = None,
    ):
        self.rank, self.world, self.background, self.on_error = rank, world, background, on_error
        self.seal, self.before_write = seal, before_write
        self.pending: Pending | None = None
        self.records: list[dict] = []  # metrics.jsonl events of ended saves, for the trainer to log
        self.device: Any = "cpu"

    def writer(self, engine) -> FileWriter:
        current = engine.checkpoint_engine
        if not isinstance(current, FileWriter) or current.background != self.background:
            inner = current.inner if isinstance(current, FileWriter) else current
            engine.checkpoint_engine = FileWriter(inner, self.rank, self.background, self.before_write)
            if isinstance(current, FileWriter):
                engine.checkpoint_engine.staging = current.staging  # warm buffers stay
        self.device = getattr(engine, "device", "cpu")  # NCCL reduces device tensors only
        return engine.checkpoint_engine

    def started(self, writer: FileWriter, meta: dict, started: float) -> None:
        """The engine's files and the rank's own are handed over: the save is in flight."""
        self.pending = Pending(writer.end(), meta, started, time.perf_counter() - started)
        if not self.background:
            self.flush()

    def take_records(self) -> list[dict]:
        out, self.records = self.records, []
        return out

    def poll(self) -> None:
        """Seal the save in flight if every rank's writes ended (collective while one is in flight)."""
        if self.pending is None:
            return
        if self._sum(0.0 if self.pending.write.done.is_set() else 1.0) == 0:
            self._end(time.perf_counter())

    def flush(self) -> None:
        """Wait for the save in flight and seal it, or fail it (collective)."""
        if self.pending is None:
            return
        waited = time.perf_counter()
        self.pending.write.done.wait()
        self._end(waited)
        self._barrier()  # the seal (or the removal) is visible to every rank when flush returns

    def _end(self, waited: float) -> None:
        p, self.pending = self.pending, None
        w = p.write
        tag = w.tag_dir.name
        if self._sum(1.0 if w.error else 0.0):
            errors = [e for e in self._gather(w.error and f"rank {self.rank}: could not write {w.error}") if e]
            message = "; ".join(errors)
            if self.rank == 0:
                shutil.rmtree(w.tag_dir, ignore_errors=True)  # never half-sealed; latest stays where it was
            self._barrier()
            if self.on_error == "stop":
                raise TrainingStopped(
                    f"checkpoint {w.tag_dir} failed: {message}. It was removed and the previous checkpoint is still "
                    "latest; checkpoint.on_error is 'stop' (set it to 'continue' to go on and save again next time)"
                )
            if self.rank == 0:
                print(f"warning: checkpoint {tag} failed ({message}); removed; saving again next time", flush=True)
            self.records.append(
                {"step": w.step, "event": "checkpoint_failed", "tag": tag, "error": message, "on_error": self.on_error}
            )
            return
        files: dict[str, dict] = {}
        for part in self._gather(w.files):
            files.update(part)
        if self.rank == 0:
            self.seal(w.tag_dir, p.meta, files)
        now = time.perf_counter()
        self.records.append(
            {
                "step": w.step,
                "event": "checkpoint",
                "tag": tag,
                "save_s": now - p.started,
                "save_blocking_s": p.blocking + (now - waited),
                "background": self.background,
            }
        )

    # -- collectives, in the step loop's thread only
    def _distributed(self) -> bool:
        import torch.distributed as dist

        return self.world > 1 and dist.is_initialized()

    def _sum(self, value: float) -> float:
        if not self._distributed():
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def _gather(self, obj) -> list:
        if not self._distributed():
            return [obj]
        import torch.distributed as dist

        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, obj)
        return everyone

    def _barrier(self) -> None:
        if self._distributed():
            import torch.distributed as dist

            dist.barrier()
