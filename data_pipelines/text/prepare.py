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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

from data_pipelines import cli
from data_pipelines.shards import RecordingShardWriter
from data_pipelines.splits import SPLITS, assign_split
from data_pipelines.text.packing import TokenPacker
from data_pipelines.text.sources import InputError, InputSpec, ScanReport, iter_documents, resolve_inputs
from data_pipelines.text.tokenizer import TokenizerError, encode_batches, token_dtype, train_bpe_tokenizer

PROG = "prepare-text"
MANIFEST_VERSION = 1
# Batches sent to tokenizer workers: big enough to amortise inter-process pickling,
# small enough that a few in flight per worker stay cheap in memory.
BATCH_DOCUMENTS = 256
BATCH_CHARS = 1 << 20


@dataclass(frozen=True, kw_only=True)
class PrepareConfig(cli.CorpusConfig):
    samples_per_shard: int = 2048
    seq_len: int = 256
    text_field: str = "text"
    min_chars: int = 1
    limit_documents: int | None = None

    def problems(self) -> list[str]:
        """Every invalid setting at once, so a user fixes them in one go."""
        found = self.tokenizer_problems(required=True)
        if self.seq_len < 1:
            found.append("--seq-len must be >= 1")
        if self.min_chars < 0:
            found.append("--min-chars must be >= 0")
        if self.limit_documents is not None and self.limit_documents < 1:
            found.append("--limit-documents must be >= 1")
        return found + super().problems()


def build_parser() -> argparse.ArgumentParser:
    parser = cli.command_parser(
        PROG, "Tokenize a text corpus and pack it into WebDataset shards split into train/val/test.")
    cli.add_corpus_flags(
        parser,
        "files, directories (walked recursively) or glob patterns. Text files (.txt, .md, .py, ...) "
        "are one document each; .jsonl/.json(.gz) one document per record; .parquet one per row; "
        "a datasets.save_to_disk directory one per row of every split",
        tokenizer_required=True,
        tokenizer_help="local Hugging Face tokenizer directory to use (must define an eos token)",
        vocab_help="train a byte-level BPE tokenizer of this size on the train split instead",
    )
    parser.add_argument("--seq-len", type=int, metavar="N", default=256,
                        help="tokens per training sample; each stored window holds seq_len + 1 tokens")
    parser.add_argument("--text-field", default="text", metavar="FIELD",
                        help="record field or column holding the text; dotted paths reach nested fields (meta.body)")
    cli.add_fraction_flags(parser, 0.01, "fraction of documents assigned to the {split} split by content hash")
    cli.add_sharding_flags(parser, 2048, "tokenizer")
    parser.add_argument("--min-chars", type=int, metavar="N", default=1,
                        help="skip documents shorter than this many characters (reason 'empty')")
    parser.add_argument("--limit-documents", type=int, metavar="N",
                        help="stop after the first N usable documents (for quick trials)")
    cli.add_overwrite_flags(parser, cli.CORPUS_OVERWRITE_HELP, "hide progress bars")
    return parser


# ---------------------------------------------------------------------------------------------
# Steps


def _documents(config: PrepareConfig, specs: list[InputSpec], report: ScanReport,
               warn: Callable[[str], None] | None) -> Iterator[str]:
    docs = iter_documents(specs, config.text_field, config.min_chars, report, warn)
    return itertools.islice(docs, config.limit_documents)


def _split_of(config: PrepareConfig, text: str) -> str:
    return assign_split(text.encode("utf-8"), config.val_fraction, config.test_fraction, config.seed)


def _batches(tagged: Iterable[tuple[str, str]]) -> Iterator[tuple[list[str], list[str]]]:
    splits: list[str] = []
    texts: list[str] = []
    chars = 0
    for split, text in tagged:
        splits.append(split)
        texts.append(text)
        chars += len(text)
        if len(texts) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield splits, texts
            splits, texts, chars = [], [], 0
    if texts:
        yield splits, texts


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
    packer: TokenPacker
    writer: RecordingShardWriter

    def add(self, split: str, ids: Any) -> None:
        for window in self.packer.add(ids):
            self.writer.write({"__key__": f"{split}-{self.writer.samples:010d}", "tokens.npy": window})

    def to_manifest(self, output: Path) -> dict[str, Any]:
        return {
            **cli.shards_manifest(self.writer, output),
            "tokens": self.packer.tokens_out,
            "documents": self.packer.documents,
            "dropped_tokens": self.packer.dropped_tokens,
        }


