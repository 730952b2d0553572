"""prepare-text: turn a text corpus into tokenized, packed WebDataset shards.

    prepare-text corpus/ extra.jsonl --output data/tiny --vocab-size 8192 --seq-len 256

Writes DIR/tokenizer/, DIR/{train,val,test}/shard-NNNNNN.tar (samples "tokens.npy": one
window of seq_len + 1 token ids) and, last, DIR/manifest.json, whose presence means the
directory is complete.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from data_pipelines import cli, node_parts
from data_pipelines.manifest import write_sizes
from data_pipelines.node_parts import node_shard_pattern, node_tag
from data_pipelines.shards import RecordingShardWriter
from data_pipelines.splits import SPLITS, assign_split
from data_pipelines.text import chat
from data_pipelines.text.packed import FORMAT as CHAT_FORMAT
from data_pipelines.text.packed import ConversationPacker, window_sample
from data_pipelines.text.packing import TokenPacker
from data_pipelines.text.sources import InputError, InputSpec, ScanReport, iter_documents, resolve_inputs
from data_pipelines.text.tokenizer import (
    TokenizerError,
    document_bos,
    encode_batches,
    token_dtype,
    train_bpe_tokenizer,
)
from data_pipelines.text.window_shards import WindowShardWriter, _MemberLayout  # noqa: F401 - tests patch it here
from data_pipelines.workers import BackgroundImports, import_shard_writer

PROG = "prepare-text"
PART_KIND = "text-part"
FORMATS = ("auto", "text", "chat")
MANIFEST_VERSION = 1
# Batches sent to tokenizer workers: big enough to amortise inter-process pickling and the
# per-batch overhead; small enough that a few in flight per worker stay cheap in memory and
# that the last one, which a single worker finishes while the others idle, is short.
BATCH_DOCUMENTS = 1024
BATCH_CHARS = 1 << 18
# Inputs are packed in blocks of at least this many bytes, each block's windows on their own (one
# dropped tail per block and split, under a window each: ~1e-5 of the tokens at seq_len 2048), so
# that a block can be prepared on any machine and the result not depend on --num-nodes.
BLOCK_BYTES = 256 << 20


@dataclass(frozen=True, kw_only=True)
class PrepareConfig(cli.CorpusConfig):
    samples_per_shard: int = 2048
    seq_len: int = 256
    text_field: str = "text"
    min_chars: int = 1
    limit_documents: int | None = None
    format: str = "auto"
    chat_template: str | None = None
    num_nodes: int = 1
    node_rank: int = 0

    def problems(self) -> list[str]:
        """Every invalid setting at once, so a user fixes them in one go."""
        found = self.tokenizer_problems(required=True)
        found += cli.node_problems(self.num_nodes, self.node_rank)
        if self.num_nodes > 1 and self.vocab_size is not None:
            found.append(
                "--num-nodes > 1 needs --tokenizer: every node must tokenize with the same one (train it "
                "first, e.g. prepare-text on one machine with --vocab-size, and pass its DIR/tokenizer)"
            )
        if self.num_nodes > 1 and self.limit_documents is not None:
            found.append("--limit-documents counts across all the inputs: it cannot be used with --num-nodes > 1")
        if self.seq_len < 1:
            found.append("--seq-len must be >= 1")
        if self.min_chars < 0:
            found.append("--min-chars must be >= 0")
        if self.limit_documents is not None and self.limit_documents < 1:
            found.append("--limit-documents must be >= 1")
        if self.format not in FORMATS:
            found.append(f"--format must be one of {', '.join(FORMATS)}")
        if self.chat_template is not None and self.format == "text":
            found.append("--chat-template applies to chat data; it contradicts --format text")
        return found + super().problems()


def build_parser() -> argparse.ArgumentParser:
    parser = cli.command_parser(
        PROG, "Tokenize a text corpus and pack it into WebDataset shards split into train/val/test."
    )
    cli.add_corpus_flags(
        parser,
        "files, directories (walked recursively) or glob patterns. Text files (.txt, .md, .py, ...) "
        "are one document each; .jsonl/.json(.gz) one document per record; .parquet one per row; "
        "a datasets.save_to_disk directory one per row of every split",
        tokenizer_required=True,
        tokenizer_help="local Hugging Face tokenizer directory to use (must define an eos token)",
        vocab_help="train a byte-level BPE tokenizer of this size on the train split instead",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        metavar="N",
        default=256,
        help="tokens per training sample; each stored window holds seq_len + 1 tokens",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="FIELD",
        help="record field or column holding the text; dotted paths reach nested fields (meta.body)",
    )
    cli.add_fraction_flags(parser, 0.01, "fraction of documents assigned to the {split} split by content hash")
    cli.add_sharding_flags(parser, 2048, "tokenizer")
    parser.add_argument(
        "--min-chars",
        type=int,
        metavar="N",
        default=1,
        help="skip documents shorter than this many characters (reason 'empty')",
    )
    parser.add_argument(
        "--limit-documents", type=int, metavar="N", help="stop after the first N usable documents (for quick trials)"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="chat: JSON/JSONL/parquet records with 'messages' [{role, content}] or 'prompt' + "
        "'response'/'completion' (+ 'system'), rendered with the chat template, whole "
        "conversations packed per window, loss on the assistant's tokens only (mask.npy, "
        "segments.npy beside tokens.npy); text: one document per file or record; auto: chat "
        "when every input's first record looks like a conversation",
    )
    parser.add_argument(
        "--chat-template",
        metavar="FILE_OR_JINJA",
        help="chat template for chat data (a Jinja file, or the template text itself) when the "
        "tokenizer has none or to replace its own; saved with the dataset's tokenizer",
    )
    cli.add_node_flags(
        parser,
        f"whole packing blocks of >= {BLOCK_BYTES >> 20} MiB of input files, block b on node "
        "b %% N; the windows equal a single machine's, which packs by the same blocks",
    )
    cli.add_overwrite_flags(parser, cli.CORPUS_OVERWRITE_HELP, "hide progress bars")
    return parser


# ---------------------------------------------------------------------------------------------
# Steps


def _documents(
    config: PrepareConfig, specs: list[InputSpec], report: ScanReport, warn: Callable[[str], None] | None
) -> Iterator[str]:
    docs = iter_documents(specs, config.text_field, config.min_chars, report, warn)
    return itertools.islice(docs, config.limit_documents)


def _split_of(config: PrepareConfig, text: str) -> str:
    return assign_split(text.encode("utf-8"), config.val_fraction, config.test_fraction, config.seed)


def _batches(tagged: Iterable[tuple[int, str]]) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(split index of each text, texts) batches; the prepare module's BATCH_* at call time."""
    splits: list[int] = []
    texts: list[str] = []
    chars = 0
    for split, text in tagged:
        splits.append(split)
        texts.append(text)
        chars += len(text)
        if len(texts) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield np.array(splits, dtype=np.uint8), texts
            splits, texts, chars = [], [], 0
    if texts:
        yield np.array(splits, dtype=np.uint8), texts


