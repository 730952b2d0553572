"""Transports: a readable stream of one shard, wherever it lives (a local file, http(s) through
urllib, a ``pipe:`` command, an fsspec object store), with timeouts, and a failure to fetch it
raised as `FetchError` naming the URL; `FetchPolicy` says how such a failure is retried.
"""

from __future__ import annotations

import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlparse, urlsplit

from data_pipelines.sources.redact import credentials, redact

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
    # a source that trickles (a byte now and then, each within the timeout) fails too: after the
    # first ``timeout`` seconds of a shard it must average at least this many bytes a second
    min_rate: float = 1024.0
    # http(s) redirects: "same_host" follows only those to the same scheme and host; "any" all
    redirects: str = "same_host"

    @classmethod
    def of(cls, data_config) -> FetchPolicy:
        """From the recipe's data section (or anything with fetch_retries / fetch_timeout / fetch_backoff
        / fetch_min_rate / fetch_redirects)."""
        return cls(
            int(getattr(data_config, "fetch_retries", cls.retries)),
            float(getattr(data_config, "fetch_timeout", cls.timeout)),
            float(getattr(data_config, "fetch_backoff", cls.backoff)),
            float(getattr(data_config, "fetch_min_rate", cls.min_rate)),
            str(getattr(data_config, "fetch_redirects", cls.redirects)),
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
        url, reason = redact(url), redact(reason)  # a message never carries a password or a signature
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
        return _HttpShard(url, fetch.timeout, fetch.min_rate, fetch.redirects)
    if scheme == "pipe":
        check_pipe_allowed(url)
        return _PipeShard(url, fetch.timeout, fetch.min_rate)
    if scheme in FSSPEC_SCHEMES:
        return _FsspecShard(url)
    import webdataset.gopen as wgopen

    try:
        return wgopen.gopen(url, "rb")  # another scheme webdataset knows (ais:, hf:, sftp: ...)
    except Exception as e:  # noqa: BLE001 - its handlers raise what they like
        raise FetchError(url, f"{type(e).__name__}: {e}") from None


def check_pipe_allowed(url: str, key: str = "") -> None:
    """webdataset's switch: with WDS_SECURE=1 in the environment no ``pipe:`` command runs."""
    if os.environ.get("WDS_SECURE", "0") not in ("", "0"):
        where = f"{key}: " if key else ""
        raise FetchError(url, f"{where}pipe: sources run a shell command, and WDS_SECURE is set: refused")


class _Shard:
    """What the tar reader needs of a stream: read(n) (n bytes unless the shard ends) and close()."""

    url = ""
    got = 0
    waited = 0.0  # seconds spent waiting for the source inside read, not the reader's own pauses
    timeout = 60.0
    min_rate = 0.0

    def _check_rate(self) -> None:
        """Once the source has kept the reader waiting ``timeout`` seconds in all, fail a shard that
        delivered fewer than ``min_rate`` bytes a second of that waiting (data.fetch_min_rate): each
        read may arrive in time and the shard still never end. A slow reader (training between
        batches) does not count against the source."""
        if self.min_rate > 0 and self.waited > self.timeout and self.got < self.min_rate * self.waited:
            self._stop()
            raise FetchError(
                self.url,
                f"{self.got} bytes in {self.waited:.1f} s of waiting, below data.fetch_min_rate "
                f"{self.min_rate:g} bytes/s",
            )

    def _stop(self) -> None:
        self.close()

    def readable(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _HttpShard(_Shard):
    """An http(s) shard read with urllib: an error status, a refused, reset or dropped connection, a
    body shorter than its Content-Length, or ``timeout`` seconds without a byte raise FetchError."""

    def __init__(self, url: str, timeout: float, min_rate: float = 0.0, redirects: str = "same_host"):
        import http.client

        self.url, self.timeout, self.got, self.min_rate = url, timeout, 0, min_rate
        self._failed: FetchError | None = None
        bare, auth = credentials(url)  # urllib cannot use user:password in a URL: basic auth instead
        request = urllib.request.Request(bare)
        if auth is not None:
            import base64

            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_unredirected_header("Authorization", f"Basic {token}")
        opener = urllib.request.build_opener(_Redirects(redirects))
        try:
            self.resp = opener.open(request, timeout=timeout)  # noqa: S310 - the user's own URL
        except FetchError:
            raise
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
        """Up to n bytes (all when n < 0), gathered from what the connection hands over at a time, so
        that a trickle is noticed between pieces (`_check_rate`)."""
        if self._failed is not None:  # what arrived before the failure was handed out first
            raise self._failed
        chunks, want = [], (1 << 62) if n is None or n < 0 else n
        while want > 0:
            try:
                piece = self._read_some(min(want, 1 << 20))
            except FetchError as e:
                if not chunks:
                    raise
                self._failed = e
                break
            if not piece:
                break
            chunks.append(piece)
            want -= len(piece)
        return b"".join(chunks)

    def _read_some(self, n: int) -> bytes:
        import http.client

        self._check_rate()
        started = time.monotonic()
        try:
            data = self.resp.read1(n) if n > 0 else b""
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
        self.waited += time.monotonic() - started
        if not data and n != 0 and self.length is not None and self.got < self.length:
            raise FetchError(self.url, f"connection closed after {self.got} of {self.length} bytes")
        return data

    def close(self) -> None:
        self.resp.close()


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the same scheme and host (data.fetch_redirects: "same_host", the
    default): a shard server must not send the fetch (and any credentials) to another host, an
    internal address or from https down to http. "any" follows every redirect, as urllib does."""

    def __init__(self, policy: str):
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urlsplit(req.full_url), urlsplit(newurl)
        if self.policy != "any" and (old.scheme, old.netloc) != (new.scheme, new.netloc):
            raise FetchError(
                req.full_url,
                f"redirected ({code}) to {redact(newurl)}, another scheme or host; set data.fetch_redirects "
                '"any" to follow it',
            )
        new_req = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new_req is not None and auth and (old.scheme, old.netloc) == (new.scheme, new.netloc):
            new_req.add_unredirected_header("Authorization", auth)  # credentials go to their own host only
        return new_req


class _PipeShard(_Shard):
    """A ``pipe:`` command's output: no byte for ``timeout`` seconds, or an exit status other than 0
    (or 141, SIGPIPE: the reader stopped early) at the end of the output, raise FetchError with the
    end of the command's stderr."""

    def __init__(self, url: str, timeout: float, min_rate: float = 0.0):
        import subprocess
        import tempfile

        self.url, self.timeout, self.got, self.min_rate = url, timeout, 0, min_rate
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
            self._check_rate()
            started = time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            self.waited += time.monotonic() - started
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
