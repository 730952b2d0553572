"""A prepared dataset folder: what `prepare-text` or `prepare-image-text` wrote, read through its
manifest (splits, shard paths and the samples of each shard).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from data_pipelines.manifest import read_manifest


class PreparedShards:
    """A prepared dataset directory: its manifest (checked to be of ``KIND``) and shard paths per split."""

    KIND = ""
    chat = False  # the text kind reads it from the manifest
    seq_len: int | None = None
    fetch = None  # a prepared folder is local: the default fetch policy
    sources = None  # one folder: nothing to mix

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if self.manifest.get("kind") != self.KIND:
            raise ValueError(
                f"{self.root}/manifest.json: kind is {self.manifest.get('kind')!r}, expected {self.KIND!r}"
            )

    def shards(self, split: str) -> list[str]:
        info = self.manifest["splits"].get(split)
        if info is None:
            raise ValueError(f"{self.root}/manifest.json: no split {split!r} (have {sorted(self.manifest['splits'])})")
        return [str(self.root / s) for s in info["shards"]]

    def num_samples(self, split: str) -> int:
        return int(self.manifest["splits"][split]["samples"])

    def shard_samples(self, split: str) -> dict[str, int] | None:
        """Samples per shard path as the manifest records them (None for manifests without them)."""
        info = self.manifest["splits"][split]
        counts = info.get("shard_samples")
        if counts is None or len(counts) != len(info["shards"]):
            return None
        return dict(zip(self.shards(split), map(int, counts)))

    def keep(self, split: str) -> Callable[[dict], bool] | None:
        """A filter of the split's samples (sources whose splits share shards have one); none here."""
        return None

    def origin(self, split: str) -> str:
        return f"the {split!r} split of {self.root}"

    def to_json(self) -> None:
        return None