def _train_tokenizer(config: PrepareConfig, specs: list[InputSpec], console: cli.Console) -> Any:
    """Train on the train split only, streamed from disk: val/test must stay unseen."""
    report = ScanReport.for_inputs(specs)
    train_docs = 0

    def train_texts() -> Iterator[str]:
        nonlocal train_docs
        for text in _documents(config, specs, report, console.warn):
            if _split_of(config, text) == "train":
                train_docs += 1
                yield text

    assert config.vocab_size is not None
    tokenizer = train_bpe_tokenizer(train_texts(), config.vocab_size, show_progress=console.bars)
    if train_docs == 0:
        raise cli.UsageError(f"no training documents to train a tokenizer on{_skip_summary(report)}")
    return tokenizer


def _skip_summary(report: ScanReport) -> str:
    return f" (skipped records: {cli.reason_counts(report.by_reason)})" if report.by_reason else ""


@dataclass
class _SplitOutput:
    """One split's packer and shard writer. The packer restarts (its tail dropped) at every
    packing block, so that the windows of a block depend on that block's inputs alone."""

    packer: TokenPacker
    writer: WindowShardWriter
    tokens: int = 0
    documents: int = 0
    dropped_tokens: int = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self.writer.write(self.packer.add_documents(ids, lengths))

    def finish_block(self) -> None:
        packer = self.packer
        packer.finish()
        self.tokens += packer.tokens_out
        self.documents += packer.documents
        self.dropped_tokens += packer.dropped_tokens
        self.packer = TokenPacker(packer.window - 1, packer.eos_id, packer.dtype, packer.bos_id)

    def to_manifest(self, output: Path) -> dict[str, Any]:
        return {
            **cli.shards_manifest(self.writer, output),  # type: ignore[arg-type]
            "tokens": self.tokens,
            "documents": self.documents,
            "dropped_tokens": self.dropped_tokens,
        }


