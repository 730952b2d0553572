"""Resolution: a source as the recipe names it (`SourceSpec`) resolved to the shard URLs of a split
and what is known of their sizes (`Source`): a prepared folder through its manifest, raw shards
by expanding the source string and counting beside them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipelines.manifest import MANIFEST_NAME, read_manifest
from data_pipelines.sources.counts import count_shards, shard_location
from data_pipelines.sources.expand import SourceError, expand_urls
from data_pipelines.sources.redact import redact
from data_pipelines.sources.transports import url_scheme


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
        return {
            "name": self.name,
            "shards": len(self.shards),
            "samples": self.samples,
            "weight": self.weight,
            "tokens": self.tokens,
            "prepared": str(self.prepared) if self.prepared else None,
            "counted_from": self.counted_from,
            "first_shard": self.shards[0] if self.shards else None,
        }


def is_prepared(location: str) -> bool:
    """A local folder written by prepare-text or prepare-image-text."""
    return url_scheme(location) == "" and (Path(location) / MANIFEST_NAME).is_file()


def _default_name(spec: SourceSpec, index: int) -> str:
    if spec.name:
        return spec.name
    first = spec.urls if isinstance(spec.urls, str) else spec.urls[0]
    loc = shard_location(first) or first
    if "://" in loc:  # a URL's query (a presigned signature) and password are not a name
        loc = redact(loc.split("?", 1)[0]).replace(":***@", "@")
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
            raise SourceError(
                f"{spec.key}: {root}/manifest.json has no split {split!r} (have {sorted(manifest.get('splits', {}))})"
            )
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


def resolve_all(
    specs: Sequence[SourceSpec],
    eval_specs: Sequence[SourceSpec] = (),
    *,
    train_split: str = "train",
    eval_split: str = "val",
    extra_splits: Iterable[str] = ("test",),
) -> tuple[list[Source], list[Source], dict[str, list[Source]]]:
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
