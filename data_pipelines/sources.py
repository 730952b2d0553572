"""Data where it lives: a source named by a folder, a pattern or a URL, resolved to shard URLs and counts.

A source string (``data.path``, ``--data``, or ``urls`` of a ``data.sources`` entry) is one of

* a folder written by ``prepare-text`` / ``prepare-image-text`` (it holds ``manifest.json``): its
  splits, counts and tokenizer come from the manifest, as before;
* a folder of raw shards (img2dataset output: ``*.tar`` beside ``*_stats.json`` and ``*.parquet``);
* a local glob (``/data/*.tar``) or brace pattern (``/data/{00000..00099}.tar``);
* a ``pipe:`` command, brace-expanded into one command per shard (webdataset's convention:
  ``pipe:aws s3 cp s3://laion/{00000..41455}.tar -``);
* an ``http(s)://`` pattern (read with urllib, `open_shard`);
* an fsspec URL (``s3://``, ``gs://``, ``az://``; s3fs / gcsfs / adlfs installed as the extras
  ``ds-pretrain[s3]`` etc.): a pattern, a glob or a prefix listed for ``*.tar``, read through fsspec.

Sample counts are not needed to stream, only to plan (epochs, the size of an evaluation). They come
from, in order: the manifest; OpenCLIP's ``sizes.json`` beside the shards (``{"00000.tar": n}``);
img2dataset's ``{shard}_stats.json`` (``successes``) or ``{shard}.parquet`` (rows with status
``success``); otherwise a source's ``samples`` key gives its total. For a ``pipe:`` command the
shard's location is the command's argument ending in ``.tar``.

Raw sources have no splits of their own. Held-out data is either separate sources (``eval_sources``)
or a fraction of the train sources' samples chosen by a stable hash of the sample key
(`held_out`): the train stream drops those keys and the val stream keeps only them, so no
held-out sample is ever trained on, whatever the world size, order or resume.
"""
from __future__ import annotations

import glob as globlib
import json
import os
import random
import shlex
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlparse

from braceexpand import braceexpand

from data_pipelines.manifest import MANIFEST_NAME, read_manifest
from data_pipelines.splits import split_hash
from data_pipelines.text.packed import FORMAT as PACKED_FORMAT

# Read through fsspec (webdataset's own "gs" handler shells out to gsutil; fsspec needs no CLI).
FSSPEC_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")
FSSPEC_EXTRAS = {"s3": "s3fs (pip install 'ds-pretrain[s3]')", "gs": "gcsfs (pip install 'ds-pretrain[gcs]')",
                 "gcs": "gcsfs (pip install 'ds-pretrain[gcs]')", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
CURL_SCHEMES = ("http", "https")
# Fixed, not the training seed: a rerun with another --seed must hold out the same samples.
HOLDOUT_SEED = 0x5EED
AUTO_HOLDOUT = 0.01
_GLOB_CHARS = set("*?[")


class SourceError(ValueError):
    """A source that cannot be resolved; the message names the recipe key and the path or URL."""


@dataclass(frozen=True)
class SourceSpec:
    """One entry of ``data.sources`` as plain values (the data layer does not import the recipe)."""

    urls: str | tuple[str, ...]
    name: str | None = None
    weight: float = 1.0
    samples: int | None = None
    tokens: int | None = None
    key: str = "data.sources[0]"  # where it was written, for messages

    def describe(self) -> str:
        return self.urls if isinstance(self.urls, str) else ", ".join(self.urls)

    @property
    def urls_key(self) -> str:
        """The key of the source string itself: data.sources[i].urls, or data.path (--data)."""
        return f"{self.key}.urls" if self.key.endswith("]") else self.key


@dataclass
class Source:
    """A resolved source: the shard URLs of one split and what is known of their sizes.

    ``shard_samples`` holds the counts found per shard (possibly only some shards); ``samples``
    is the total when it is known (every shard counted, or the ``samples`` key). ``prepared`` is
    the folder when the source was written by our prepare commands.
    """

    name: str
    key: str
    shards: list[str]
    shard_samples: dict[str, int] = field(default_factory=dict)
    samples: int | None = None
    weight: float = 1.0
    tokens: int | None = None
    prepared: Path | None = None
    counted_from: str | None = None  # "manifest", "sizes.json", "_stats.json", "parquet", "samples"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shards": len(self.shards), "samples": self.samples, "weight": self.weight,
                "tokens": self.tokens, "prepared": str(self.prepared) if self.prepared else None,
                "counted_from": self.counted_from, "first_shard": self.shards[0] if self.shards else None}


