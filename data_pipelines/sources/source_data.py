"""The data object of a run's sources: what the loaders read (splits, shards, counts, the
held-out filter, the weighted train sources), by kind of data, opened and checked in one go.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipelines.manifest import read_manifest
from data_pipelines.sources.expand import SourceError
from data_pipelines.sources.holdout import AUTO_HOLDOUT, KeyFilter
from data_pipelines.sources.spec import Source, SourceSpec, resolve_all
from data_pipelines.text.packed import FORMAT as PACKED_FORMAT


class SourceData:
    """The loaders' view of a run's sources: what a prepared folder offers (``shards(split)``,
    ``shard_samples(split)``, ``num_samples(split)``, ``keep(split)``) over several sources,
    prepared or raw, plus ``sources`` (the train sources with their weights, for mixing).

    Splits: ``train`` is every train source's train shards; the evaluation split is the
    ``eval_sources`` when given, else the prepared sources' own val split plus the held-out
    ``holdout`` fraction of the raw sources' samples. ``test`` exists for prepared sources only.
    """

    KIND = ""
    chat = False  # text sources read it from their manifests
    seq_len: int | None = None
    fetch = None  # pretrain.run.data sets the recipe's FetchPolicy
    caption_key = "txt"  # image-text: the member holding a raw sample's caption (data.caption_key)

    def __init__(
        self,
        sources: Sequence[Source],
        eval_sources: Sequence[Source] = (),
        holdout: float = 0.0,
        per_split: dict[str, list[Source]] | None = None,
        label: str = "data.sources",
    ):
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
        self.manifest = {
            "kind": self.KIND,
            "splits": {
                name: {"shards": [u for s in srcs for u in s.shards], "samples": self.num_samples(name)}
                for name, srcs in splits.items()
            },
        }

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
            raise ValueError(
                f"{self.root}: no {split!r} split: raw sources have train and a held-out val only "
                "(prepare-image-text writes a test split)"
            )
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
                parts.append(
                    f"the samples of {', '.join(raw)} held out by data.holdout_fraction={self.holdout} "
                    "(by a hash of the sample's content)"
                )
        return "; ".join(parts) or "nothing"

    def require_samples(self, split: str, why: str) -> int:
        """The split's sample count, or a SourceError naming the key to set."""
        n = self.num_samples(split)
        if n is not None:
            return n
        unknown = [s for s in self.split_sources(split) if s.samples is None]
        names = ", ".join(f"{s.key}.samples" for s in unknown) or "eval.max_samples"
        raise SourceError(
            f"{why} needs the number of samples of the {split!r} split, which is unknown (no manifest, "
            f"sizes.json, *_stats.json or parquet beside the shards); set {names}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": [s.to_json() for s in self.sources],
            "eval_sources": [s.to_json() for s in self.eval_sources],
            "holdout_fraction": self.holdout,
        }


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
        self.manifest["tokenizer"] = {
            **manifest.get("tokenizer", {}),
            "path": str((first.prepared / manifest["tokenizer"]["path"]).resolve()),
        }

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


def open_sources(
    kind: str,
    specs: Sequence[SourceSpec],
    eval_specs: Sequence[SourceSpec] = (),
    holdout: float | None = None,
    *,
    train_split: str = "train",
    eval_split: str = "val",
) -> SourceData:
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
                problems.append(
                    f"{src.key}: {src.prepared} holds {got!r} data, this run reads {kind!r} data "
                    f"(written by {_MAKERS[kind]})"
                )
        elif kind == "text":
            problems.append(
                f"{src.key}: {src.shards[0]}...: text sources must be folders written by prepare-text "
                "(raw shards carry neither the tokenizer nor the sequence length)"
            )
    if kind == "text" and not problems:
        first = read_manifest(train[0].prepared)
        for src in train[1:] + evals:
            other = read_manifest(src.prepared)
            if other.get("format") != first.get("format"):
                problems.append(
                    f"{src.key}: {src.prepared} holds {other.get('format') or 'plain'} windows, "
                    f"{train[0].key} {first.get('format') or 'plain'} ones "
                    "(chat and plain text do not mix)"
                )
            if other.get("seq_len") != first.get("seq_len"):
                problems.append(
                    f"{src.key}: seq_len {other.get('seq_len')} differs from {train[0].key}'s {first.get('seq_len')}"
                )
            if _tokenizer_bytes(src.prepared, other) != _tokenizer_bytes(train[0].prepared, first):
                problems.append(
                    f"{src.key}: {src.prepared} was tokenized with another tokenizer than "
                    f"{train[0].prepared} (prepare both with the same --tokenizer)"
                )
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
