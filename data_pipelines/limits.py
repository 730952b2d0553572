"""Caps on what one hostile or broken input may cost, in one place.

Every reader of untrusted input checks these before it reads or decodes: a tar member's size
header, a text line or document, a Parquet read (by small record batches), an image's pixel count
(from its header, before decoding), a sidecar file (captions, ``_stats.json``, manifests), a
rendered chat template. Over a cap the sample is skipped and counted by reason, never read whole.

Walkers read regular files inside the input root only: symlinks (unless ``follow_symlinks``) and
anything not a regular file (FIFOs, devices, sockets) are skipped and counted without being opened.

The prepare commands set the caps from their flags (`data_pipelines.cli`, ``--max-member-bytes``
etc.) with `configure`; worker processes inherit them (fork). Library callers get the defaults, or
call `configure` themselves. Reason names: `TOO_LARGE`, `LINE_TOO_LONG`, `TOO_MANY_PIXELS`,
`SYMLINK`, `NOT_REGULAR`, `OUTSIDE_ROOT`, `TEMPLATE_TOO_LONG`.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20

# A tar member (image, caption, json) of an input or a training shard.
MAX_MEMBER_BYTES = 64 * MIB
# A text document (a .txt file) or one line of JSON lines, in bytes, decompressed.
MAX_DOCUMENT_BYTES = 64 * MIB
# Pixels of one image (width x height, from the header): Pillow's own warning threshold
# (PIL.Image.MAX_IMAGE_PIXELS, ~89.5 M, a 9459 x 9459 picture); decoding one costs ~270 MB as RGB.
MAX_IMAGE_PIXELS = 89_478_485
# A sidecar read whole: a caption .txt, a metadata .json, an img2dataset _stats.json, a manifest.
MAX_SIDECAR_BYTES = 64 * MIB
# Characters of one rendered chat conversation.
MAX_TEMPLATE_CHARS = 16 * MIB
# Rows per Parquet record batch: a batch of huge cells is still one batch.
PARQUET_BATCH_ROWS = 64

TOO_LARGE = "too_large"
LINE_TOO_LONG = "line_too_long"
TOO_MANY_PIXELS = "too_many_pixels"
SYMLINK = "symlink"
NOT_REGULAR = "not_regular_file"
OUTSIDE_ROOT = "outside_root"
TEMPLATE_TOO_LONG = "chat_template_too_long"


@dataclass(frozen=True)
class Limits:
    max_member_bytes: int = MAX_MEMBER_BYTES
    max_document_bytes: int = MAX_DOCUMENT_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_sidecar_bytes: int = MAX_SIDECAR_BYTES
    max_template_chars: int = MAX_TEMPLATE_CHARS
    follow_symlinks: bool = False

    def problems(self) -> list[str]:
        return [
            f"--{f.name.replace('_', '-')} must be >= 1"
            for f in dataclasses.fields(self)
            if f.type in ("int", int) and getattr(self, f.name) < 1
        ]


_current = Limits()


def current() -> Limits:
    """The caps in force in this process."""
    return _current


def configure(limits: Limits | None = None, **changes: object) -> Limits:
    """Set the caps of this process (``limits``, or the current ones with ``changes``); returns
    the previous ones, so a caller can restore them."""
    global _current
    previous = _current
    _current = dataclasses.replace(limits or _current, **changes)  # type: ignore[arg-type]
    return previous


class TooLarge(ValueError):
    """Input over a cap; ``reason`` is the counter name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Files


def file_problem(path: Path, root: Path | None = None, follow_symlinks: bool | None = None) -> tuple[str, str] | None:
    """(reason, detail) when `path` must not be read: a symlink (unless following them), not a
    regular file (a FIFO, a device: never opened), or (with `root`) resolving outside `root`.
    None for a regular file that may be read; FileNotFoundError for none (a dangling symlink
    followed). Never blocks: only lstat/stat."""
    follow = _current.follow_symlinks if follow_symlinks is None else follow_symlinks
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if not follow:
                return SYMLINK, f"{path} is a symbolic link (pass --follow-symlinks to read it)"
            st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        return "unreadable", f"{path}: {exc}"
    if not stat.S_ISREG(st.st_mode):
        return NOT_REGULAR, f"{path} is not a regular file"
    if root is not None and not follow:
        real, base = os.path.realpath(path), os.path.realpath(root)
        if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
            return OUTSIDE_ROOT, f"{path} resolves outside {root}"
    return None


def read_capped(path: Path | str, limit: int) -> bytes:
    """A file's bytes, refusing (`TooLarge`) one over `limit` bytes without reading past it."""
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(TOO_LARGE, f"{path} is over {limit:,} bytes")
    return data


def read_regular(path: Path | str, limit: int, root: Path | None = None) -> bytes:
    """`read_capped` of a regular file only: `TooLarge` with the `file_problem` reason else."""
    problem = file_problem(Path(path), root)
    if problem is not None:
        raise TooLarge(*problem)
    return read_capped(path, limit)


def readline_capped(handle, limit: int) -> tuple[bytes, bool]:
    """(line, too_long) of a binary handle: reads at most `limit` + 1 bytes at a time, and of a
    longer line discards the rest in bounded chunks, returning (b"", True). b"", False at EOF."""
    line = handle.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, False
    while (chunk := handle.readline(MIB)) and not chunk.endswith(b"\n"):
        pass
    return b"", True
