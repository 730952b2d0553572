"""One node's share of a dataset prepared on several machines: the files it owns in the shared
output directory, its partial manifest, and the pieces that every kind's merge of the parts shares
(`prepare-merge`, in data_pipelines.nodes, joins them).

Node I writes DIR/{train,val,test}/shard-rIIIII-NNNNNN.tar (sample keys `<split>-rIIIII-<n>`) and,
last, DIR/parts/node-IIIII.json; it never touches another node's files.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from data_pipelines import cli
from data_pipelines.manifest import MANIFEST_NAME, SIZES_NAME, inside, write_json_atomic
from data_pipelines.shards import SHARD_PATTERN
from data_pipelines.splits import SPLITS

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
        numbered = SHARD_PATTERN.replace("%06d", "[0-9]" * 6)
        stale += [output / split / SIZES_NAME, *sorted((output / split).glob(numbered))]
    found = [p for p in own + stale if p.exists()]
    if found and not overwrite:
        raise cli.UsageError(
            f"output directory {output} already holds {found[0].relative_to(output)}"
            f"{f' and {len(found) - 1} more' if len(found) > 1 else ''} of node {rank} or of a "
            f"finished dataset; pass --overwrite to replace them"
        )
    for path in found:
        path.unlink(missing_ok=True)  # another node may have removed a shared stale file first
    (output / PARTS_DIR).mkdir(exist_ok=True)


def node_shard_regex(split: str, rank: int) -> re.Pattern[str]:
    """Exactly the names node `rank` gives its shards of `split`: `<split>/shard-rIIIII-NNNNNN.tar`."""
    return re.compile(re.escape(f"{split}/{node_shard_pattern(rank)}").replace("%06d", r"[0-9]{6}"))


def check_part(directory: Path, path: Path, part: dict[str, Any]) -> None:
    """Refuse (cli.UsageError naming `path` and the entry) a part that is not what a node writes:
    the merge trusts its structure and deletes, rewrites and indexes the shards it names, so only
    this node's own shard names, inside `directory`, pass; checked before anything is touched."""

    def bad(entry: str, why: str) -> cli.UsageError:
        return cli.UsageError(f"{path}: {entry} {why}; not a node part this version of prepare-merge reads")

    rank = part.get("node_rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise bad("node_rank", f"is {rank!r}, not a node rank")
    if path.name != part_path(directory, rank).name:
        raise bad("node_rank", f"is {rank}, but the file is named {path.name}")
    for key, kind in (("settings", dict), ("splits", dict), ("skipped", dict), ("inputs", (dict, list))):
        if not isinstance(part.get(key), kind):
            raise bad(key, "is missing or of the wrong type")
    skipped = part["skipped"]
    if not isinstance(skipped.get("by_reason"), dict) or not isinstance(skipped.get("examples"), list):
        raise bad("skipped", "needs by_reason (an object) and examples (a list)")
    for split in SPLITS:
        info = part["splits"].get(split)
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise bad(f"splits.{split}", "is missing or has no list of shards")
        counts = info.get("shard_samples")
        if not isinstance(counts, list) or len(counts) != len(info["shards"]):
            raise bad(f"splits.{split}.shard_samples", "is not a count per shard")
        for key, value in info.items():
            numbers = value if isinstance(value, list) and key != "shards" else [value]
            if key != "shards" and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
                raise bad(f"splits.{split}.{key}", f"is {value!r}, not a count")
        own = node_shard_regex(split, rank)
        for i, shard in enumerate(info["shards"]):
            entry = f"splits.{split}.shards[{i}]"
            if not isinstance(shard, str) or not own.fullmatch(shard):
                own_name = f"{split}/{node_shard_pattern(rank)}".replace("%06d", "NNNNNN")
                raise bad(entry, f"{shard!r} is not a shard of node {rank} ({own_name})")
            inside(directory, shard, path, entry)
    tokenizer = part["settings"].get("tokenizer")
    if isinstance(tokenizer, dict) and "path" in tokenizer:
        inside(directory, tokenizer["path"], path, "settings.tokenizer.path")
    if "kept" in part and part["kept"] != part_path(directory, rank).with_suffix(".kept.tsv").name:
        raise bad("kept", f"{part['kept']!r} is not node {rank}'s kept list")


def write_part(output: Path, part: dict[str, Any]) -> Path:
    return write_json_atomic(part_path(output, part["node_rank"]), part)


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
    return {
        "total": sum(by_reason.values()),
        "by_reason": dict(sorted(by_reason.items())),
        "examples": examples[:max_examples],
    }


def merge_inputs(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-input stats in the input order every node resolved."""
    paths = parts[0]["settings"]["input_paths"]
    stats: dict[int, dict[str, Any]] = {}
    for part in parts:
        for i, s in part["inputs"].items():
            if int(i) in stats:  # two nodes both processed it: its windows would be written twice
                raise cli.UsageError(
                    f"input {paths[int(i)]} was prepared by node {part['node_rank']} and by an earlier node: "
                    "the nodes planned their work from different views of the inputs"
                )
            stats[int(i)] = s
    if sorted(stats) != list(range(len(paths))):
        raise cli.UsageError(f"the node parts cover {len(stats)} of the {len(paths)} inputs")
    return [stats[i] for i in range(len(paths))]
