"""Decoding one member of a WebDataset sample, shared by the token loader and the chat (packed) loader."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def npy_member(data: Any, where: str, bad: type[Exception]) -> np.ndarray:
    """A ``.npy`` member as an array: webdataset hands raw bytes unless a decoder ran first.
    ``bad(reason, detail)`` is the caller's bad-sample exception, so an unreadable payload is
    skipped and counted like any other bad sample."""
    if not isinstance(data, (bytes, bytearray)):
        return data
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable payload is the same kind of bad sample
        raise bad("bad_npy", f"{where}: {type(e).__name__}: {e}") from None
