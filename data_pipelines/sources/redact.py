"""Secrets in URLs: a password in ``https://user:pass@host/...`` and the values of a query string
(a presigned URL's ``X-Amz-Signature``, a SAS token) let anyone who reads them fetch the data. They
work when fetching (`data_pipelines.sources.transports`) and never appear in a log line, an error,
``resolved-config.json``, metrics or a model card: everything the toolkit writes about a URL goes
through `redact`."""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit, urlunsplit

HIDDEN = "***"
# scheme://user:password@ anywhere in a text (a message may quote a URL among other words)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]*):(?P<pw>[^/\s@]*)@")
# ?name=value&... inside a text, after a URL or a bare path (a library's message may quote only the
# path and query): every value hidden
_QUERY = re.compile(r"\?(?P<query>[^\s#'\"?]*=[^\s#'\"]*)")


def _hide_query(query: str) -> str:
    parts = []
    for item in query.split("&"):
        name, eq, _ = item.partition("=")
        parts.append(f"{name}={HIDDEN}" if eq else item)
    return "&".join(parts)


def redact(text: str) -> str:
    """``text`` (a URL, or a message quoting URLs) with every URL's password and query values
    replaced by ***; the rest (scheme, user, host, path) kept, so the message still says where."""
    if not isinstance(text, str) or not ("://" in text or "?" in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{HIDDEN}@", text)
    return _QUERY.sub(lambda m: f"?{_hide_query(m['query'])}", text)


def redact_all(value):
    """`redact` applied to every string of a JSON-like value (dicts, lists), for files a run writes."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_all(v) for v in value]
    return value


def credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """(the URL without its user:password, the (user, password) for HTTP basic auth or None)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    bare = SplitResult(parts.scheme, host, parts.path, parts.query, parts.fragment)
    return urlunsplit(bare), (parts.username or "", parts.password or "")
