"""Read and write the `manifest.json` that marks a prepared dataset directory as complete."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """The manifest is missing or unreadable; the message names the path."""


def manifest_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / MANIFEST_NAME


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Write `directory/manifest.json` atomically and return its path.

    Readers treat the manifest's presence as "the dataset is complete", so a crash
    mid-write must never leave a truncated file under the final name.
    """
    target = manifest_path(directory)
    text = json.dumps(manifest, indent=2) + "\n"
    fd, tmp_name = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=target.parent)
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