# --------------------------------------------------------------------------------------------- opening shards


@dataclass(frozen=True)
class FetchPolicy:
    """How a shard that cannot be fetched is treated (``data.fetch_retries``, ``data.fetch_timeout``,
    ``data.fetch_backoff``): re-tried ``retries`` times, waiting ``backoff`` seconds doubled at each
    try (capped at a minute); a fetch that delivers no byte for ``timeout`` seconds fails like any
    other. A plain object so that DataLoader workers can unpickle it."""

    retries: int = 3
    timeout: float = 60.0
    backoff: float = 1.0

    @classmethod
    def of(cls, data_config) -> "FetchPolicy":
        """From the recipe's data section (or anything with fetch_retries / fetch_timeout / fetch_backoff)."""
        return cls(int(getattr(data_config, "fetch_retries", cls.retries)),
                   float(getattr(data_config, "fetch_timeout", cls.timeout)),
                   float(getattr(data_config, "fetch_backoff", cls.backoff)))

    def delay(self, failures: int) -> float:
        """Seconds to wait before the next try after ``failures`` failed ones (with up to 25% jitter,
        so that the ranks of a job do not return to a struggling server in step)."""
        return min(60.0, self.backoff * 2 ** max(0, failures - 1)) * (1 + 0.25 * _JITTER.random())


_JITTER = random.Random()  # not the global generator: timing must not shift seeded draws


