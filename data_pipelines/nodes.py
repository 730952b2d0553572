"""Preparing one dataset on several machines: `prepare-merge DIR`, which joins the node parts into
the one manifest.json.

    prepare-text corpus/ --output data/c4 --tokenizer tok/ --num-nodes 4 --node-rank 0   # ... 3
    prepare-merge data/c4

prepare-image-text takes the same two flags (node I prepares every N-th sample, and the merge
drops the duplicates of samples other nodes kept; see data_pipelines.image.prepare).

What each node owns in the shared output directory and writes as its part is in
data_pipelines.node_parts. The merge checks that every node finished with the same settings,
tokenizer and input list, then writes each split folder's sizes.json (OpenCLIP's shard index) and
DIR/manifest.json; the kinds of parts it knows are listed in data_pipelines.kinds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from data_pipelines import cli
from data_pipelines.kinds import PART_KINDS
from data_pipelines.manifest import ManifestError, read_manifest, write_sizes
from data_pipelines.node_parts import (
    PART_VERSION,
    PARTS_DIR,
    check_part,
    merge_inputs,
    merge_skipped,
    merge_splits,
    node_shard_pattern,
    node_tag,
    part_path,
    prepare_node_output,
    tokenizer_fingerprint,
    write_part,
)

__all__ = [
    "PARTS_DIR",
    "PART_VERSION",
    "PROG",
    "build_parser",
    "check_part",
    "main",
    "merge",
    "merge_inputs",
    "merge_skipped",
    "merge_splits",
    "node_shard_pattern",
    "node_tag",
    "part_path",
    "prepare_node_output",
    "read_parts",
    "tokenizer_fingerprint",
    "write_part",
]

PROG = "prepare-merge"


def read_parts(directory: Path) -> list[dict[str, Any]]:
    """Every node's part, in rank order; refuses a missing node, naming it, or parts that disagree."""
    files = sorted((directory / PARTS_DIR).glob("node-*.json"))
    if not files:
        raise cli.UsageError(
            f"no node parts in {directory / PARTS_DIR}: run the prepare command with "
            f"--num-nodes N --node-rank I on every node first"
        )
    parts = [read_manifest(f, paths=False) for f in files]
    for path, part in zip(files, parts):  # before anything is read from, written to or unlinked in DIR
        check_part(directory, path, part)
    first = parts[0]
    num_nodes = first.get("num_nodes")
    for path, part in zip(files, parts):
        if part.get("version") != PART_VERSION or not isinstance(part.get("num_nodes"), int):
            raise cli.UsageError(f"{path} is not a node part this version of {PROG} reads")
        if part["num_nodes"] != num_nodes:
            raise cli.UsageError(
                f"{path} is from a run with --num-nodes {part['num_nodes']}, "
                f"{files[0]} from one with --num-nodes {num_nodes}"
            )
    by_rank = {part["node_rank"]: part for part in parts}
    missing = [rank for rank in range(num_nodes) if rank not in by_rank]
    if missing:
        names = ", ".join(str(part_path(directory, r)) for r in missing[:5])
        raise cli.UsageError(
            f"missing the part of node{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(str, missing))} of {num_nodes} ({names}): run --node-rank "
            f"{missing[0]} to the end, then merge again"
        )
    extra = sorted(set(by_rank) - set(range(num_nodes)))
    if extra:
        raise cli.UsageError(f"parts of nodes {extra} do not belong to a run with --num-nodes {num_nodes}")
    parts = [by_rank[r] for r in range(num_nodes)]
    for part in parts[1:]:
        if part.get("kind") != first.get("kind"):
            raise cli.UsageError(
                f"node {part['node_rank']} prepared {part.get('kind')!r} data, node 0 {first.get('kind')!r}"
            )
        _same_inputs(first, part)
        for key in sorted(set(first["settings"]) | set(part["settings"])):
            if first["settings"].get(key) != part["settings"].get(key):
                raise cli.UsageError(
                    f"node {part['node_rank']} ran with a different {key} than node 0 "
                    f"({part['settings'].get(key)!r} vs {first['settings'].get(key)!r}); "
                    f"every node needs the same inputs and flags"
                )
    return parts


def _same_inputs(first: dict[str, Any], part: dict[str, Any]) -> None:
    """Every node must have seen the same inputs at the same sizes: the work is divided by planning
    from them, and a file that differs between nodes would duplicate or lose data. Names the input."""
    paths, theirs = first["settings"].get("input_paths") or [], part["settings"].get("input_paths") or []
    sizes, their_sizes = first["settings"].get("input_bytes"), part["settings"].get("input_bytes")
    if sizes is None or their_sizes is None or paths != theirs:
        return  # a different input list is reported with the other settings
    for path, a, b in zip(paths, sizes, their_sizes):
        if a != b and a is not None and b is not None:
            raise cli.UsageError(
                f"input {path} is {b:,} bytes on node {part['node_rank']} and {a:,} on node 0: every node must "
                "read the same inputs (a copy still being written, or another version of the file); prepare "
                "again once they agree"
            )


def merge(directory: Path, out: TextIO | None = None, err: TextIO | None = None) -> dict[str, Any]:
    """Join the node parts in `directory` into its manifest.json (and sizes.json); return it."""
    console = cli.Console(
        PROG, sys.stdout if out is None else out, sys.stderr if err is None else err, False, time.perf_counter()
    )
    if not directory.is_dir():
        raise cli.UsageError(f"{directory} is not a directory")
    parts = read_parts(directory)
    kind = parts[0].get("kind")
    if kind not in PART_KINDS:
        raise cli.UsageError(f"{PROG} does not know node parts of kind {kind!r}")
    merged_manifest, summary = PART_KINDS[kind]
    try:
        manifest = merged_manifest(directory, parts)
    except ManifestError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:  # a field only the kind reads
        raise cli.UsageError(
            f"the node parts in {directory / PARTS_DIR} are malformed ({type(exc).__name__}: {exc}); "
            "prepare the nodes again"
        ) from None
    write_sizes(directory, manifest)
    return console.finish(directory, manifest, summary)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.command_parser(
        PROG,
        "Join the node parts of a dataset prepared with --num-nodes N into its "
        "manifest.json, once every node has finished.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR", help="the --output every node wrote to")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        merge(args.directory)
    except (cli.UsageError, ManifestError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