def packing_blocks(specs: list[InputSpec], block_bytes: int | None = None) -> list[list[int]]:
    """The inputs' indices cut into consecutive packing blocks of at least `block_bytes` (the
    last may be smaller). A block is packed on its own and prepared on one node (block b on node
    b % num_nodes), so any number of nodes writes the windows of a single-machine run."""
    limit = BLOCK_BYTES if block_bytes is None else block_bytes
    blocks: list[list[int]] = []
    size = limit
    for index, spec in enumerate(specs):
        if size >= limit:
            blocks.append([])
            size = 0
        blocks[-1].append(index)
        size += spec.bytes
    return blocks


def _block_batches(
    config: PrepareConfig,
    specs: list[InputSpec],
    blocks: list[tuple[int, list[int]]],
    report: ScanReport,
    warn: Callable[[str], None] | None,
) -> Iterator[tuple[Any, list[str]]]:
    """((block number, split index of each text), texts) batches, block after block; a batch
    never spans two blocks. --limit-documents counts across blocks."""
    index = {split: i for i, split in enumerate(SPLITS)}
    remaining = config.limit_documents
    for number, members in blocks:
        if remaining == 0:
            return
        # The block's inputs, reported into the run's report (their stats and the skip counts shared).
        sub = ScanReport(
            [report.inputs[i] for i in members], report.max_examples, report.by_reason, report.examples, report.warnings
        )
        docs = iter_documents([specs[i] for i in members], config.text_field, config.min_chars, sub, warn)
        if remaining is not None:
            docs = itertools.islice(docs, remaining)
        taken = 0
        for splits, texts in _batches((index[_split_of(config, text)], text) for text in docs):
            taken += len(texts)
            yield (number, splits), texts
        if remaining is not None:
            remaining -= taken


