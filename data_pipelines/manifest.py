"""Read and write the `manifest.json` that marks a prepared dataset directory as complete."""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from data_pipelines import limits

MANIFEST_NAME = "manifest.json"
# OpenCLIP's shard index: {"shard-file-name.tar": samples}, beside the shards, so it can train on
# them without --train-num-samples (it looks the file up in the folder of the shards it is given).
SIZES_NAME = "sizes.json"


class ManifestError(ValueError):
    """The manifest is missing, unreadable or names a path outside its folder; the message names the path."""


# "pipe:CMD", "http://...", "s3://...", "file:...": webdataset would run or fetch it, never read a file here
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def inside(
    root: str | os.PathLike[str],
    name: Any,
    source: str | os.PathLike[str],
    what: str = "entry",
    cache: dict[str, str] | None = None,
) -> Path:
    """`root / name` for a path that a manifest or node part (`source`) names, or a ManifestError
    naming `source` and the entry: the name must be a relative path without `..`, neither a URL nor
    a `pipe:` command, and must stay inside `root` once symbolic links are resolved. `cache` (the
    real paths of folders) saves resolving the same folders again when checking many names."""
    problem = None
    if not isinstance(name, str) or not name or "\0" in name:
        problem = "is not a file name"
    elif _SCHEME.match(name):
        problem = "is a URL or a pipe: command, not a file in the folder"
    elif os.path.isabs(name):
        problem = "is an absolute path"
    elif ".." in Path(name).parts or not Path(name).parts:
        problem = "leaves the folder (..)" if ".." in Path(name).parts else "is the folder itself"
    else:
        path = Path(root) / name
        real = _realpath(path, {} if cache is None else cache)
        base = _realpath_dir(str(root), {} if cache is None else cache)
        if not real.startswith(base.rstrip(os.sep) + os.sep):
            problem = f"resolves to {real}, outside {base}"
    if problem:
        raise ManifestError(f"{source}: {what} {name!r} {problem}; the folder is refused")
    return path


def _realpath_dir(directory: str, cache: dict[str, str]) -> str:
    if directory not in cache:
        cache[directory] = os.path.realpath(directory)
    return cache[directory]


def _realpath(path: Path, cache: dict[str, str]) -> str:
    """os.path.realpath(path), resolving its folder once per `cache` (one lstat of the file itself)."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return os.path.realpath(path)
    except OSError:
        pass  # not there (yet): its folder decides
    return os.path.join(_realpath_dir(str(path.parent), cache), path.name)


def check_paths(root: str | os.PathLike[str], manifest: dict[str, Any], source: str | os.PathLike[str]) -> None:
    """Refuse (ManifestError) a manifest naming a shard, tokenizer or class list outside `root`."""
    cache: dict[str, str] = {}
    splits = manifest.get("splits") or {}
    if not isinstance(splits, dict):
        raise ManifestError(f"{source}: splits must be a JSON object")
    for split, info in splits.items():
        shards = info.get("shards", []) if isinstance(info, dict) else None
        if not isinstance(shards, list):
            raise ManifestError(f"{source}: splits.{split}.shards must be a list of file names")
        for i, shard in enumerate(shards):
            inside(root, shard, source, f"splits.{split}.shards[{i}]", cache)
    tokenizer = manifest.get("tokenizer")
    if isinstance(tokenizer, dict) and "path" in tokenizer:
        inside(root, tokenizer["path"], source, "tokenizer.path")
    elif tokenizer is not None and not isinstance(tokenizer, dict):
        raise ManifestError(f"{source}: tokenizer must be a JSON object or null")
    if manifest.get("classes"):
        inside(root, manifest["classes"], source, "classes")


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


def read_manifest(directory: str | os.PathLike[str], *, paths: bool = True) -> dict[str, Any]:
    """Load the manifest of a prepared dataset directory (or the manifest file itself). With
    `paths`, every file it names is checked to lie inside its folder (`check_paths`); a node part
    (parts/node-*.json, whose names are checked by the merge) is read with paths=False."""
    path = Path(directory)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        text = read_sidecar_text(path)
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
    if paths:
        check_paths(path.parent, manifest, path)
    return manifest


def read_sidecar_text(path: Path) -> str:
    """A small JSON file read whole, refused (OSError) past `limits.MAX_SIDECAR_BYTES`
    (``max_sidecar_bytes``) or when it is not a regular file (a FIFO would block), without reading
    more than the cap. A symlink to a regular file is read."""
    problem = limits.file_problem(path, follow_symlinks=True)
    if problem is not None:
        raise OSError(problem[1])
    try:
        data = limits.read_capped(path, limits.current().max_sidecar_bytes)
    except limits.TooLarge as exc:
        raise OSError(str(exc)) from None
    return data.decode("utf-8")


def write_sizes(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> list[Path]:
    """Write OpenCLIP's sizes.json in every folder holding shards the manifest lists, mapping each
    shard's file name to its sample count; return the files written. Call it before the manifest:
    the manifest's presence means the directory is complete."""
    root = Path(directory)
    folders: dict[Path, dict[str, int]] = {}
    cache: dict[str, str] = {}
    for split, info in manifest.get("splits", {}).items():
        for i, (shard, samples) in enumerate(zip(info.get("shards", []), info.get("shard_samples", []))):
            path = inside(root, shard, manifest_path(root), f"splits.{split}.shards[{i}]", cache)
            sizes = folders.setdefault(path.parent, {})
            if path.name in sizes:
                raise ValueError(f"two shards named {path.name} in {path.parent}: sizes.json keys by file name")
            sizes[path.name] = int(samples)
    return [write_json_atomic(folder / SIZES_NAME, dict(sorted(sizes.items()))) for folder, sizes in folders.items()]
