"""prepare-merge for prepare-image-text: one manifest, that of a single machine's run, from the
nodes' parts, after the samples whose image another node kept first are dropped from the shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipelines import cli, node_parts
from data_pipelines.image.node_duplicates import cross_node_duplicates, without_duplicates
from data_pipelines.image.prepare import KIND, MANIFEST_VERSION, PROG
from data_pipelines.manifest import inside


def merged_manifest(directory: Path, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a single machine's run, from the node parts (read_parts checked they agree);
    the samples that repeat one of another node are dropped from the shards first."""
    settings = parts[0]["settings"]
    duplicates = cross_node_duplicates(directory, parts)
    kept = without_duplicates(directory, parts, duplicates)
    paths = settings["input_paths"]
    inputs = [
        {"path": path, "format": fmt, "samples": 0, "rejected": 0}
        for path, fmt in zip(paths, settings["input_formats"])
    ]
    for part in parts:
        if len(part["inputs"]) != len(paths):
            raise cli.UsageError(
                f"the part of node {part['node_rank']} counts {len(part['inputs'])} inputs, not {len(paths)}"
            )
        for total, stats in zip(inputs, part["inputs"]):
            total["samples"] += stats["samples"]
            total["rejected"] += stats["rejected"]
    rejected = node_parts.merge_skipped(parts)
    for rank, row in duplicates:
        inputs[int(row[1])]["samples"] -= 1
        inputs[int(row[1])]["rejected"] += 1
        if len(rejected["examples"]) < 20:
            rejected["examples"].append(
                {
                    "source": f"{paths[int(row[1])]} (sample {row[5]} of node {rank})",
                    "reason": "duplicate_image",
                    "detail": "same image as an earlier sample of another node",
                }
            )
    if duplicates:
        by_reason = dict(rejected["by_reason"])
        by_reason["duplicate_image"] = by_reason.get("duplicate_image", 0) + len(duplicates)
        rejected["by_reason"] = dict(sorted(by_reason.items()))
        rejected["total"] = sum(by_reason.values())
    manifest = {
        "kind": KIND,
        "version": MANIFEST_VERSION,
        "created_by": PROG,
        **{
            k: settings[k]
            for k in (
                "image_size",
                "resize_mode",
                "jpeg_quality",
                "min_image_size",
                "max_caption_chars",
                "seed",
                "val_fraction",
                "test_fraction",
                "samples_per_shard",
            )
        },
        "inputs": inputs,
        "splits": node_parts.merge_splits(directory, kept),
        "rejected": rejected,
        "tokenizer": settings["tokenizer"],
        "num_nodes": len(parts),
    }
    if settings["tokenizer"] is not None:
        part = node_parts.part_path(directory, 0)
        tokenizer = inside(directory, settings["tokenizer"]["path"], part, "tokenizer.path")
        if not tokenizer.is_dir():
            raise cli.UsageError(f"{tokenizer} is missing (node 0 writes it)")
    if not sum(s["samples"] for s in manifest["splits"].values()):
        reasons = cli.reason_counts(rejected["by_reason"])
        raise cli.UsageError(
            "no usable image-text pairs in the inputs of any node" + (f" (rejected: {reasons})" if reasons else "")
        )
    return manifest