class FetchError(OSError):
    """A shard that could not be fetched (an HTTP error status, a dropped connection, a ``pipe:``
    command that failed, an object store's error, no data for ``timeout`` seconds); names the URL."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason

    def __str__(self) -> str:  # webdataset appends to args; the message stays the URL and the reason
        return f"{self.url}: {self.reason}"


def open_shard(url: str, fetch: FetchPolicy | None = None):
    """A readable binary stream of the shard at ``url``: a local file, an http(s) body (urllib, with
    ``fetch.timeout`` on the connection and on every read), a ``pipe:`` command's output (its exit
    status checked at the end, ``fetch.timeout`` on every read) or an fsspec object. Any failure to
    fetch, now or while reading, raises `FetchError` naming the URL; a shard that is there but
    malformed is left to the tar reader (a bad shard, not an unreachable one)."""
    fetch = fetch or FetchPolicy()
    scheme = _scheme(url)
    if scheme == "":
        return open(url, "rb")
    if scheme == "file":
        return open(urlparse(url).path, "rb")
    if scheme in CURL_SCHEMES:
        return _HttpShard(url, fetch.timeout)
    if scheme == "pipe":
        return _PipeShard(url, fetch.timeout)
    if scheme in FSSPEC_SCHEMES:
        return _FsspecShard(url)
    import webdataset.gopen as wgopen

    try:
        return wgopen.gopen(url, "rb")  # another scheme webdataset knows (ais:, hf:, sftp: ...)
    except Exception as e:  # noqa: BLE001 - its handlers raise what they like
        raise FetchError(url, f"{type(e).__name__}: {e}") from None


class _Shard:
    """What the tar reader needs of a stream: read(n) (n bytes unless the shard ends) and close()."""

    url = ""

    def readable(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _HttpShard(_Shard):
    """An http(s) shard read with urllib: an error status, a refused, reset or dropped connection, a
    body shorter than its Content-Length, or ``timeout`` seconds without a byte raise FetchError."""

    def __init__(self, url: str, timeout: float):
        import http.client

        self.url, self.timeout, self.got = url, timeout, 0
        try:
            self.resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - the user's own URL
        except urllib.error.HTTPError as e:
            e.close()
            raise FetchError(url, f"HTTP {e.code} {e.reason}") from None
        except TimeoutError:
            raise FetchError(url, f"no response for {timeout:g} s (data.fetch_timeout)") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise FetchError(url, f"no response for {timeout:g} s (data.fetch_timeout)") from None
            raise FetchError(url, f"{type(e.reason).__name__}: {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:
            raise FetchError(url, f"{type(e).__name__}: {e or 'connection closed before a response'}") from None
        length = self.resp.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None

    def read(self, n: int = -1) -> bytes:
        import http.client

        try:
            data = self.resp.read(n)
        except TimeoutError:
            raise FetchError(self.url, f"no data for {self.timeout:g} s after {self.got} bytes "
                                       "(data.fetch_timeout)") from None
        except http.client.IncompleteRead as e:
            raise FetchError(self.url, f"connection closed after {self.got + len(e.partial)} bytes"
                                       + (f" of {self.length}" if self.length else "")) from None
        except (OSError, http.client.HTTPException) as e:
            raise FetchError(self.url, f"{type(e).__name__} after {self.got} bytes: {e}") from None
        self.got += len(data)
        if not data and n != 0 and self.length is not None and self.got < self.length:
            raise FetchError(self.url, f"connection closed after {self.got} of {self.length} bytes")
        return data

    def close(self) -> None:
        self.resp.close()


class _PipeShard(_Shard):
    """A ``pipe:`` command's output: no byte for ``timeout`` seconds, or an exit status other than 0
    (or 141, SIGPIPE: the reader stopped early) at the end of the output, raise FetchError with the
    end of the command's stderr."""

    def __init__(self, url: str, timeout: float):
        import subprocess
        import tempfile

        self.url, self.timeout, self.got = url, timeout, 0
        self.err = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE,  # noqa: S602
                                         stderr=self.err, stdin=subprocess.DEVNULL)
        except OSError as e:
            self.err.close()
            raise FetchError(url, f"cannot start the command: {e}") from None
        self.fd = self.proc.stdout.fileno()

    def _stderr(self) -> str:
        self.err.seek(0)
        text = self.err.read()[-400:].decode("utf-8", "replace").strip()
        return f": {text}" if text else ""

    def read(self, n: int = -1) -> bytes:
        import select

        chunks, want = [], n if n >= 0 else 1 << 62
        while want > 0:
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            if not ready:
                self._kill()
                raise FetchError(self.url, f"no data for {self.timeout:g} s after {self.got} bytes "
                                           f"(data.fetch_timeout){self._stderr()}")
            data = os.read(self.fd, min(want, 1 << 20))
            if not data:
                self._check_exit()
                break
            chunks.append(data)
            self.got += len(data)
            want -= len(data)
        return b"".join(chunks)

    def _check_exit(self) -> None:
        import subprocess

        try:
            code = self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            raise FetchError(self.url, f"the command closed its output but did not exit within {self.timeout:g} s") from None
        if code not in (0, 141, -13):
            raise FetchError(self.url, f"the command exited with status {code} after {self.got} bytes{self._stderr()}")

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.proc.stdout.close()
        self._kill()  # the reader may stop at the archive's end marker, before the command's own end
        self.err.close()