def _write_shards(config: PrepareConfig, specs: list[InputSpec], tokenizer_dir: Path, eos_id: int,
                  dtype: Any, report: ScanReport, warn: Callable[[str], None] | None,
                  console: cli.Console) -> dict[str, _SplitOutput]:
    outputs = {
        split: _SplitOutput(TokenPacker(config.seq_len, eos_id, dtype),
                            RecordingShardWriter(config.output / split, config.samples_per_shard))
        for split in SPLITS
    }
    tagged = ((_split_of(config, text), text) for text in _documents(config, specs, report, warn))
    tokens = 0
    with console.bar(unit="doc", desc="tokenizing") as bar:
        try:
            for splits, encoded in encode_batches(_batches(tagged), tokenizer_dir, config.workers):
                for split, ids in zip(splits, encoded):
                    outputs[split].add(split, ids)
                    tokens += len(ids) + 1
                bar.update(len(splits))
                bar.set_postfix_str(f"tokens={tokens:,}", refresh=False)
        finally:
            for out in outputs.values():
                out.writer.close()
    for out in outputs.values():
        out.packer.finish()
    return outputs


def build_manifest(config: PrepareConfig, tokenizer: Any, dtype: Any, report: ScanReport,
                   outputs: dict[str, _SplitOutput]) -> dict[str, Any]:
    return {
        "kind": "text",
        "version": MANIFEST_VERSION,
        "created_by": PROG,
        "seq_len": config.seq_len,
        "token_dtype": str(dtype),
        "tokenizer": cli.tokenizer_manifest(tokenizer, config.tokenizer),
        **config.split_manifest(),
        "text_field": config.text_field,
        "inputs": [stats.to_manifest() for stats in report.inputs],
        "splits": {split: outputs[split].to_manifest(config.output) for split in SPLITS},
        "skipped": report.to_manifest(),
    }


def format_summary(manifest: dict[str, Any], output: Path, seconds: float) -> str:
    lines = [f"{PROG}: wrote {output} in {seconds:.1f}s (seq_len {manifest['seq_len']}, "
             f"{manifest['token_dtype']}, vocab {manifest['tokenizer']['vocab_size']})"]
    lines.append(f"  {'split':<6}{'documents':>12}{'samples':>12}{'tokens':>14}{'dropped':>10}{'shards':>8}")
    for split, s in manifest["splits"].items():
        lines.append(f"  {split:<6}{s['documents']:>12,}{s['samples']:>12,}{s['tokens']:>14,}"
                     f"{s['dropped_tokens']:>10,}{len(s['shards']):>8}")
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
    cli.prepare_output_dir(config.output, config.overwrite, owned=[cli.TOKENIZER_SUBDIR])

    trained = external is None
    # From here on only the saved copy is used, as the trainer will.
    tokenizer = cli.save_tokenizer_copy(_train_tokenizer(config, specs, console) if trained else external,
                                        config.output)
    dtype = token_dtype(len(tokenizer))

    report = ScanReport.for_inputs(specs)
    # When training, the first pass has already printed the per-file warnings.
    warn = None if trained else console.warn
    outputs = _write_shards(config, specs, config.output / cli.TOKENIZER_SUBDIR, tokenizer.eos_token_id, dtype, report,
                            warn, console)
    if report.documents == 0:
        raise cli.UsageError(f"no usable documents in the inputs{_skip_summary(report)}")
    return console.finish(config.output, build_manifest(config, tokenizer, dtype, report, outputs), format_summary)


def main(argv: list[str] | None = None) -> int:
    return cli.run_main(PROG, build_parser(), argv, PrepareConfig, run, (InputError, TokenizerError))


if __name__ == "__main__":
    sys.exit(main())
