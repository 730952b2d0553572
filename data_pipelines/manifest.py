"""Read and write the `manifest.json` that marks a prepared dataset directory as complete."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
# OpenCLIP's shard index: {"shard-file-name.tar": samples}, beside the shards, so it can train on
# them without --train-num-samples (it looks the file up in the folder of the shards it is given).
SIZES_NAME = "sizes.json"


class ManifestError(ValueError):
    """The manifest is missing or unreadable; the message names the path."""


def manifest_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / MANIFEST_NAME


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Write `directory/manifest.json` atomically and return its path.

    Readers treat the manifest's presence as "the dataset is complete", so a crash
    mid-write must never leave a truncated file under the final name.
    """
    return write_json_atomic(manifest_path(directory), manifest)


def write_json_atomic(target: Path, value: Any) -> Path:
    """Write `value` as JSON to `target` via a temporary file and a rename: never half-written."""
    text = json.dumps(value, indent=2) + "\n"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the manifest of a prepared dataset directory (or the manifest file itself)."""
    path = Path(directory)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(
            f"no manifest at {path}: the directory was not prepared, or preparation did not finish"
        ) from None
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"manifest {path} must hold a JSON object, got {type(manifest).__name__}")
    return manifest


def write_sizes(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> list[Path]:
    """Write OpenCLIP's sizes.json in every folder holding shards the manifest lists, mapping each
    shard's file name to its sample count; return the files written. Call it before the manifest:
    the manifest's presence means the directory is complete."""
    root = Path(directory)
    folders: dict[Path, dict[str, int]] = {}
    for info in manifest.get("splits", {}).values():
        for shard, samples in zip(info.get("shards", []), info.get("shard_samples", [])):
            path = root / shard
            sizes = folders.setdefault(path.parent, {})
            if path.name in sizes:
                raise ValueError(f"two shards named {path.name} in {path.parent}: sizes.json keys by file name")
            sizes[path.name] = int(samples)
    return [write_json_atomic(folder / SIZES_NAME, dict(sorted(sizes.items()))) for folder, sizes in folders.items()]