class _FsspecShard(_Shard):
    """An fsspec object (s3://, gs://, az://): the backend's errors (missing object, credentials,
    network, its own timeouts) raise FetchError naming the URL."""

    def __init__(self, url: str):
        self.url = url
        try:
            self.f = _gopen_fsspec(url)
        except Exception as e:  # noqa: BLE001 - botocore, aiohttp, gcsfs raise their own types
            raise FetchError(url, f"{type(e).__name__}: {e}") from None

    def read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except Exception as e:  # noqa: BLE001
            raise FetchError(self.url, f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        try:
            self.f.close()
        except Exception:  # noqa: BLE001 - closing a half-read object
            pass


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset's opener for fsspec URLs: a streaming file object (s3fs reads in blocks)."""
    import fsspec

    return fsspec.open(url, mode).open()


def register_fsspec_schemes() -> None:
    """Let webdataset (the loaders' tar reader) open s3:// gs:// az:// through fsspec. Called
    at import, so DataLoader workers, which unpickle a data object of this module, have it too."""
    import importlib

    # import_module: the package's attribute "gopen" is the function, which shadows the module
    schemes = importlib.import_module("webdataset.gopen").gopen_schemes
    for scheme in FSSPEC_SCHEMES:
        schemes[scheme] = _gopen_fsspec


register_fsspec_schemes()


def _scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    s = urlparse(url).scheme
    return s if len(s) > 1 else ""  # "C:" is a drive, not a scheme


def _fsspec_fs(url: str, key: str):
    import fsspec

    scheme = _scheme(url)
    try:
        return fsspec.filesystem(scheme)
    except ImportError as e:
        raise SourceError(f"{key}: {url}: reading {scheme}:// needs {FSSPEC_EXTRAS.get(scheme, 'its fsspec backend')} ({e})") from None
    except ValueError as e:
        raise SourceError(f"{key}: {url}: {e}") from None


# --------------------------------------------------------------------------------------------- expansion


def is_prepared(location: str) -> bool:
    """A local folder written by prepare-text or prepare-image-text."""
    return _scheme(location) == "" and (Path(location) / MANIFEST_NAME).is_file()


def expand_urls(urls: str | Sequence[str], key: str = "data.sources[0].urls") -> list[str]:
    """Every shard URL a source string (or list of them) names, in order; raises SourceError
    naming ``key`` for a pattern that matches nothing or a path that does not exist."""
    out: list[str] = []
    for url in ([urls] if isinstance(urls, str) else list(urls)):
        url = url.strip()
        if not url:
            raise SourceError(f"{key}: an empty source string")
        out.extend(_expand_one(url, key))
    if not out:
        raise SourceError(f"{key}: {urls} names no shards")
    return out


def _expand_one(url: str, key: str) -> list[str]:
    scheme = _scheme(url)
    if scheme in ("pipe", *CURL_SCHEMES):
        if scheme != "pipe" and any(c in url for c in _GLOB_CHARS):
            raise SourceError(f"{key}: {url}: http(s) cannot be listed, so a glob cannot be expanded; "
                              "use a brace pattern such as {00000..00099}")
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
        raise SourceError(f"{key}: {folder} is a prepared folder; name it alone as a source (its manifest gives "
                          "its splits), not inside a list or pattern")
    tars = sorted(str(p) for p in folder.glob("*.tar"))
    if not tars:
        raise SourceError(f"{key}: {folder} has no manifest.json (not written by prepare-text or prepare-image-text) "
                          "and no *.tar shards")
    return tars


def _expand_fsspec(url: str, key: str) -> list[str]:
    fs = _fsspec_fs(url, key)
    scheme = _scheme(url)
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


# --------------------------------------------------------------------------------------------- counts


def shard_location(url: str) -> str | None:
    """Where a shard's sibling files (sizes.json, _stats.json) can be read: the URL itself, or for
    a ``pipe:`` command its argument ending in .tar (``pipe:aws s3 cp s3://b/00000.tar -``)."""
    if _scheme(url) != "pipe":
        return url
    try:
        words = shlex.split(url[len("pipe:"):])
    except ValueError:
        return None
    return next((w for w in reversed(words) if w.endswith(".tar")), None)


def _read_bytes(location: str, timeout: float = 30.0) -> bytes | None:
    """A small file's bytes, or None when it does not exist (any failure reads as absent: the
    count is then unknown, which is reported where a count is needed)."""
    scheme = _scheme(location)
    try:
        if scheme in CURL_SCHEMES:
            with urllib.request.urlopen(location, timeout=timeout) as r:  # noqa: S310 - the user's own URL
                return r.read()
        if scheme in ("", "file"):
            path = urlparse(location).path if scheme == "file" else location
            return Path(path).read_bytes()
        import fsspec

        with fsspec.open(location, "rb") as f:
            return f.read()
    except (OSError, urllib.error.URLError, ValueError, ImportError):
        return None
    except Exception:  # noqa: BLE001 - backends raise their own types (botocore's ClientError)
        return None


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


# --------------------------------------------------------------------------------------------- resolution


def _default_name(spec: SourceSpec, index: int) -> str:
    if spec.name:
        return spec.name
    first = spec.urls if isinstance(spec.urls, str) else spec.urls[0]
    loc = shard_location(first) or first
    head = loc.rstrip("/")
    if head.endswith(".tar") or any(c in head for c in "{*?["):
        head = head.rpartition("/")[0]
    return head.rpartition("/")[2] or f"source{index}"


def resolve_source(spec: SourceSpec, split: str = "train", index: int = 0, count: bool = True) -> Source:
    """Shards and counts of one source for ``split``: a prepared folder gives that split of its
    manifest; raw shards are the same whatever the split (held-out samples are chosen by key)."""
    name = _default_name(spec, index)
    only = spec.urls if isinstance(spec.urls, str) else (spec.urls[0] if len(spec.urls) == 1 else None)
    if only is not None and is_prepared(only):
        root = Path(only)
        try:
            manifest = read_manifest(root)
        except ValueError as e:
            raise SourceError(f"{spec.key}: {e}") from None
        info = manifest.get("splits", {}).get(split)
        if info is None:
            raise SourceError(f"{spec.key}: {root}/manifest.json has no split {split!r} "
                              f"(have {sorted(manifest.get('splits', {}))})")
        shards = [str(root / s) for s in info["shards"]]
        per = info.get("shard_samples")
        counts = dict(zip(shards, map(int, per))) if per and len(per) == len(shards) else {}
        total = spec.samples if spec.samples is not None else int(info.get("samples", 0))
        return Source(name, spec.key, shards, counts, total, spec.weight, spec.tokens, root, "manifest")
    shards = expand_urls(spec.urls, spec.urls_key)
    counts, how = count_shards(shards) if count else ({}, None)
    total = None
    if spec.samples is not None:
        total, how = spec.samples, "samples"
    elif len(counts) == len(shards):
        total = sum(counts.values())
    return Source(name, spec.key, shards, counts, total, spec.weight, spec.tokens, None, how)


def held_out(key: str, fraction: float) -> bool:
    """Whether the sample with this key is held out for evaluation (stable everywhere)."""
    return fraction > 0 and split_hash(key.encode("utf-8"), HOLDOUT_SEED) < fraction


@dataclass(frozen=True)
class KeyFilter:
    """Keeps the samples of ``urls`` whose key is (``want=True``) or is not held out; samples of
    other shards pass. A plain object so that DataLoader workers can unpickle it."""

    urls: frozenset
    fraction: float
    want: bool

    def __call__(self, sample: dict) -> bool:
        if sample.get("__url__") not in self.urls:
            return True
        return held_out(str(sample.get("__key__", "")), self.fraction) == self.want


class SourceData:
    """The loaders' view of a run's sources: what a prepared folder offers (``shards(split)``,
    ``shard_samples(split)``, ``num_samples(split)``, ``keep(split)``) over several sources,
    prepared or raw, plus ``sources`` (the train sources with their weights, for mixing).

    Splits: ``train`` is every train source's train shards; the evaluation split is the
    ``eval_sources`` when given, else the prepared sources' own val split plus the held-out
    ``holdout`` fraction of the raw sources' samples. ``test`` exists for prepared sources only.
    """

    KIND = ""
    caption_key = "txt"  # image-text: the member holding a raw sample's caption (data.caption_key)

    def __init__(self, sources: Sequence[Source], eval_sources: Sequence[Source] = (), holdout: float = 0.0,
                 per_split: dict[str, list[Source]] | None = None, label: str = "data.sources"):
        self.sources = list(sources)
        self.eval_sources = list(eval_sources)
        self.holdout = holdout
        self.root = label  # messages and the loader's replay cache name the data by this
        self._per_split = per_split or {}  # prepared sources' other splits, by split name
        self._raw_urls = frozenset(u for s in self.sources if s.prepared is None for u in s.shards)
        splits = {"train": self.split_sources("train")}
        for split in self._per_split:
            splits.setdefault(split, self.split_sources(split))
        splits.setdefault("val", self.split_sources("val"))
        self.manifest = {"kind": self.KIND, "splits": {
            name: {"shards": [u for s in srcs for u in s.shards], "samples": self.num_samples(name)}
            for name, srcs in splits.items()}}

    # -- splits
    def split_sources(self, split: str) -> list[Source]:
        if split == "train":
            return self.sources
        if split == "val" and self.eval_sources:
            return self.eval_sources
        prepared = list(self._per_split.get(split, []))
        if split == "val" and self.holdout > 0:
            prepared += [s for s in self.sources if s.prepared is None]
        return prepared

    def shards(self, split: str) -> list[str]:
        srcs = self.split_sources(split)
        if not srcs and split not in ("train", "val"):
            raise ValueError(f"{self.root}: no {split!r} split: raw sources have train and a held-out val only "
                             "(prepare-image-text writes a test split)")
        return [u for s in srcs for u in s.shards]

    def shard_samples(self, split: str) -> dict[str, int] | None:
        """Samples per shard as written (before held-out keys are dropped), where known."""
        counts = {u: n for s in self.split_sources(split) for u, n in s.shard_samples.items()}
        return counts or None

    def num_samples(self, split: str) -> int | None:
        """Samples in the split, or None when unknown (a held-out fraction is known only by reading)."""
        srcs = self.split_sources(split)
        if not srcs or any(s.samples is None for s in srcs):
            return None if srcs else 0
        if split != "train" and not self.eval_sources and self.holdout > 0 and any(s.prepared is None for s in srcs):
            return None
        return sum(int(s.samples) for s in srcs)

    def keep(self, split: str) -> KeyFilter | None:
        """The per-sample filter of a split that shares raw shards with another (held-out keys)."""
        if self.holdout <= 0 or not self._raw_urls or (split == "val" and self.eval_sources):
            return None
        if split == "train":
            return KeyFilter(self._raw_urls, self.holdout, want=False)
        if split == "val":
            return KeyFilter(self._raw_urls, self.holdout, want=True)
        return None

    def origin(self, split: str) -> str:
        """Where a split's samples come from, in words (for a report of an empty split)."""
        if split == "val" and self.eval_sources:
            return "data.eval_sources " + ", ".join(s.name for s in self.eval_sources)
        parts = [f"the {split!r} split of {s.prepared}" for s in self.split_sources(split) if s.prepared]
        if split == "val" and self.holdout > 0:
            raw = [s.name for s in self.sources if s.prepared is None]
            if raw:
                parts.append(f"the samples of {', '.join(raw)} held out by data.holdout_fraction={self.holdout} "
                             "(by a hash of the sample key)")
        return "; ".join(parts) or "nothing"

    def require_samples(self, split: str, why: str) -> int:
        """The split's sample count, or a SourceError naming the key to set."""
        n = self.num_samples(split)
        if n is not None:
            return n
        unknown = [s for s in self.split_sources(split) if s.samples is None]
        names = ", ".join(f"{s.key}.samples" for s in unknown) or "eval.max_samples"
        raise SourceError(f"{why} needs the number of samples of the {split!r} split, which is unknown (no manifest, "
                          f"sizes.json, *_stats.json or parquet beside the shards); set {names}")

    def to_json(self) -> dict[str, Any]:
        return {"sources": [s.to_json() for s in self.sources],
                "eval_sources": [s.to_json() for s in self.eval_sources], "holdout_fraction": self.holdout}


def resolve_all(specs: Sequence[SourceSpec], eval_specs: Sequence[SourceSpec] = (), *, train_split: str = "train",
                eval_split: str = "val", extra_splits: Iterable[str] = ("test",)) -> tuple[list[Source], list[Source], dict[str, list[Source]]]:
    """Resolve train sources (their train split), eval sources (their eval split when prepared),
    and the prepared train sources' other splits; every problem is collected into one SourceError."""
    problems: list[str] = []
    train: list[Source] = []
    evals: list[Source] = []
    per_split: dict[str, list[Source]] = {}
    for i, spec in enumerate(specs):
        try:
            src = resolve_source(spec, train_split, i)
        except SourceError as e:
            problems.append(str(e))
            continue
        train.append(src)
        if src.prepared is not None:
            for split in (eval_split, *extra_splits):
                try:
                    per_split.setdefault(split, []).append(resolve_source(spec, split, i))
                except SourceError:
                    if split == eval_split and not eval_specs:
                        problems.append(f"{spec.key}: {src.prepared}/manifest.json has no {split!r} split")
    for i, spec in enumerate(eval_specs):
        try:
            evals.append(resolve_source(spec, eval_split, i))
        except SourceError as e:
            problems.append(str(e))
    names = [s.name for s in train]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"data.sources: names must differ (set 'name'): {', '.join(dupes)} appear more than once")
    if problems:
        raise SourceError("\n".join(problems))
    return train, evals, per_split


