"""Transports: a readable stream of one shard, wherever it lives (a local file, http(s) through
urllib, a ``pipe:`` command, an fsspec object store), with timeouts, and a failure to fetch it
raised as `FetchError` naming the URL; `FetchPolicy` says how such a failure is retried.
"""

from __future__ import annotations

import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlparse

# Read through fsspec (webdataset's own "gs" handler shells out to gsutil; fsspec needs no CLI).
FSSPEC_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")
FSSPEC_EXTRAS = {
    "s3": "s3fs (pip install 'ds-pretrain[s3]')",
    "gs": "gcsfs (pip install 'ds-pretrain[gcs]')",
    "gcs": "gcsfs (pip install 'ds-pretrain[gcs]')",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
}
CURL_SCHEMES = ("http", "https")


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
    def of(cls, data_config) -> FetchPolicy:
        """From the recipe's data section (or anything with fetch_retries / fetch_timeout / fetch_backoff)."""
        return cls(
            int(getattr(data_config, "fetch_retries", cls.retries)),
            float(getattr(data_config, "fetch_timeout", cls.timeout)),
            float(getattr(data_config, "fetch_backoff", cls.backoff)),
        )

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
    scheme = url_scheme(url)
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
            raise FetchError(
                self.url, f"no data for {self.timeout:g} s after {self.got} bytes (data.fetch_timeout)"
            ) from None
        except http.client.IncompleteRead as e:
            raise FetchError(
                self.url,
                f"connection closed after {self.got + len(e.partial)} bytes"
                + (f" of {self.length}" if self.length else ""),
            ) from None
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
            self.proc = subprocess.Popen(
                url[len("pipe:") :],
                shell=True,
                stdout=subprocess.PIPE,  # noqa: S602
                stderr=self.err,
                stdin=subprocess.DEVNULL,
            )
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
                raise FetchError(
                    self.url,
                    f"no data for {self.timeout:g} s after {self.got} bytes (data.fetch_timeout){self._stderr()}",
                )
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
            raise FetchError(
                self.url, f"the command closed its output but did not exit within {self.timeout:g} s"
            ) from None
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
    at import, so DataLoader workers, which unpickle a data object of this package, have it too."""
    import importlib

    # import_module: the package's attribute "gopen" is the function, which shadows the module
    schemes = importlib.import_module("webdataset.gopen").gopen_schemes
    for scheme in FSSPEC_SCHEMES:
        schemes[scheme] = _gopen_fsspec


register_fsspec_schemes()


def url_scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    s = urlparse(url).scheme
    return s if len(s) > 1 else ""  # "C:" is a drive, not a scheme
