"""Data where it lives: a source named by a folder, a pattern or a URL, resolved to shard URLs and counts.

A source string (``data.path``, ``--data``, or ``urls`` of a ``data.sources`` entry) is one of

* a folder written by ``prepare-text`` / ``prepare-image-text`` (it holds ``manifest.json``): its
  splits, counts and tokenizer come from the manifest, as before;
* a folder of raw shards (img2dataset output: ``*.tar`` beside ``*_stats.json`` and ``*.parquet``);
* a local glob (``/data/*.tar``) or brace pattern (``/data/{00000..00099}.tar``);
* a ``pipe:`` command, brace-expanded into one command per shard (webdataset's convention:
  ``pipe:aws s3 cp s3://laion/{00000..41455}.tar -``);
* an ``http(s)://`` pattern (read with urllib, `open_shard`);
* an fsspec URL (``s3://``, ``gs://``, ``az://``; s3fs / gcsfs / adlfs installed as the extras
  ``ds-pretrain[s3]`` etc.): a pattern, a glob or a prefix listed for ``*.tar``, read through fsspec.

Sample counts are not needed to stream, only to plan (epochs, the size of an evaluation). They come
from, in order: the manifest; OpenCLIP's ``sizes.json`` beside the shards (``{"00000.tar": n}``);
img2dataset's ``{shard}_stats.json`` (``successes``) or ``{shard}.parquet`` (rows with status
``success``); otherwise a source's ``samples`` key gives its total. For a ``pipe:`` command the
shard's location is the command's argument ending in ``.tar``.

Raw sources have no splits of their own. Held-out data is either separate sources (``eval_sources``)
or a fraction of the train sources' samples chosen by a stable hash of the sample's content
(`held_out`): the train stream drops those samples and the val stream keeps only them, so no
held-out sample is ever trained on, whatever the world size, order or resume.

The stages, one module each: `transports` (opening a shard: http, ``pipe:``, fsspec; retries),
`expand` (source strings to shard URLs), `counts` (sample counts beside the shards), `holdout`
(held-out keys), `spec` (resolving a source) and `source_data` (the loaders' data object).
"""

from data_pipelines.sources.counts import count_shards, shard_location
from data_pipelines.sources.expand import SourceError, expand_urls
from data_pipelines.sources.holdout import AUTO_HOLDOUT, HOLDOUT_SEED, KeyFilter, held_out, sample_content
from data_pipelines.sources.source_data import (
    ImageTextSourceData,
    SourceData,
    TextSourceData,
    one_source_string,
    open_sources,
)
from data_pipelines.sources.spec import Source, SourceSpec, is_prepared, resolve_all, resolve_source
from data_pipelines.sources.transports import (
    CURL_SCHEMES,
    FSSPEC_EXTRAS,
    FSSPEC_SCHEMES,
    FetchError,
    FetchPolicy,
    open_shard,
    register_fsspec_schemes,
)

__all__ = [
    "AUTO_HOLDOUT",
    "CURL_SCHEMES",
    "FSSPEC_EXTRAS",
    "FSSPEC_SCHEMES",
    "HOLDOUT_SEED",
    "FetchError",
    "FetchPolicy",
    "ImageTextSourceData",
    "KeyFilter",
    "Source",
    "SourceData",
    "SourceError",
    "SourceSpec",
    "TextSourceData",
    "count_shards",
    "expand_urls",
    "held_out",
    "sample_content",
    "is_prepared",
    "one_source_string",
    "open_shard",
    "open_sources",
    "register_fsspec_schemes",
    "resolve_all",
    "resolve_source",
    "shard_location",
]
