"""Expansion: every shard URL a source string names (a folder of raw shards, a local glob or
brace pattern, ``pipe:`` commands, http(s) patterns, fsspec patterns, globs and prefixes).
"""

from __future__ import annotations

import glob as globlib
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from braceexpand import braceexpand

from data_pipelines.manifest import MANIFEST_NAME
from data_pipelines.sources.redact import redact
from data_pipelines.sources.transports import CURL_SCHEMES, FSSPEC_EXTRAS, url_scheme

_GLOB_CHARS = set("*?[")


class SourceError(ValueError):
    """A source that cannot be resolved; the message names the recipe key and the path or URL (its
    password and query values hidden)."""

    def __init__(self, message: str):
        super().__init__(redact(message))


def _fsspec_fs(url: str, key: str):
    import fsspec

    scheme = url_scheme(url)
    try:
        return fsspec.filesystem(scheme)
    except ImportError as e:
        needs = FSSPEC_EXTRAS.get(scheme, "its fsspec backend")
        raise SourceError(f"{key}: {url}: reading {scheme}:// needs {needs} ({e})") from None
    except ValueError as e:
        raise SourceError(f"{key}: {url}: {e}") from None


def expand_urls(urls: str | Sequence[str], key: str = "data.sources[0].urls") -> list[str]:
    """Every shard URL a source string (or list of them) names, in order; raises SourceError
    naming ``key`` for a pattern that matches nothing or a path that does not exist."""
    out: list[str] = []
    for url in [urls] if isinstance(urls, str) else list(urls):
        url = url.strip()
        if not url:
            raise SourceError(f"{key}: an empty source string")
        out.extend(_expand_one(url, key))
    if not out:
        raise SourceError(f"{key}: {urls} names no shards")
    return out


def _expand_one(url: str, key: str) -> list[str]:
    scheme = url_scheme(url)
    if scheme == "pipe" and os.environ.get("WDS_SECURE", "0") not in ("", "0"):
        raise SourceError(f"{key}: {url}: pipe: sources run a shell command, and WDS_SECURE is set: refused")
    if scheme in ("pipe", *CURL_SCHEMES):
        # "?" starts an http(s) URL's query (a presigned URL's signature), not a glob
        path = url.split("?", 1)[0] if scheme != "pipe" else url
        if scheme != "pipe" and any(c in path for c in "*["):
            raise SourceError(
                f"{key}: {redact(url)}: http(s) cannot be listed, so a glob cannot be expanded; "
                "use a brace pattern such as {00000..00099}"
            )
        return list(braceexpand(url))
    if scheme == "file":
        return _expand_local(urlparse(url).path, key)
    if scheme:
        return _expand_fsspec(url, key)
    return _expand_local(url, key)


def _expand_local(pattern: str, key: str) -> list[str]:
    out: list[str] = []
    for path in braceexpand(pattern):
        if any(c in path for c in _GLOB_CHARS):
            found = sorted(globlib.glob(os.path.expanduser(path)))
            if not found:
                raise SourceError(f"{key}: {path} matches no file")
            out.extend(found)
        elif Path(path).is_dir():
            out.extend(_tars_in_folder(Path(path), key))
        elif Path(path).is_file():
            out.append(path)
        else:
            raise SourceError(f"{key}: {path} does not exist")
    return out


def _tars_in_folder(folder: Path, key: str) -> list[str]:
    if (folder / MANIFEST_NAME).is_file():
        raise SourceError(
            f"{key}: {folder} is a prepared folder; name it alone as a source (its manifest gives "
            "its splits), not inside a list or pattern"
        )
    tars = sorted(str(p) for p in folder.glob("*.tar"))
    if not tars:
        raise SourceError(
            f"{key}: {folder} has no manifest.json (not written by prepare-text or prepare-image-text) "
            "and no *.tar shards"
        )
    return tars


def _expand_fsspec(url: str, key: str) -> list[str]:
    fs = _fsspec_fs(url, key)
    scheme = url_scheme(url)
    out: list[str] = []
    for one in braceexpand(url):
        try:
            if any(c in one for c in _GLOB_CHARS):
                found = sorted(fs.glob(one))
                if not found:
                    raise SourceError(f"{key}: {one} matches no object")
                out.extend(f"{scheme}://{p}" for p in found)
            elif not one.endswith(".tar") and fs.isdir(one):
                found = sorted(p for p in fs.ls(one, detail=False) if p.endswith(".tar"))
                if not found:
                    raise SourceError(f"{key}: {one} holds no *.tar objects")
                out.extend(f"{scheme}://{p}" for p in found)
            else:
                out.append(one)  # a brace pattern's members are not checked one by one: LAION has 41k of them
        except SourceError:
            raise
        except Exception as e:  # noqa: BLE001 - credentials, network, missing bucket: all name the URL
            raise SourceError(f"{key}: {one}: {type(e).__name__}: {e}") from None
    return out