# --------------------------------------------------------------------------------------------- by kind


class TextSourceData(SourceData):
    """Text sources: folders written by prepare-text, all with one seq_len and one tokenizer."""

    KIND = "text"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        first = next(s for s in self.sources if s.prepared is not None)
        manifest = read_manifest(first.prepared)
        self.seq_len: int = int(manifest["seq_len"])
        self.vocab_size: int | None = manifest.get("tokenizer", {}).get("vocab_size")
        self.chat: bool = manifest.get("format") == PACKED_FORMAT  # windows with loss masks (chat records)
        self.manifest["seq_len"] = self.seq_len
        self.manifest["tokenizer"] = {**manifest.get("tokenizer", {}),
                                      "path": str((first.prepared / manifest["tokenizer"]["path"]).resolve())}

    def tokenizer_path(self) -> Path:
        return Path(self.manifest["tokenizer"]["path"])


class ImageTextSourceData(SourceData):
    """Image-text sources: prepared folders and raw img2dataset / OpenCLIP shards, mixed freely."""

    KIND = "image-text"
    image_size = None

    def _prepared_manifests(self) -> list[tuple[Path, dict]]:
        return [(s.prepared, read_manifest(s.prepared)) for s in self.sources if s.prepared is not None]

    def tokenizer_path(self) -> Path | None:
        """The caption tokenizer of the first prepared source that has one (raw shards have none)."""
        for root, manifest in self._prepared_manifests():
            info = manifest.get("tokenizer")
            if info:
                return root / info["path"]
        return None

    def classes(self) -> dict[str, Any] | None:
        """A class list for zero-shot evaluation: only when the evaluation data is one prepared folder's."""
        evals = self.split_sources("val")
        if len(evals) != 1 or evals[0].prepared is None or (self.holdout > 0 and self._raw_urls):
            return None
        manifest = read_manifest(evals[0].prepared)
        name = manifest.get("classes")
        if not name:
            return None
        path = evals[0].prepared / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read class list {path}: {exc}") from None