def _write_shards(
    config: PrepareConfig,
    specs: list[InputSpec],
    tokenizer: Any,
    eos_id: int,
    dtype: Any,
    report: ScanReport,
    warn: Callable[[str], None] | None,
    console: cli.Console,
) -> dict[str, _SplitOutput]:
    multi = config.num_nodes > 1

    def writer(split: str) -> WindowShardWriter:
        if not multi:
            return WindowShardWriter(config.output / split, split, config.samples_per_shard)
        return WindowShardWriter(
            config.output / split,
            split,
            config.samples_per_shard,
            f"{split}-{node_tag(config.node_rank)}",
            node_shard_pattern(config.node_rank),
        )

    bos_id = document_bos(tokenizer)
    outputs = [_SplitOutput(TokenPacker(config.seq_len, eos_id, dtype, bos_id), writer(split)) for split in SPLITS]
    blocks = [
        (b, members) for b, members in enumerate(packing_blocks(specs)) if b % config.num_nodes == config.node_rank
    ]
    tokens = 0
    current = None
    # With workers, the first shard write's import of webdataset (and torch, ~1 s) runs on a
    # thread once they are forked, overlapping their work.
    imports = BackgroundImports(import_shard_writer)
    with console.bar(unit="doc", desc="tokenizing") as bar:
        try:
            batches = _block_batches(config, specs, blocks, report, warn)
            encoded = encode_batches(batches, tokenizer, config.workers, on_start=imports.start)
            for (block, splits), ids, lengths in encoded:
                if block != current:
                    if current is not None:
                        for out in outputs:
                            out.finish_block()
                    current = block
                if (splits == splits[0]).all():
                    outputs[splits[0]].add(ids, lengths)
                else:
                    # Each split's documents, in input order: the packers are independent.
                    token_splits = np.repeat(splits, lengths)
                    for i, out in enumerate(outputs):
                        if (chosen := splits == i).any():
                            out.add(ids[token_splits == i], lengths[chosen])
                tokens += ids.size + lengths.size
                bar.update(len(splits))
                bar.set_postfix_str(f"tokens={tokens:,}", refresh=False)
        finally:
            for out in outputs:
                out.writer.close()
            imports.join()
    for out in outputs:
        out.finish_block()
    return dict(zip(SPLITS, outputs))


def build_manifest(
    config: PrepareConfig, tokenizer: Any, dtype: Any, report: ScanReport, outputs: dict[str, _SplitOutput]
) -> dict[str, Any]:
    return {
        "kind": "text",
        "version": MANIFEST_VERSION,
        "created_by": PROG,
        "seq_len": config.seq_len,
        "token_dtype": str(dtype),
        "tokenizer": cli.tokenizer_manifest(tokenizer, config.tokenizer),
        "document_bos": document_bos(tokenizer),  # the id before every document, or null
        **config.split_manifest(),
        "text_field": config.text_field,
        "inputs": [stats.to_manifest() for stats in report.inputs],
        "splits": {split: outputs[split].to_manifest(config.output) for split in SPLITS},
        "skipped": report.to_manifest(),
    }


def format_summary(manifest: dict[str, Any], output: Path, seconds: float) -> str:
    lines = [
        f"{PROG}: wrote {output} in {seconds:.1f}s (seq_len {manifest['seq_len']}, "
        f"{manifest['token_dtype']}, vocab {manifest['tokenizer']['vocab_size']})"
    ]
    lines.append(f"  {'split':<6}{'documents':>12}{'samples':>12}{'tokens':>14}{'dropped':>10}{'shards':>8}")
    for split, s in manifest["splits"].items():
        lines.append(
            f"  {split:<6}{s['documents']:>12,}{s['samples']:>12,}{s['tokens']:>14,}"
            f"{s['dropped_tokens']:>10,}{len(s['shards']):>8}"
        )
    skipped = manifest["skipped"]
    if skipped["total"]:
        lines.append(f"  skipped {skipped['total']:,} records: {cli.reason_counts(skipped['by_reason'], ',')}")
    else:
        lines.append("  skipped 0 records")
    return "\n".join(lines)


def run(config: PrepareConfig, out: TextIO | None = None, err: TextIO | None = None) -> dict[str, Any]:
    """Prepare the dataset described by `config`; return the manifest written."""
    console = cli.start_run(PROG, config, out, err)
    specs = cli.outside(resolve_inputs(config.inputs), config.output)
    if not specs:
        raise InputError(f"every input is inside the output directory {config.output}")
    external = cli.external_tokenizer(config.tokenizer)
    if chat.detect_format(specs, config.format) == "chat":
        if config.num_nodes > 1:
            raise cli.UsageError("--num-nodes > 1 prepares plain text only; prepare chat data on one machine")
        return _run_chat(config, specs, external, console)
    if config.num_nodes > 1:
        return _run_node(config, specs, external, console)
    cli.prepare_output_dir(config.output, config.overwrite, owned=[cli.TOKENIZER_SUBDIR, node_parts.PARTS_DIR])

    trained = external is None
    # From here on only the saved copy is used, as the trainer will.
    tokenizer = cli.save_tokenizer_copy(
        _train_tokenizer(config, specs, console) if trained else external, config.output
    )
    dtype = token_dtype(len(tokenizer))

    report = ScanReport.for_inputs(specs)
    # When training, the first pass has already printed the per-file warnings.
    warn = None if trained else console.warn
    outputs = _write_shards(config, specs, tokenizer, tokenizer.eos_token_id, dtype, report, warn, console)
    if report.documents == 0:
        raise cli.UsageError(f"no usable documents in the inputs{_skip_summary(report)}")
    manifest = build_manifest(config, tokenizer, dtype, report, outputs)
    write_sizes(config.output, manifest)
    return console.finish(config.output, manifest, format_summary)


