"""Sample counts of raw shards, read beside them: OpenCLIP's ``sizes.json`` of a folder, else
img2dataset's ``{shard}_stats.json`` (``successes``) or ``{shard}.parquet`` (rows with status
``success``). Counts are not needed to stream, only to plan (epochs, the size of an evaluation).
"""

from __future__ import annotations

import json
import shlex
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from data_pipelines.sources.transports import CURL_SCHEMES, url_scheme


def shard_location(url: str) -> str | None:
    """Where a shard's sibling files (sizes.json, _stats.json) can be read: the URL itself, or for
    a ``pipe:`` command its argument ending in .tar (``pipe:aws s3 cp s3://b/00000.tar -``)."""
    if url_scheme(url) != "pipe":
        return url
    try:
        words = shlex.split(url[len("pipe:") :])
    except ValueError:
        return None
    return next((w for w in reversed(words) if w.endswith(".tar")), None)


def _read_bytes(location: str, timeout: float = 30.0) -> bytes | None:
    """A small file's bytes, or None when it does not exist or is larger than the sidecar cap
    (`limits.MAX_SIDECAR_BYTES`, --max-sidecar-bytes): any failure reads as absent, the count is then
    unknown, which is reported where a count is needed. http(s) goes through the shard transport
    (its redirect policy, basic auth and redaction); a local path must be a regular file."""
    from data_pipelines import limits
    from data_pipelines.sources.transports import FetchPolicy, open_shard

    cap = limits.current().max_sidecar_bytes
    scheme = url_scheme(location)
    try:
        if scheme in CURL_SCHEMES:
            with open_shard(location, FetchPolicy(retries=0, timeout=timeout)) as r:
                data = r.read(cap + 1)
        elif scheme in ("", "file"):
            path = Path(urlparse(location).path if scheme == "file" else location)
            if not path.is_file():  # a FIFO or device would block or never end
                return None
            with path.open("rb") as f:
                data = f.read(cap + 1)
        else:
            import fsspec

            with fsspec.open(location, "rb") as f:
                data = f.read(cap + 1)
    except (OSError, urllib.error.URLError, ValueError, ImportError):
        return None
    except Exception:  # noqa: BLE001 - backends raise their own types (botocore's ClientError)
        return None
    return None if len(data) > cap else data


def _split_location(location: str) -> tuple[str, str]:
    """(directory, file name) of a local path or URL."""
    head, _, name = location.rpartition("/")
    return head, name


def _stem(name: str) -> str:
    return name[: -len(".tar")] if name.endswith(".tar") else name.rsplit(".", 1)[0]


def _parquet_successes(data: bytes) -> int | None:
    try:
        import io

        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data), columns=["status"])
    except Exception:  # noqa: BLE001 - not an img2dataset parquet
        return None
    return sum(1 for s in table.column("status").to_pylist() if s == "success")


def _stats_successes(data: bytes) -> int | None:
    try:
        stats = json.loads(data)
    except ValueError:
        return None
    n = stats.get("successes") if isinstance(stats, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def count_shards(shards: Sequence[str], threads: int = 16) -> tuple[dict[str, int], str | None]:
    """Samples per shard URL where a count can be found, and where the counts came from.

    A folder's ``sizes.json`` (one read per folder) is tried first; then each shard's
    ``_stats.json``, then its parquet (read in parallel: a remote bucket answers each in tens of ms).
    """
    locations = {url: shard_location(url) for url in shards}
    folders: dict[str, dict] = {}
    for loc in set(filter(None, locations.values())):
        folders.setdefault(_split_location(loc)[0], {})
    for folder in list(folders):
        raw = _read_bytes(f"{folder}/sizes.json" if folder else "sizes.json")
        try:
            sizes = json.loads(raw) if raw else {}
        except ValueError:
            sizes = {}
        folders[folder] = sizes if isinstance(sizes, dict) else {}
    counts: dict[str, int] = {}
    source = None
    for url, loc in locations.items():
        if loc is None:
            continue
        folder, name = _split_location(loc)
        n = folders[folder].get(name)
        if isinstance(n, int) and n >= 0:
            counts[url], source = n, "sizes.json"
    missing = [(url, loc) for url, loc in locations.items() if loc is not None and url not in counts]

    def sidecar(item: tuple[str, str]) -> tuple[str, int | None, str]:
        url, loc = item
        folder, name = _split_location(loc)
        base = f"{folder}/{_stem(name)}" if folder else _stem(name)
        raw = _read_bytes(base + "_stats.json")
        n = _stats_successes(raw) if raw else None
        if n is not None:
            return url, n, "_stats.json"
        raw = _read_bytes(base + ".parquet")
        return url, (_parquet_successes(raw) if raw else None), "parquet"

    if missing:
        with ThreadPoolExecutor(max(1, min(threads, len(missing)))) as pool:
            for url, n, how in pool.map(sidecar, missing):
                if n is not None:
                    counts[url], source = n, source or how
    return counts, source
