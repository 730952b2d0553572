"""Hold-out: the fraction of raw sources' samples kept for evaluation, chosen by a stable hash of
the sample's content (its image's bytes, else its text), so that no held-out sample is ever trained
on, whatever the world size, order or resume, and a byte-identical copy under another key (a web
crawl holds many) lands on the same side. The bytes are in hand anyway: the filter runs on the raw
sample just read, before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipelines.splits import split_hash

# Fixed, not the training seed: a rerun with another --seed must hold out the same samples.
HOLDOUT_SEED = 0x5EED
AUTO_HOLDOUT = 0.01


# The fields that are a sample's content, in the order they are looked for: an image-text pair is
# its image (the same picture under two captions is still one picture), a text sample its text.
# Metadata (img2dataset's .json holds the key and the URL) is not content.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
TEXT_FIELDS = ("txt", "text", "caption")


def held_out(content: bytes | str, fraction: float) -> bool:
    """Whether the sample with this content (`sample_content`) is held out (stable everywhere)."""
    data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
    return fraction > 0 and split_hash(data, HOLDOUT_SEED) < fraction


def sample_content(sample: dict) -> bytes:
    """The bytes a sample's hold-out is decided by: its image, else its text, else every field but
    the metadata, else (nothing else) its key."""
    for name in (*IMAGE_FIELDS, *TEXT_FIELDS):
        value = sample.get(name)
        if isinstance(value, (bytes, bytearray, str)):
            return value.encode("utf-8") if isinstance(value, str) else bytes(value)
    rest = [
        name.encode() + b"\0" + (v.encode("utf-8") if isinstance(v, str) else bytes(v))
        for name, v in sorted(sample.items())
        if not name.startswith("__") and name != "json" and isinstance(v, (bytes, bytearray, str))
    ]
    return b"\0".join(rest) if rest else str(sample.get("__key__", "")).encode("utf-8")


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
        return held_out(sample_content(sample), self.fraction) == self.want