# ---------------------------------------------------------------------------------------------
# One node of several


def _run_node(config: PrepareConfig, specs: list[InputSpec], external: Any, console: cli.Console) -> dict[str, Any]:
    """This node's packing blocks -> its own shards and DIR/parts/node-RANK.json (no manifest.json:
    `prepare-merge DIR` writes it once every node is done)."""
    node_parts.prepare_node_output(config.output, config.node_rank, config.overwrite)
    if config.node_rank == 0:
        tokenizer = cli.save_tokenizer_copy(external, config.output)
    else:
        # Node 0 writes DIR/tokenizer; this node uses a saved copy of its own, as node 0 does.
        with tempfile.TemporaryDirectory(prefix="prepare-text-tokenizer-") as scratch:
            tokenizer = cli.save_tokenizer_copy(external, Path(scratch))
    dtype = token_dtype(len(tokenizer))
    report = ScanReport.for_inputs(specs)
    outputs = _write_shards(config, specs, tokenizer, tokenizer.eos_token_id, dtype, report, console.warn, console)
    mine = [
        i
        for b, members in enumerate(packing_blocks(specs))
        if b % config.num_nodes == config.node_rank
        for i in members
    ]
    part = {
        "kind": PART_KIND,
        "version": node_parts.PART_VERSION,
        "created_by": PROG,
        "num_nodes": config.num_nodes,
        "node_rank": config.node_rank,
        "settings": {
            "seq_len": config.seq_len,
            "token_dtype": str(dtype),
            "tokenizer": cli.tokenizer_manifest(tokenizer, config.tokenizer),
            "tokenizer_sha256": node_parts.tokenizer_fingerprint(tokenizer),
            **config.split_manifest(),
            "text_field": config.text_field,
            "min_chars": config.min_chars,
            "format": config.format,
            "pack_block_bytes": BLOCK_BYTES,
            "input_paths": [str(s.path) for s in specs],
            "input_bytes": [s.bytes for s in specs],  # this node's view: the blocks are planned from it
        },
        "inputs": {str(i): report.inputs[i].to_manifest() for i in mine},
        "splits": {split: outputs[split].to_manifest(config.output) for split in SPLITS},
        "skipped": report.to_manifest(),
    }
    path = node_parts.write_part(config.output, part)
    samples = sum(s["samples"] for s in part["splits"].values())
    print(
        f"{PROG}: node {config.node_rank} of {config.num_nodes}: {len(mine)} of {len(specs)} inputs, "
        f"{report.documents:,} documents, {samples:,} samples -> {path}; when every node is done: "
        f"prepare-merge {config.output}",
        file=console.out,
    )
    if not mine:
        console.warn(
            f"node {config.node_rank} got no inputs: {len(specs)} inputs make "
            f"{len(packing_blocks(specs))} packing blocks for {config.num_nodes} nodes"
        )
    return part


# ---------------------------------------------------------------------------------------------
# Chat data


