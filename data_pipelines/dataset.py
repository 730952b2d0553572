"""What every data object a run reads declares: a prepared folder (`data_pipelines.loader.PreparedShards`
and its text / image-text kinds), a run's sources (`data_pipelines.sources.SourceData`) or a
labelled image folder (`data_pipelines.image.folder.ImageFolder`). Readers use these attributes
as they are, with no ``getattr``/``hasattr`` probes: a data object that lacks one fails at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from data_pipelines.sources.spec import Source
    from data_pipelines.sources.transports import FetchPolicy


@runtime_checkable
class DataSet(Protocol):
    KIND: str  # "text", "image-text", "image-folder"
    root: Path | str  # the folder, or a label for a set of sources (messages name the data by it)
    chat: bool  # windows are packed conversations with assistant-only loss masks
    seq_len: int | None  # tokens per window (text), None for other kinds
    fetch: FetchPolicy | None  # retries and timeouts of shard fetches; None: the defaults
    sources: list[Source] | None  # weighted train sources to mix; None: one source, the train split

    def origin(self, split: str) -> str:
        """Where the split's samples come from, in words, for messages."""

    def to_json(self) -> dict[str, Any] | None:
        """The resolved sources for resolved-config.json; None for one prepared folder."""


@runtime_checkable
class ShardedDataSet(DataSet, Protocol):
    """A data set read from WebDataset shards (every kind but the image folder)."""

    def shards(self, split: str) -> list[str]: ...

    def num_samples(self, split: str) -> int: ...

    def shard_samples(self, split: str) -> dict[str, int] | None: ...

    def keep(self, split: str) -> Callable[[dict], bool] | None: ...
