"""prepare-merge for prepare-text: one manifest, that of a single machine's run, from the nodes'
parts (`data_pipelines.nodes`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipelines import cli, node_parts
from data_pipelines.manifest import inside
from data_pipelines.text.prepare import MANIFEST_VERSION, PROG


def merged_manifest(directory: Path, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a single machine's run, from the node parts (read_parts checked they agree)."""
    settings = parts[0]["settings"]
    manifest = {
        "kind": "text",
        "version": MANIFEST_VERSION,
        "created_by": PROG,
        "seq_len": settings["seq_len"],
        "token_dtype": settings["token_dtype"],
        "tokenizer": settings["tokenizer"],
        **{k: settings[k] for k in ("seed", "val_fraction", "test_fraction", "samples_per_shard")},
        "text_field": settings["text_field"],
        "inputs": node_parts.merge_inputs(parts),
        "splits": node_parts.merge_splits(directory, parts),
        "skipped": node_parts.merge_skipped(parts),
        "num_nodes": len(parts),
    }
    tokenizer = inside(directory, settings["tokenizer"]["path"], node_parts.part_path(directory, 0), "tokenizer.path")
    if not tokenizer.is_dir():
        raise cli.UsageError(f"{tokenizer} is missing (node 0 writes it)")
    if not sum(s["documents"] for s in manifest["splits"].values()):
        raise cli.UsageError(
            f"no usable documents in the inputs of any node (skipped records: "
            f"{cli.reason_counts(manifest['skipped']['by_reason'])})"
        )
    return manifest