def _run_chat(config: PrepareConfig, specs: list[InputSpec], external: Any, console: cli.Console) -> dict[str, Any]:
    """Chat records -> packed conversation windows with assistant-only loss masks."""
    if external is not None:
        # Refused before the output directory is touched: a missing template deletes nothing.
        template = chat.load_template(config.chat_template, external, str(config.tokenizer))
        chat.ChatRenderer(external, template)  # a slow tokenizer is refused here too
        tokenizer = external
    else:
        if config.chat_template is None:
            raise chat.ChatError("a tokenizer trained with --vocab-size has no chat template; pass --chat-template")
        template = chat.load_template(config.chat_template, None, "")
        tokenizer = None
    cli.prepare_output_dir(config.output, config.overwrite, owned=[cli.TOKENIZER_SUBDIR, node_parts.PARTS_DIR])
    if tokenizer is None:
        report = ScanReport.for_inputs(specs)
        train = (
            m
            for m, _ in chat.iter_conversations(specs, report, config.limit_documents)
            if _chat_split(config, m) == "train"
        )
        assert config.vocab_size is not None
        tokenizer = train_bpe_tokenizer(
            chat.tokenizer_training_texts(train), config.vocab_size, show_progress=console.bars
        )
    tokenizer.chat_template = template  # the trainer, the export and pipeline("text-generation") use it
    tokenizer = cli.save_tokenizer_copy(tokenizer, config.output)
    dtype = token_dtype(len(tokenizer))
    renderer = chat.ChatRenderer(tokenizer, template)

    report = ScanReport.for_inputs(specs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packers = {split: ConversationPacker(config.seq_len, pad_id, dtype) for split in SPLITS}
    writers = {split: RecordingShardWriter(config.output / split, config.samples_per_shard) for split in SPLITS}

    def write(split: str, windows: list) -> None:
        for window in windows:
            writers[split].write(window_sample(f"{split}-{writers[split].samples:010d}", window))

    with console.bar(unit="conversation", desc="rendering") as bar:
        try:
            for messages, sequences in chat.iter_conversations(
                specs, report, config.limit_documents, renderer, config.workers
            ):
                split = _chat_split(config, messages)
                for ids, mask in sequences:  # one, or one per turn where the template is not prefix-stable
                    write(split, packers[split].add(ids, mask))
                bar.update(1)
            for split in SPLITS:
                write(split, packers[split].finish())
        finally:
            for writer in writers.values():
                writer.close()
    if report.documents == 0:
        raise cli.UsageError(f"no usable conversations in the inputs{_skip_summary(report)}")
    splits = {
        split: {
            **cli.shards_manifest(writers[split], config.output),
            "tokens": packers[split].windows * packers[split].window,
            "documents": packers[split].documents,
            "dropped_tokens": packers[split].truncated_tokens,
            "trained_tokens": packers[split].trained_tokens,
            "padding_tokens": packers[split].padding_tokens,
            "truncated_conversations": packers[split].truncated,
        }
        for split in SPLITS
    }
    manifest = {
        "kind": "text",
        "version": MANIFEST_VERSION,
        "created_by": PROG,
        "seq_len": config.seq_len,
        "token_dtype": str(dtype),
        "tokenizer": cli.tokenizer_manifest(tokenizer, config.tokenizer),
        **config.split_manifest(),
        "format": CHAT_FORMAT,
        "chat": {
            "template": "--chat-template" if config.chat_template is not None else "tokenizer",
            "trained_roles": list(chat.ROLES_TRAINED),
            "packing": "whole conversations per window, padded; position ids and attention restart per conversation",
        },
        "inputs": [stats.to_manifest() for stats in report.inputs],
        "splits": splits,
        "skipped": report.to_manifest(),
    }
    write_sizes(config.output, manifest)
    return console.finish(config.output, manifest, format_summary)


def _chat_split(config: PrepareConfig, messages: list[dict[str, str]]) -> str:
    return assign_split(chat.canonical(messages), config.val_fraction, config.test_fraction, config.seed)


def main(argv: list[str] | None = None) -> int:
    cli.freeze_heap_at_exit()
    return cli.run_main(PROG, build_parser(), argv, PrepareConfig, run, (InputError, TokenizerError, chat.ChatError))


if __name__ == "__main__":
    sys.exit(main())
