"""Duplicates across the nodes of prepare-image-text --num-nodes N: each node records what it kept,
and the merge drops, in global input order, every kept sample that repeats the bytes or pixels of
an earlier one kept by another node, rewriting the few shards holding them.
"""

from __future__ import annotations

import heapq
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_pipelines import cli, node_parts

# A node's DIR/parts/node-IIIII.kept.tsv: a line per sample it wrote, in input order.
KEPT_COLUMNS = ("ordinal", "input_index", "sha256", "pixels", "split", "key")


def kept_path(output: Path, rank: int) -> Path:
    return node_parts.part_path(output, rank).with_suffix(".kept.tsv")


def _kept_rows(directory: Path, part: dict[str, Any]) -> Iterator[tuple[int, int, list[str]]]:
    path = directory / node_parts.PARTS_DIR / part["kept"]
    try:
        file = open(path, encoding="utf-8")
    except OSError as exc:
        raise cli.UsageError(f"cannot read {path} of node {part['node_rank']}: {exc}") from None
    with file:
        for line in file:
            row = line.rstrip("\n").split("\t")
            if len(row) != len(KEPT_COLUMNS):
                raise cli.UsageError(f"{path}: not a line of {', '.join(KEPT_COLUMNS)}: {line[:200]!r}")
            yield int(row[0]), part["node_rank"], row


def cross_node_duplicates(directory: Path, parts: list[dict[str, Any]]) -> list[tuple[int, list[str]]]:
    """(node rank, kept row) of every sample a node kept that repeats the bytes or pixels of one
    kept earlier in global input order (by another node: a node drops its own duplicates).

    This is the single-machine rule: equal bytes decode to equal pixels, so a sample is a
    duplicate exactly when its pixels equal those of the first such sample, which one of the
    nodes kept. The sets hold two digests per kept sample, as on one machine."""
    seen_bytes: set[str] = set()
    seen_pixels: set[str] = set()
    found = []
    for _, rank, row in heapq.merge(*(_kept_rows(directory, part) for part in parts)):
        sha, pixels = row[2], row[3]
        if sha in seen_bytes or pixels in seen_pixels:
            found.append((rank, row))
        else:
            seen_bytes.add(sha)
            seen_pixels.add(pixels)
    return found


def _drop_samples(shard: Path, keys: set[str]) -> None:
    """Rewrite a tar without the members of `keys` (atomically; a no-op on one already rewritten)."""
    with tempfile.NamedTemporaryFile(dir=shard.parent, prefix=f".{shard.name}.", delete=False) as scratch:
        pass
    try:
        with tarfile.open(shard) as source, tarfile.open(scratch.name, "w") as target:
            for member in source:
                if member.name.split(".", 1)[0] not in keys:
                    target.addfile(member, source.extractfile(member) if member.isfile() else None)
        os.replace(scratch.name, shard)
    finally:
        Path(scratch.name).unlink(missing_ok=True)


def without_duplicates(
    directory: Path, parts: list[dict[str, Any]], duplicates: list[tuple[int, list[str]]]
) -> list[dict[str, Any]]:
    """Copies of the parts with the duplicates taken out of their shards (rewritten on disk; a
    shard left empty is deleted and unlisted) and their counts."""
    parts = json.loads(json.dumps(parts))
    per_node = parts[0]["settings"]["samples_per_shard"]
    by_shard: dict[tuple[int, str, int], set[str]] = {}
    for rank, row in duplicates:
        split, key = row[4], row[5]
        by_shard.setdefault((rank, split, int(key.rsplit("-", 1)[1]) // per_node), set()).add(key)
    for (rank, split, index), keys in sorted(by_shard.items()):
        info = parts[rank]["splits"][split]
        shard = directory / info["shards"][index]
        info["shard_samples"][index] -= len(keys)
        info["samples"] -= len(keys)
        if info["shard_samples"][index] == 0:
            shard.unlink(missing_ok=True)
        elif shard.is_file():
            _drop_samples(shard, keys)
    for part in parts:
        for info in part["splits"].values():
            pairs = [(s, n) for s, n in zip(info["shards"], info["shard_samples"]) if n > 0]
            info["shards"], info["shard_samples"] = [s for s, _ in pairs], [n for _, n in pairs]
    return parts
