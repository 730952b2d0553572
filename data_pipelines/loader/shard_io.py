"""Reading shards: the raw samples of tar shards opened where they live, a fetch that fails
retried with backoff and then given up as unreachable, and a shard shorter than its manifest
says noticed.
"""

from __future__ import annotations

import logging
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import webdataset as wds

from data_pipelines import limits
from data_pipelines.loader.accounting import SkipLog, unreachable_count
from data_pipelines.sources.redact import redact
from data_pipelines.sources.transports import FetchError, FetchPolicy, open_shard

logger = logging.getLogger("data_pipelines.loader")


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members such as __index__


def _tar_members(stream: Any, url: str, handler: Callable[[Exception], bool], stop: list[bool]) -> Iterator[dict]:
    """webdataset's tar_file_iterator, but a member whose size header is over --max-member-bytes
    (`limits`) is passed over unread, its data None (the sample is then dropped, `read_samples`).
    An error ends the shard; `stop` is set when the handler also ends the stream."""
    cap = limits.current().max_member_bytes
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            if not info.isreg() or info.name is None or _META.match(info.name):
                continue
            handle = None if info.size > cap else tar.extractfile(info)
            yield {"fname": info.name, "data": None if handle is None else handle.read(), "__url__": url}
            tar.members = []  # a streamed tar keeps no member list
    except Exception as exn:  # noqa: BLE001 - webdataset's convention: the handler decides
        exn.args = (f"{exn.args[0] if exn.args else exn} @ {url}", *exn.args[1:])
        if not handler(exn):
            stop.append(True)


def _oversized(sample: dict) -> list[str]:
    return sorted(k for k, v in sample.items() if v is None and not k.startswith("__"))


def read_samples(
    urls: Iterable[str], handler: Callable[[Exception], bool] | None = None, fetch: FetchPolicy | None = None
) -> Iterator[dict]:
    """Raw samples (key -> bytes) of tar shards: each shard opened by `data_pipelines.sources.open_shard`
    (local files, http(s) and ``pipe:`` with ``fetch.timeout``, fsspec) and read by webdataset's tar
    expander and grouping. An error goes to ``handler`` (webdataset's convention: True skips the
    shard, False ends the stream); without one it is raised. The stream is closed (a ``pipe:``
    command ended) when the shard is done or abandoned. A sample with a member over
    --max-member-bytes (its size header; the member is never read) is dropped and
    `limits.TooLarge` goes to the handler (True: go on)."""
    raise_ = handler or wds.reraise_exception
    for url in urls:
        try:
            stream = open_shard(url, fetch)
        except Exception as exn:  # noqa: BLE001 - FetchError, or a local file that cannot be opened
            if raise_(exn):
                continue
            return
        try:
            stop: list[bool] = []
            files = _tar_members(stream, url, raise_, stop)
            for sample in wds.tariterators.group_by_keys(files, handler=raise_):
                if big := _oversized(sample):
                    cap = limits.current().max_member_bytes
                    where = f"{url}:{sample.get('__key__', '?')}"
                    if raise_(limits.TooLarge(limits.TOO_LARGE, f"{where}: members {big} over {cap:,} bytes")):
                        continue
                    return
                yield sample
            if stop:
                return
        finally:
            stream.close()


class ShardUnreachable(Exception):
    """A shard that could not be fetched after ``data.fetch_retries`` retries; ``samples`` of it
    had been read (and handed on) before the last failure."""

    def __init__(self, url: str, tries: int, samples: int, last: FetchError):
        super().__init__(
            f"{redact(url)}: unreachable after {tries} tries ({last.reason})"
            + (f"; {samples} samples read before" if samples else "")
        )
        self.url, self.tries, self.samples, self.last = redact(url), tries, samples, last


def read_shard(url: str, log: SkipLog, fetch: FetchPolicy | None = None, limit: int | None = None) -> Iterator[dict]:
    """The samples of one shard. A failure to fetch it (`FetchError`: an HTTP error, a dropped
    connection, a failed ``pipe:`` command, no data for ``fetch.timeout`` seconds) is retried up to
    ``fetch.retries`` times with doubling waits of ``fetch.backoff`` seconds, each try re-opening the
    shard and passing over the samples already handed on; then `ShardUnreachable`. Other errors
    (a malformed tar) go to ``log.handler`` (counted, the shard skipped). ``limit``: stop after that
    many samples, without fetching more (a shard found unreachable there when first read)."""
    fetch = fetch or FetchPolicy()

    def handler(exn: Exception) -> bool:
        if isinstance(exn, FetchError):
            raise exn
        if isinstance(exn, limits.TooLarge):  # one sample over a cap: counted by its reason
            log.add(exn.reason, str(exn))
            return True
        return log.handler(exn)

    done, failures = 0, 0
    while limit is None or done < limit:
        seen = 0
        try:
            for sample in read_samples([url], handler, fetch):
                seen += 1
                if seen <= done:
                    continue
                done += 1
                yield sample
                if limit is not None and done >= limit:
                    return
            return
        except FetchError as e:
            failures += 1
            if failures > fetch.retries:
                raise ShardUnreachable(url, failures, done, e) from None
            wait = fetch.delay(failures)
            logger.warning("%s (try %d of %d); trying again in %.1f s", e, failures, fetch.retries + 1, wait)
            time.sleep(wait)


def read_checked(
    urls: Iterable[str],
    log: SkipLog,
    expected: dict[str, int] | None = None,
    keep: Callable[[dict], bool] | None = None,
    fetch: FetchPolicy | None = None,
) -> Iterator[dict]:
    """read_samples, shard by shard, that also notices a shard yielding fewer samples than the
    manifest says: a tar cut at a member boundary ends without any error, and its lost samples
    are counted (reason "short_shard") and the shard named. A shard that cannot be fetched after
    retries (`read_shard`) is counted as "shard_unreachable" (its missing samples where known).
    ``keep`` (a split's filter of held-out keys, `data_pipelines.sources.KeyFilter`) drops samples
    after they are counted."""
    for url in urls:
        n = 0
        want = (expected or {}).get(url)
        too_large = log.counts[limits.TOO_LARGE]
        try:
            for sample in read_shard(url, log, fetch):
                n += 1
                if keep is None or keep(sample):
                    yield sample
        except ShardUnreachable as e:
            log.add("shard_unreachable", str(e), count=unreachable_count(want, n))
            continue
        n += log.counts[limits.TOO_LARGE] - too_large  # dropped over a cap: counted already
        if want is not None and n < want:
            log.add("short_shard", f"{url}: {n} of {want} samples (truncated?)", count=want - n)