_KINDS = {"text": TextSourceData, "image-text": ImageTextSourceData}
_MAKERS = {"text": "prepare-text", "image-text": "prepare-image-text"}


def open_sources(kind: str, specs: Sequence[SourceSpec], eval_specs: Sequence[SourceSpec] = (),
                 holdout: float | None = None, *, train_split: str = "train", eval_split: str = "val") -> SourceData:
    """The data object of a run's sources, checked: every problem in one SourceError naming its key.

    ``holdout`` None means: hold out `AUTO_HOLDOUT` of the raw train sources' samples when there
    are raw train sources and no eval sources (so a run on raw shards always has a val split
    that it never trains on), else nothing.
    """
    train, evals, per_split = resolve_all(specs, eval_specs, train_split=train_split, eval_split=eval_split)
    problems: list[str] = []
    for src in [*train, *evals]:
        if src.prepared is not None:
            got = read_manifest(src.prepared).get("kind")
            if got != kind:
                problems.append(f"{src.key}: {src.prepared} holds {got!r} data, this run reads {kind!r} data "
                                f"(written by {_MAKERS[kind]})")
        elif kind == "text":
            problems.append(f"{src.key}: {src.shards[0]}...: text sources must be folders written by prepare-text "
                            "(raw shards carry neither the tokenizer nor the sequence length)")
    if kind == "text" and not problems:
        first = read_manifest(train[0].prepared)
        for src in train[1:] + evals:
            other = read_manifest(src.prepared)
            if other.get("format") != first.get("format"):
                problems.append(f"{src.key}: {src.prepared} holds {other.get('format') or 'plain'} windows, "
                                f"{train[0].key} {first.get('format') or 'plain'} ones (chat and plain text do not mix)")
            if other.get("seq_len") != first.get("seq_len"):
                problems.append(f"{src.key}: seq_len {other.get('seq_len')} differs from {train[0].key}'s "
                                f"{first.get('seq_len')}")
            if _tokenizer_bytes(src.prepared, other) != _tokenizer_bytes(train[0].prepared, first):
                problems.append(f"{src.key}: {src.prepared} was tokenized with another tokenizer than {train[0].prepared} "
                                "(prepare both with the same --tokenizer)")
    raw = any(s.prepared is None for s in train)
    if holdout is None:
        holdout = AUTO_HOLDOUT if raw and not evals else 0.0
    if problems:
        raise SourceError("\n".join(problems))
    return _KINDS[kind](train, evals, holdout, per_split)


def _tokenizer_bytes(root: Path, manifest: dict) -> bytes | None:
    path = root / manifest.get("tokenizer", {}).get("path", "tokenizer") / "tokenizer.json"
    return path.read_bytes() if path.is_file() else None


def one_source_string(value: str) -> list[SourceSpec]:
    """``--data`` (or data.path) given one source string that is not a prepared folder."""
    return [SourceSpec(urls=value, key="data.path")]
