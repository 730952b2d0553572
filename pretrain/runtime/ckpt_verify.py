"""Checksums of a checkpoint's files, and their check before a load.

A tag's seal (``toolkit.json``) lists every file of the tag with its size and SHA-256 under
``files`` (relative paths), computed while the file was written (`pretrain.runtime.ckpt_writer`).
`verify_tag` reads them back; `verify_shared` splits the files over the ranks (collective) so that
each rank hashes a share and every rank gets the same verdict. A seal without ``files`` was written
by an older version: it is loadable but cannot be verified, and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

CHECKSUM = "sha256"
SEAL = "toolkit.json"  # = checkpoint.COMPLETE (that module imports this one)
NO_CHECKSUMS = "no checksums (sealed by an older version)"
DERIVED = ("universal",)  # folders made later from a sealed tag (DeepSpeed's universal form): not in the seal


class HashingFile:
    """A write-only file object that hashes and counts what goes through it."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, hashlib.new(CHECKSUM), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(memoryview(data).cast("B"))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def entry(self) -> dict:
        return {"size": self.size, CHECKSUM: self.hash.hexdigest()}


def file_entry(path: Path, chunk: int = 8 << 20) -> dict:
    """Size and checksum of a file on disk."""
    h, size = hashlib.new(CHECKSUM), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return {"size": size, CHECKSUM: h.hexdigest()}


def tag_files(tag_dir: Path) -> list[str]:
    """The files of a tag a seal covers (relative paths): all but the seal, temporary files and derived folders."""
    out = []
    for p in sorted(tag_dir.rglob("*")):
        rel = p.relative_to(tag_dir)
        if not p.is_file() or rel.parts[0] in DERIVED or p.name == SEAL or p.name.startswith("."):
            continue
        out.append(rel.as_posix())
    return out


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (the files just created in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Verdict:
    tag: Path
    ok: bool
    problems: list[str] = field(default_factory=list)  # one line per bad file, naming it
    files: int = 0  # files listed in the seal
    size: int = 0  # their bytes
    note: str | None = None  # NO_CHECKSUMS, or why the tag is no checkpoint

    @property
    def verified(self) -> bool:
        return self.ok and self.note is None

    def describe(self) -> str:
        if not self.ok:
            return "; ".join(self.problems)
        if self.note:
            return self.note
        return f"{self.files} files, {self.size / 1e6:,.1f} MB, {CHECKSUM} ok"


def read_seal(tag_dir: Path) -> dict | None:
    try:
        return json.loads((tag_dir / SEAL).read_text())
    except (OSError, ValueError):
        return None


def check_files(tag_dir: Path, files: dict[str, dict], share: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems with this share (``rank``, ``world``) of ``files``: missing, another size, another checksum."""
    rank, world = share
    problems = []
    for i, (rel, want) in enumerate(sorted(files.items())):
        if i % world != rank:
            continue
        p = tag_dir / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        size = p.stat().st_size
        if size != want["size"]:
            problems.append(f"{p}: {size} bytes where the seal says {want['size']} (truncated or overwritten)")
            continue
        got = file_entry(p)[CHECKSUM]
        if got != want[CHECKSUM]:
            seal_says = want[CHECKSUM][:16]
            problems.append(f"{p}: {CHECKSUM} {got[:16]}... differs from the seal's {seal_says}... (corrupted)")
    return problems


def verify_tag(tag_dir: Path, share: tuple[int, int] = (0, 1)) -> Verdict:
    """The verdict on one tag (only this share of its files hashed; see `verify_shared`)."""
    tag_dir = Path(tag_dir)
    seal = read_seal(tag_dir)
    if seal is None:
        note = f"{tag_dir}: not sealed (no readable {SEAL}): not a checkpoint"
        return Verdict(tag_dir, False, [note], note=note)
    files = seal.get("files")
    if files is None:
        return Verdict(tag_dir, True, note=NO_CHECKSUMS)
    problems = check_files(tag_dir, files, share)
    return Verdict(tag_dir, not problems, problems, len(files), sum(int(f["size"]) for f in files.values()))


def verify_shared(tag_dir: Path, world: int) -> Verdict:
    """`verify_tag` with the hashing split over the ranks when a process group of ``world`` ranks
    is up (collective: every rank calls it, and every rank gets the same verdict)."""
    import torch.distributed as dist

    if world <= 1 or not dist.is_initialized() or dist.get_world_size() != world:
        return verify_tag(tag_dir)
    seal = read_seal(Path(tag_dir))
    if seal is None or seal.get("files") is None:  # every rank reads the same seal: no hashing to share
        return verify_tag(tag_dir)
    mine = check_files(Path(tag_dir), seal["files"], (dist.get_rank(), world))
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    problems = sorted(p for ps in everyone for p in ps)
    files = seal["files"]
    return Verdict(Path(tag_dir), not problems, problems, len(files), sum(int(f["size"]) for f in files.values()))


def first_verified(candidates: list[Path], world: int, is_main: bool) -> tuple[Path | None, list[Verdict]]:
    """The first of ``candidates`` (newest first) that passes verification (collective), and the
    verdicts of those refused before it. Rank 0 says which were refused and where it falls back to."""
    refused: list[Verdict] = []
    for i, tag in enumerate(candidates):
        verdict = verify_shared(tag, world)
        if verdict.ok:
            if is_main and verdict.note:
                print(f"checkpoint {tag.name}: {verdict.note}: loading it unverified", flush=True)
            return tag, refused
        refused.append(verdict)
        if is_main:
            after = candidates[i + 1].name if i + 1 < len(candidates) else None
            then = f"falling back to the previous sealed checkpoint {after}" if after else "no older sealed checkpoint"
            print(f"checkpoint {tag.name} refused: {verdict.describe()}; {then}", flush=True)
    return None, refused
