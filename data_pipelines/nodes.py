"""Preparing one dataset on several machines: what each node owns in the shared output directory,
its partial manifest, and `prepare-merge DIR`, which joins the parts into the one manifest.json.

    prepare-text corpus/ --output data/c4 --tokenizer tok/ --num-nodes 4 --node-rank 0   # ... 3
    prepare-merge data/c4

prepare-image-text takes the same two flags (node I prepares every N-th sample, and the merge
drops the duplicates of samples other nodes kept; see data_pipelines.image.prepare).

Node I writes DIR/{train,val,test}/shard-rIIIII-NNNNNN.tar (sample keys `<split>-rIIIII-<n>`) and,
last, DIR/parts/node-IIIII.json; it never touches another node's files. The merge checks that
every node finished with the same settings, tokenizer and input list, then writes each split
folder's sizes.json (OpenCLIP's shard index) and DIR/manifest.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from data_pipelines import cli
from data_pipelines.manifest import MANIFEST_NAME, SIZES_NAME, ManifestError, read_manifest, write_json_atomic
from data_pipelines.manifest import write_sizes
from data_pipelines.shards import SHARD_PATTERN
from data_pipelines.splits import SPLITS

PROG = "prepare-merge"
PARTS_DIR = "parts"
PART_VERSION = 1


def node_tag(rank: int) -> str:
    return f"r{rank:05d}"


def node_shard_pattern(rank: int) -> str:
    return f"shard-{node_tag(rank)}-%06d.tar"


def part_path(output: Path, rank: int) -> Path:
    return output / PARTS_DIR / f"node-{rank:05d}.json"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of the vocabulary and special tokens: equal on every node or the merge refuses."""
    text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.eos_token, len(tokenizer)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prepare_node_output(output: Path, rank: int, overwrite: bool) -> None:
    """Make `output` ready for node `rank`: other nodes may be writing there at the same time, so
    only this node's shards and part are ever removed (with --overwrite), and what a finished or
    single-machine dataset left behind (manifest.json, sizes.json, un-ranked shards) goes too."""
    output.mkdir(parents=True, exist_ok=True)
    own = [part_path(output, rank)]
    for split in SPLITS:
        own += sorted((output / split).glob(node_shard_pattern(rank).replace("%06d", "*")))
    stale = [output / MANIFEST_NAME]
    for split in SPLITS:
        stale += [output / split / SIZES_NAME, *sorted((output / split).glob(SHARD_PATTERN.replace("%06d", "[0-9]" * 6)))]
    found = [p for p in own + stale if p.exists()]
    if found and not overwrite:
        raise cli.UsageError(f"output directory {output} already holds {found[0].relative_to(output)}"
                             f"{f' and {len(found) - 1} more' if len(found) > 1 else ''} of node {rank} or of a "
                             f"finished dataset; pass --overwrite to replace them")
    for path in found:
        path.unlink(missing_ok=True)  # another node may have removed a shared stale file first
    (output / PARTS_DIR).mkdir(exist_ok=True)


def write_part(output: Path, part: dict[str, Any]) -> Path:
    return write_json_atomic(part_path(output, part["node_rank"]), part)


# ---------------------------------------------------------------------------------------------
# The merge


