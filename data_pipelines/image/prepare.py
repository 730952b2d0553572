"""prepare-image-text: image-caption pairs -> resized JPEG WebDataset shards with a manifest.

    prepare-image-text laion-shards/ pairs.csv photos/ --output data/pairs --image-size 256

Inputs are img2dataset output folders, parquet/CSV/TSV tables of image path + caption, and
folders of images with sidecar .txt captions (see `data_pipelines.image.sources`). Each image
is decoded (large JPEGs at reduced scale via draft mode; upright by EXIF orientation, 16-bit
grey scaled to 8 bits, transparency on white, as the loaders decode: `data_pipelines.image.decode`),
checked, resized (img2dataset's --resize-mode names and meanings), re-encoded as JPEG
and written with its caption to DIR/{train,val,test}/shard-NNNNNN.tar as `jpg`, `txt` and
`json` members, the img2dataset / OpenCLIP convention. The split of a sample is a stable hash
of its image bytes, and exact duplicates are dropped (the first is kept), so an image never
lands in two splits. DIR/manifest.json is written last: its presence means "complete".

With --num-nodes N --node-rank I, node I prepares every N-th candidate sample in input order
(all nodes read the input listings; tables and captioned folders cost each node only its own
images, img2dataset tars are read in full by every node). Duplicates are dropped within a node
as on one machine, and each node records the content hashes of what it kept in
DIR/parts/node-IIIII.kept.tsv; `prepare-merge DIR` then drops, in global input order, every kept
sample whose hashes an earlier kept sample of any node has, rewriting the few shards holding
them, so the merged dataset holds exactly the samples of a single-machine run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from data_pipelines import cli, node_parts
from data_pipelines.image.node_duplicates import kept_path
from data_pipelines.image.process import RESIZE_MODES, ImageOptions, Processed, process_chunk, process_image
from data_pipelines.image.sources import (
    DEFAULT_CAPTION_FIELDS,
    DEFAULT_IMAGE_FIELDS,
    Fields,
    ImageInputSpec,
    Item,
    Skip,
    check_table,
    iter_items,
    resolve_image_inputs,
)
from data_pipelines.manifest import write_sizes
from data_pipelines.node_parts import node_shard_pattern, node_tag
from data_pipelines.shards import RecordingShardWriter
from data_pipelines.splits import SPLITS, assign_split
from data_pipelines.text.sources import InputError, InputStats, ScanReport
from data_pipelines.text.tokenizer import TokenizerError, train_bpe_tokenizer
from data_pipelines.workers import BackgroundImports, import_shard_writer, ordered_map

PROG = "prepare-image-text"
KIND = "image-text"
PART_KIND = "image-text-part"
MANIFEST_VERSION = 1
CLASSES_NAME = "classes.json"
# Images per task sent to a worker: enough to amortise pickling, few enough to keep order cheap.
CHUNK_ITEMS = 16

__all__ = ["PrepareImageConfig", "ImageOptions", "process_image", "run", "main", "build_parser"]


@dataclass(frozen=True, kw_only=True)
class PrepareImageConfig(cli.CorpusConfig):
    image_size: int = 256
    resize_mode: str = "center_crop"
    jpeg_quality: int = 90
    min_image_size: int = 16
    max_caption_chars: int = 1000
    image_field: str | None = None
    caption_field: str | None = None
    num_nodes: int = 1
    node_rank: int = 0

    @property
    def image_options(self) -> ImageOptions:
        return ImageOptions(self.image_size, self.resize_mode, self.jpeg_quality, self.min_image_size)

    @property
    def fields(self) -> Fields:
        return Fields(image=self.image_field, caption=self.caption_field)

    def problems(self) -> list[str]:
        """Every invalid setting at once, so a user fixes them in one go."""
        found = self.tokenizer_problems(required=False)
        if self.image_size < 1:
            found.append("--image-size must be >= 1")
        if self.resize_mode not in RESIZE_MODES:
            found.append(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}")
        if not 1 <= self.jpeg_quality <= 100:
            found.append("--jpeg-quality must be in 1..100")
        if self.min_image_size < 0:
            found.append("--min-image-size must be >= 0")
        if self.max_caption_chars < 1:
            found.append("--max-caption-chars must be >= 1")
        found += cli.node_problems(self.num_nodes, self.node_rank)
        if self.num_nodes > 1 and self.vocab_size is not None:
            found.append(
                "--num-nodes > 1 cannot train a caption tokenizer (--vocab-size) on the captions of "
                "every node: pass --tokenizer, or neither flag"
            )
        return found + super().problems()


def build_parser() -> argparse.ArgumentParser:
    parser = cli.command_parser(
        PROG,
        "Decode, filter, resize and re-encode image-caption pairs into JPEG "
        "WebDataset shards split into train/val/test.",
    )
    cli.add_corpus_flags(
        parser,
        "img2dataset output folders or .tar shards (with their .parquet and _stats.json), "
        ".parquet/.csv/.tsv tables of image path + caption, or folders of images with sidecar .txt "
        "captions; glob patterns are expanded",
        tokenizer_required=False,
        tokenizer_help="local Hugging Face tokenizer directory to copy into DIR/tokenizer for the captions",
        vocab_help="train a byte-level BPE caption tokenizer of this size on the train captions; "
        "with neither flag the manifest names no tokenizer and the recipe must",
    )
    parser.add_argument("--image-size", type=int, metavar="PX", default=256, help="output image side in pixels")
    parser.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default="center_crop",
        help="img2dataset's modes and meanings. center_crop: shorter side to --image-size, then crop "
        "the centre square; keep_ratio: shorter side to --image-size, no crop or padding (not square; "
        "the loaders crop at training time); keep_ratio_largest: longer side to --image-size, no "
        "padding; border: longer side to --image-size, padded with white to the square (what "
        "keep_ratio meant before, with black bars); no: keep the size",
    )
    parser.add_argument("--jpeg-quality", type=int, metavar="Q", default=90, help="quality of the re-encoded JPEGs")
    parser.add_argument(
        "--min-image-size",
        type=int,
        metavar="PX",
        default=16,
        help="skip images whose shorter side is smaller (reason 'too_small')",
    )
    parser.add_argument(
        "--max-caption-chars",
        type=int,
        metavar="N",
        default=1000,
        help="skip captions longer than this (reason 'caption_too_long')",
    )
    parser.add_argument(
        "--image-field",
        metavar="COLUMN",
        help=f"table column of image paths (default: the first of {', '.join(DEFAULT_IMAGE_FIELDS)})",
    )
    parser.add_argument(
        "--caption-field",
        metavar="COLUMN",
        help=f"table column of captions (default: the first of {', '.join(DEFAULT_CAPTION_FIELDS)})",
    )
    cli.add_fraction_flags(parser, 0.01, "fraction of samples assigned to the {split} split by image hash")
    cli.add_sharding_flags(parser, 1000, "image")
    cli.add_node_flags(
        parser, "every N-th sample in input order on each node; duplicates across nodes are dropped by prepare-merge"
    )
    cli.add_overwrite_flags(parser, cli.CORPUS_OVERWRITE_HELP, "hide the progress bar")
    return parser


# ---------------------------------------------------------------------------------------------
# Streaming candidates through workers, in input order


class _Entry(NamedTuple):
    input_index: int
    record: Item | Skip
    reason: str | None  # set when rejected before any image work (a Skip, or a bad caption)
    detail: str
    caption: str
    ordinal: int = 0  # position among all the records of all the inputs: the global input order


def _entries(specs: list[ImageInputSpec], config: PrepareImageConfig) -> Iterator[_Entry]:
    """The candidate records in input order; with --num-nodes N only every N-th, from --node-rank."""
    ordinal = -1
    for index, spec in enumerate(specs):
        for record in iter_items(spec, config.fields):
            ordinal += 1
            if ordinal % config.num_nodes != config.node_rank:
                continue
            if isinstance(record, Skip):
                yield _Entry(index, record, record.reason, record.detail, "", ordinal)
                continue
            caption = (record.caption or "").strip()
            if not caption:
                yield _Entry(index, record, "empty_caption", "caption is empty", caption, ordinal)
            elif len(caption) > config.max_caption_chars:
                yield _Entry(
                    index,
                    record,
                    "caption_too_long",
                    f"{len(caption)} characters > {config.max_caption_chars}",
                    caption,
                    ordinal,
                )
            else:
                yield _Entry(index, record, None, "", caption, ordinal)


def _chunks(entries: Iterable[_Entry], size: int) -> Iterator[list[_Entry]]:
    """Chunks holding `size` images to process (plus the rejects between them, which cost
    nothing); capped in length so a long run of rejects (a parquet of failures) stays small."""
    chunk: list[_Entry] = []
    images = 0
    for entry in entries:
        chunk.append(entry)
        images += entry.reason is None
        if images >= size or len(chunk) >= 64 * size:
            yield chunk
            chunk, images = [], 0
    if chunk:
        yield chunk


def _task(chunk: list[_Entry], opts: ImageOptions) -> tuple[ImageOptions, list[tuple[bytes | None, str | None]]]:
    return opts, [(e.record.data, e.record.path) for e in chunk if e.reason is None]  # type: ignore[union-attr]


def _chunk_bytes(chunk: list[_Entry]) -> int:
    """The image bytes a chunk carries to its worker (files read there count as nothing: what
    waits in memory for them is their small result)."""
    return sum(
        len(e.record.data)
        for e in chunk  # type: ignore[union-attr]
        if e.reason is None and e.record.data is not None
    )  # type: ignore[union-attr]


def _processed(
    entries: Iterable[_Entry], opts: ImageOptions, workers: int, on_pool: Callable[[], Any] | None = None
) -> Iterator[tuple[_Entry, Processed | None]]:
    """(entry, result) in input order; result is None for entries rejected up front.

    With workers > 1 the chunks go through `ordered_map` (a bounded window, results in
    submission order), so the output is identical for any worker count. `on_pool` is called
    once the worker processes exist (after the fork), to start work in the parent that
    overlaps theirs.
    """

    def pair(chunk: list[_Entry], results: list[Processed]) -> Iterator[tuple[_Entry, Processed | None]]:
        it = iter(results)
        for entry in chunk:
            yield entry, (next(it) if entry.reason is None else None)

    chunks = _chunks(entries, CHUNK_ITEMS)
    if workers <= 1:
        for chunk in chunks:
            yield from pair(chunk, process_chunk(_task(chunk, opts)))
        return
    tasks = ((chunk, _task(chunk, opts), _chunk_bytes(chunk)) for chunk in chunks)
    for chunk, results in ordered_map(process_chunk, tasks, workers, on_start=on_pool):
        yield from pair(chunk, results)


# ---------------------------------------------------------------------------------------------
# Output


@dataclass
class SplitWriters:
    """One recording shard writer per split, naming samples `<split>-<index>` in write order
    (`<split>-rIIIII-<index>` and node I's shard names with node_rank set)."""

    output: Path
    samples_per_shard: int
    node_rank: int | None = None
    writers: dict[str, RecordingShardWriter] = field(init=False)

    def __post_init__(self) -> None:
        if self.node_rank is None:
            self.writers = {s: RecordingShardWriter(self.output / s, self.samples_per_shard) for s in SPLITS}
        else:
            pattern = node_shard_pattern(self.node_rank)
            self.writers = {s: RecordingShardWriter(self.output / s, self.samples_per_shard, pattern) for s in SPLITS}

    def key(self, split: str) -> str:
        """The key the next sample of `split` gets."""
        prefix = split if self.node_rank is None else f"{split}-{node_tag(self.node_rank)}"
        return f"{prefix}-{self.writers[split].samples:010d}"

    def write(self, split: str, jpeg: bytes, caption: str, meta: dict[str, Any]) -> None:
        writer = self.writers[split]
        writer.write(
            {
                "__key__": self.key(split),
                "jpg": jpeg,
                "txt": caption.encode("utf-8"),
                "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
            }
        )

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def total(self) -> int:
        return sum(w.samples for w in self.writers.values())

    def to_manifest(self) -> dict[str, Any]:
        return {split: cli.shards_manifest(w, self.output) for split, w in self.writers.items()}


def _import_tokenizer_class() -> None:
    """Import what training, saving and reloading the caption tokenizer need (~0.5 s of
    transformers imports)."""
    import transformers

    transformers.PreTrainedTokenizerFast  # a lazy attribute: touching it imports  # noqa: B018


def _background_imports(config: PrepareImageConfig) -> BackgroundImports:
    """With workers the parent mostly waits for them: once they are forked, a thread imports what
    the parent needs later, instead of serially when it first needs it: the shard writer's
    webdataset and torch (~1 s, first shard write) and, when a caption tokenizer is trained, its
    transformers classes (after the last image)."""
    steps: list[Callable[[], None]] = [import_shard_writer]
    if config.vocab_size is not None and config.tokenizer is None:  # an external one is loaded up front
        steps.append(_import_tokenizer_class)
    return BackgroundImports(*steps)


def _write_shards(
    config: PrepareImageConfig,
    specs: list[ImageInputSpec],
    report: ScanReport,
    console: cli.Console,
    kept: TextIO | None = None,
) -> SplitWriters:
    """Every (this node's) sample into the split shards; with `kept`, a line per sample written
    (see node_duplicates.KEPT_COLUMNS) for prepare-merge's duplicate check across nodes."""
    writers = SplitWriters(config.output, config.samples_per_shard, config.node_rank if config.num_nodes > 1 else None)
    seen_bytes: set[bytes] = set()
    seen_pixels: set[bytes] = set()
    entries = _entries(specs, config)
    imports = _background_imports(config)
    with console.bar(unit="img", desc="images") as bar:
        try:
            for entry, result in _processed(entries, config.image_options, config.workers, on_pool=imports.start):
                record = entry.record
                count = record.count if isinstance(record, Skip) else 1
                bar.update(count)
                if result is None:  # rejected before any image work
                    report.skip(entry.input_index, record.source, entry.reason or "", entry.detail, count)
                elif result.reason is not None:
                    report.skip(entry.input_index, record.source, result.reason, result.detail)
                elif result.sha256 in seen_bytes or result.pixels in seen_pixels:
                    same = "bytes" if result.sha256 in seen_bytes else "pixels"
                    report.skip(
                        entry.input_index, record.source, "duplicate_image", f"same image {same} as an earlier sample"
                    )
                else:
                    seen_bytes.add(result.sha256)
                    seen_pixels.add(result.pixels)
                    assert isinstance(record, Item)
                    split = assign_split(result.sha256, config.val_fraction, config.test_fraction, config.seed)
                    meta = {
                        "key": record.key,
                        "source": record.source,
                        "width": result.width,
                        "height": result.height,
                        "resized_width": result.resized_width,
                        "resized_height": result.resized_height,
                        **(record.extra or {}),
                    }
                    if kept is not None:
                        kept.write(
                            f"{entry.ordinal}\t{entry.input_index}\t{result.sha256.hex()}\t"
                            f"{result.pixels.hex()}\t{split}\t{writers.key(split)}\n"
                        )
                    writers.write(split, result.jpeg, entry.caption, meta)
                    report.inputs[entry.input_index].documents += 1
                bar.set_postfix_str(f"kept={writers.total():,} rejected={report.skipped_total:,}", refresh=False)
        finally:
            writers.close()
    imports.join()
    return writers


def train_captions(output: Path, shards: list[str]) -> Iterator[str]:
    """Captions of written shards, streamed back from disk (the tokenizer trains on train only)."""
    from data_pipelines.loader import read_samples

    for sample in read_samples(str(output / s) for s in shards):
        yield sample["txt"].decode("utf-8")


def _tokenizer(
    config: PrepareImageConfig, external: Any, splits: dict[str, Any], console: cli.Console
) -> dict[str, Any] | None:
    """The caption tokenizer saved with the data: the user's, one trained on the train captions, or none."""
    tokenizer = external
    if tokenizer is None and config.vocab_size is not None:
        if not splits["train"]["samples"]:
            raise cli.UsageError("no train samples to train a caption tokenizer on")
        tokenizer = train_bpe_tokenizer(
            train_captions(config.output, splits["train"]["shards"]), config.vocab_size, show_progress=console.bars
        )
    if tokenizer is None:
        return None
    return cli.tokenizer_manifest(cli.save_tokenizer_copy(tokenizer, config.output), config.tokenizer)


def build_manifest(
    config: PrepareImageConfig,
    specs: list[ImageInputSpec],
    report: ScanReport,
    splits: dict[str, Any],
    tokenizer: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "kind": KIND,
        "version": MANIFEST_VERSION,
        "created_by": PROG,
        "image_size": config.image_size,
        "resize_mode": config.resize_mode,
        "jpeg_quality": config.jpeg_quality,
        "min_image_size": config.min_image_size,
        "max_caption_chars": config.max_caption_chars,
        **config.split_manifest(),
        "inputs": [
            {"path": stats.path, "format": spec.format, "samples": stats.documents, "rejected": stats.skipped}
            for spec, stats in zip(specs, report.inputs)
        ],
        "splits": splits,
        "rejected": report.to_manifest(),
        "tokenizer": tokenizer,
    }


def format_summary(manifest: dict[str, Any], output: Path, seconds: float) -> str:
    total = sum(s["samples"] for s in manifest["splits"].values())
    rate = total / seconds if seconds > 0 else 0.0
    lines = [
        f"{manifest['created_by']}: wrote {output} in {seconds:.1f}s ({total:,} samples, {rate:,.0f} img/s, "
        f"{manifest['image_size']} px, resize {manifest['resize_mode']})"
    ]
    lines.append(f"  {'split':<6}{'samples':>12}{'shards':>8}")
    for split, s in manifest["splits"].items():
        lines.append(f"  {split:<6}{s['samples']:>12,}{len(s['shards']):>8}")
    rejected = manifest["rejected"]
    reasons = cli.reason_counts(rejected["by_reason"], ",")
    lines.append(f"  rejected {rejected['total']:,}" + (f": {reasons}" if reasons else ""))
    tok = manifest["tokenizer"]
    lines.append(
        "  tokenizer: none (the recipe must name one)"
        if tok is None
        else f"  tokenizer: {tok['path']} (vocab {tok['vocab_size']}, {'trained' if tok['trained'] else 'copied'})"
    )
    return "\n".join(lines)


def clear_output(output: Path, overwrite: bool) -> None:
    """The output directory's rules; an image-text dataset owns its tokenizer, class list and node parts."""
    cli.prepare_output_dir(output, overwrite, owned=[cli.TOKENIZER_SUBDIR, CLASSES_NAME, node_parts.PARTS_DIR])


def run(config: PrepareImageConfig, out: TextIO | None = None, err: TextIO | None = None) -> dict[str, Any]:
    """Prepare the dataset described by `config`; return the manifest written."""
    console = cli.start_run(PROG, config, out, err)
    specs = cli.outside(resolve_image_inputs(config.inputs), config.output)
    if not specs:
        raise InputError(f"no inputs outside the output directory {config.output}")
    for spec in specs:  # a wrong column name fails now, not after hours of other inputs
        if spec.format == "table":
            check_table(spec.path, config.fields)
    external = cli.external_tokenizer(config.tokenizer)
    if config.num_nodes > 1:
        return _run_node(config, specs, external, console)
    clear_output(config.output, config.overwrite)

    report = ScanReport([InputStats(str(s.path), s.format, 0) for s in specs])
    writers = _write_shards(config, specs, report, console)
    if writers.total() == 0:
        reasons = cli.reason_counts(report.by_reason)
        raise cli.UsageError(
            "no usable image-text pairs in the inputs" + (f" (rejected: {reasons})" if reasons else "")
        )
    splits = writers.to_manifest()
    manifest = build_manifest(config, specs, report, splits, _tokenizer(config, external, splits, console))
    write_sizes(config.output, manifest)  # OpenCLIP's shard index, so it needs no --train-num-samples
    return console.finish(config.output, manifest, format_summary)


# ---------------------------------------------------------------------------------------------
# One node of several, and the merge (duplicates across nodes: data_pipelines.image.node_duplicates)


def _run_node(
    config: PrepareImageConfig, specs: list[ImageInputSpec], external: Any, console: cli.Console
) -> dict[str, Any]:
    """Every N-th candidate sample -> this node's shards, DIR/parts/node-RANK.kept.tsv and, last,
    DIR/parts/node-RANK.json (no manifest.json: `prepare-merge DIR` writes it once every node is done)."""
    node_parts.prepare_node_output(config.output, config.node_rank, config.overwrite)
    tokenizer = None
    if external is not None and config.node_rank == 0:
        tokenizer = cli.save_tokenizer_copy(external, config.output)
    elif external is not None:
        # Node 0 writes DIR/tokenizer; this node fingerprints a saved copy of its own, as node 0 does.
        with tempfile.TemporaryDirectory(prefix="prepare-image-text-tokenizer-") as scratch:
            tokenizer = cli.save_tokenizer_copy(external, Path(scratch))
    report = ScanReport([InputStats(str(s.path), s.format, 0) for s in specs])
    kept = kept_path(config.output, config.node_rank)
    scratch_kept = kept.with_name(kept.name + ".tmp")
    with open(scratch_kept, "w", encoding="utf-8") as file:
        writers = _write_shards(config, specs, report, console, file)
    os.replace(scratch_kept, kept)
    part = {
        "kind": PART_KIND,
        "version": node_parts.PART_VERSION,
        "created_by": PROG,
        "num_nodes": config.num_nodes,
        "node_rank": config.node_rank,
        "settings": {
            "image_size": config.image_size,
            "resize_mode": config.resize_mode,
            "jpeg_quality": config.jpeg_quality,
            "min_image_size": config.min_image_size,
            "max_caption_chars": config.max_caption_chars,
            **config.split_manifest(),
            "image_field": config.image_field,
            "caption_field": config.caption_field,
            "tokenizer": None if tokenizer is None else cli.tokenizer_manifest(tokenizer, config.tokenizer),
            "tokenizer_sha256": None if tokenizer is None else node_parts.tokenizer_fingerprint(tokenizer),
            "input_paths": [str(s.path) for s in specs],
            "input_formats": [s.format for s in specs],
            # each node's view of its input files (directories: None): nodes divide the samples by their
            # order, so a file that differs between nodes would shift them (prepare-merge compares these)
            "input_bytes": [s.path.stat().st_size if s.path.is_file() else None for s in specs],
        },
        "inputs": [{"samples": stats.documents, "rejected": stats.skipped} for stats in report.inputs],
        "splits": writers.to_manifest(),
        "skipped": report.to_manifest(),
        "kept": kept.name,
    }
    path = node_parts.write_part(config.output, part)
    print(
        f"{PROG}: node {config.node_rank} of {config.num_nodes}: {writers.total():,} samples kept, "
        f"{report.skipped_total:,} rejected -> {path}; when every node is done: prepare-merge {config.output}",
        file=console.out,
    )
    return part


def main(argv: list[str] | None = None) -> int:
    return cli.run_main(PROG, build_parser(), argv, PrepareImageConfig, run, (InputError, TokenizerError))


if __name__ == "__main__":
    sys.exit(main())