def read_parts(directory: Path) -> list[dict[str, Any]]:
    """Every node's part, in rank order; refuses a missing node, naming it, or parts that disagree."""
    files = sorted((directory / PARTS_DIR).glob("node-*.json"))
    if not files:
        raise cli.UsageError(f"no node parts in {directory / PARTS_DIR}: run the prepare command with "
                             f"--num-nodes N --node-rank I on every node first")
    parts = [read_manifest(f) for f in files]
    first = parts[0]
    num_nodes = first.get("num_nodes")
    for path, part in zip(files, parts):
        if part.get("version") != PART_VERSION or not isinstance(part.get("num_nodes"), int):
            raise cli.UsageError(f"{path} is not a node part this version of {PROG} reads")
        if part["num_nodes"] != num_nodes:
            raise cli.UsageError(f"{path} is from a run with --num-nodes {part['num_nodes']}, "
                                 f"{files[0]} from one with --num-nodes {num_nodes}")
    by_rank = {part["node_rank"]: part for part in parts}
    missing = [rank for rank in range(num_nodes) if rank not in by_rank]
    if missing:
        names = ", ".join(str(part_path(directory, r)) for r in missing[:5])
        raise cli.UsageError(f"missing the part of node{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(map(str, missing))} of {num_nodes} ({names}): run --node-rank "
                             f"{missing[0]} to the end, then merge again")
    extra = sorted(set(by_rank) - set(range(num_nodes)))
    if extra:
        raise cli.UsageError(f"parts of nodes {extra} do not belong to a run with --num-nodes {num_nodes}")
    parts = [by_rank[r] for r in range(num_nodes)]
    for part in parts[1:]:
        if part.get("kind") != first.get("kind"):
            raise cli.UsageError(f"node {part['node_rank']} prepared {part.get('kind')!r} data, node 0 "
                                 f"{first.get('kind')!r}")
        for key in sorted(set(first["settings"]) | set(part["settings"])):
            if first["settings"].get(key) != part["settings"].get(key):
                raise cli.UsageError(f"node {part['node_rank']} ran with a different {key} than node 0 "
                                     f"({part['settings'].get(key)!r} vs {first['settings'].get(key)!r}); "
                                     f"every node needs the same inputs and flags")
    return parts


def merge_splits(directory: Path, parts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each split's shards in rank order, every count summed; refuses a listed shard that is gone."""
    merged: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        total: dict[str, Any] = {"shards": [], "shard_samples": []}
        for part in parts:
            info = part["splits"][split]
            for shard in info["shards"]:
                if not (directory / shard).is_file():
                    raise cli.UsageError(f"shard {directory / shard} of node {part['node_rank']} is missing")
            for key, value in info.items():
                if isinstance(value, list):
                    total[key] = total.get(key, []) + value
                else:
                    total[key] = total.get(key, 0) + value
        merged[split] = total
    return merged


def merge_skipped(parts: list[dict[str, Any]], max_examples: int = 20) -> dict[str, Any]:
    by_reason: dict[str, int] = {}
    examples: list[dict[str, str]] = []
    for part in parts:
        for reason, count in part["skipped"]["by_reason"].items():
            by_reason[reason] = by_reason.get(reason, 0) + count
        examples += part["skipped"]["examples"]
    return {"total": sum(by_reason.values()), "by_reason": dict(sorted(by_reason.items())),
            "examples": examples[:max_examples]}


def merge_inputs(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-input stats in the input order every node resolved."""
    paths = parts[0]["settings"]["input_paths"]
    stats: dict[int, dict[str, Any]] = {}
    for part in parts:
        stats.update({int(i): s for i, s in part["inputs"].items()})
    if sorted(stats) != list(range(len(paths))):
        raise cli.UsageError(f"the node parts cover {len(stats)} of the {len(paths)} inputs")
    return [stats[i] for i in range(len(paths))]


def merge(directory: Path, out: TextIO | None = None, err: TextIO | None = None) -> dict[str, Any]:
    """Join the node parts in `directory` into its manifest.json (and sizes.json); return it."""
    console = cli.Console(PROG, sys.stdout if out is None else out, sys.stderr if err is None else err, False,
                          time.perf_counter())
    if not directory.is_dir():
        raise cli.UsageError(f"{directory} is not a directory")
    parts = read_parts(directory)
    kind = parts[0].get("kind")
    if kind == "text-part":
        from data_pipelines.text import prepare

        manifest = prepare.merged_manifest(directory, parts)
        summary = prepare.format_summary
    elif kind == "image-text-part":
        from data_pipelines.image import prepare as image_prepare

        manifest = image_prepare.merged_manifest(directory, parts)
        summary = image_prepare.format_summary
    else:
        raise cli.UsageError(f"{PROG} does not know node parts of kind {kind!r}")
    write_sizes(directory, manifest)
    return console.finish(directory, manifest, summary)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.command_parser(PROG, "Join the node parts of a dataset prepared with --num-nodes N into its "
                                      "manifest.json, once every node has finished.")
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
