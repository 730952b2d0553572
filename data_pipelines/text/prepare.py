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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

from tqdm import tqdm

from data_pipelines.cli import HelpFormatter, UsageError, common_problems, prepare_output_dir, run_main
from data_pipelines.manifest import write_manifest
from data_pipelines.shards import RecordingShardWriter
from data_pipelines.splits import SPLITS, assign_split
from data_pipelines.text.packing import TokenPacker
from data_pipelines.text.sources import InputError, InputSpec, ScanReport, iter_documents, resolve_inputs
from data_pipelines.text.tokenizer import (
    MIN_VOCAB_SIZE,
    TokenizerError,
    encode_batches,
    load_tokenizer,
    save_tokenizer,
    token_dtype,
    train_bpe_tokenizer,
)

PROG = "prepare-text"
MANIFEST_VERSION = 1
TOKENIZER_SUBDIR = "tokenizer"
# Batches sent to tokenizer workers: big enough to amortise inter-process pickling,
# small enough that a few in flight per worker stay cheap in memory.
BATCH_DOCUMENTS = 256
BATCH_CHARS = 1 << 20


@dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...]
    output: Path
    tokenizer: Path | None = None
    vocab_size: int | None = None
    seq_len: int = 256
    text_field: str = "text"
    val_fraction: float = 0.01
    test_fraction: float = 0.01
    samples_per_shard: int = 2048
    workers: int = 1
    seed: int = 0
    min_chars: int = 1
    limit_documents: int | None = None
    overwrite: bool = False
    progress: bool = True

    def problems(self) -> list[str]:
        """Every invalid setting at once, so a user fixes them in one go."""
        found: list[str] = []
        if (self.tokenizer is None) == (self.vocab_size is None):
            found.append("pass exactly one of --tokenizer PATH or --vocab-size N")
        if self.vocab_size is not None and self.vocab_size < MIN_VOCAB_SIZE:
            found.append(f"--vocab-size must be >= {MIN_VOCAB_SIZE} (256 bytes + <|endoftext|>)")
        if self.tokenizer is not None and not self.tokenizer.is_dir():
            found.append(f"--tokenizer {self.tokenizer}: not a directory")
        if self.seq_len < 1:
            found.append("--seq-len must be >= 1")
        if self.min_chars < 0:
            found.append("--min-chars must be >= 0")
        if self.limit_documents is not None and self.limit_documents < 1:
            found.append("--limit-documents must be >= 1")
        return found + common_problems(val_fraction=self.val_fraction, test_fraction=self.test_fraction,
                                       samples_per_shard=self.samples_per_shard, seed=self.seed, output=self.output,
                                       workers=self.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize a text corpus and pack it into WebDataset shards split into train/val/test.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="files, directories (walked recursively) or glob patterns. Text files (.txt, .md, .py, ...) "
        "are one document each; .jsonl/.json(.gz) one document per record; .parquet one per row; "
        "a datasets.save_to_disk directory one per row of every split",
    )
    parser.add_argument("--output", "-o", required=True, type=Path, metavar="DIR",
                        help="output directory (must be empty or new unless --overwrite)")
    tok = parser.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", type=Path, metavar="PATH",
                     help="local Hugging Face tokenizer directory to use (must define an eos token)")
    tok.add_argument("--vocab-size", type=int, metavar="N",
                     help="train a byte-level BPE tokenizer of this size on the train split instead")
    parser.add_argument("--seq-len", type=int, metavar="N", default=256,
                        help="tokens per training sample; each stored window holds seq_len + 1 tokens")
    parser.add_argument("--text-field", default="text", metavar="FIELD",
                        help="record field or column holding the text; dotted paths reach nested fields (meta.body)")
    parser.add_argument("--val-fraction", type=float, metavar="F", default=0.01,
                        help="fraction of documents assigned to the val split by content hash")
    parser.add_argument("--test-fraction", type=float, metavar="F", default=0.01,
                        help="fraction of documents assigned to the test split by content hash")
    parser.add_argument("--samples-per-shard", type=int, metavar="N", default=2048, help="samples per .tar shard")
    parser.add_argument("--workers", type=int, metavar="N", default=1,
                        help="tokenizer processes; the output is identical for any value")
    parser.add_argument("--seed", type=int, metavar="N", default=0, help="seed of the split hash")
    parser.add_argument("--min-chars", type=int, metavar="N", default=1,
                        help="skip documents shorter than this many characters (reason 'empty')")
    parser.add_argument("--limit-documents", type=int, metavar="N",
                        help="stop after the first N usable documents (for quick trials)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the dataset (manifest, tokenizer, split folders) in a non-empty --output")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    return PrepareConfig(
        inputs=tuple(args.inputs),
        output=args.output,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        seed=args.seed,
        min_chars=args.min_chars,
        limit_documents=args.limit_documents,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


# ---------------------------------------------------------------------------------------------
# Steps


def _outside(specs: list[InputSpec], output: Path) -> list[InputSpec]:
    """Drop inputs inside the output directory, so a re-run never reads its own results."""
    out = output.resolve()
    return [s for s in specs if out != s.path.resolve() and out not in s.path.resolve().parents]


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


def _warn(err: TextIO) -> Callable[[str], None]:
    return lambda message: print(f"{PROG}: warning: {message}", file=err)


def _train_tokenizer(config: PrepareConfig, specs: list[InputSpec], err: TextIO) -> Any:
    """Train on the train split only, streamed from disk: val/test must stay unseen."""
    report = ScanReport.for_inputs(specs)
    train_docs = 0

    def train_texts() -> Iterator[str]:
        nonlocal train_docs
        for text in _documents(config, specs, report, _warn(err)):
            if _split_of(config, text) == "train":
                train_docs += 1
                yield text

    assert config.vocab_size is not None
    tokenizer = train_bpe_tokenizer(train_texts(), config.vocab_size, show_progress=_progress_on(config, err))
    if train_docs == 0:
        raise UsageError(f"no training documents to train a tokenizer on{_skip_summary(report)}")
    return tokenizer


def _progress_on(config: PrepareConfig, err: TextIO) -> bool:
    return config.progress and err.isatty()


def _skip_summary(report: ScanReport) -> str:
    if not report.by_reason:
        return ""
    reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(report.by_reason.items()))
    return f" (skipped records: {reasons})"


@dataclass
class _SplitOutput:
    packer: TokenPacker
    writer: RecordingShardWriter

    def add(self, split: str, ids: Any) -> None:
        for window in self.packer.add(ids):
            self.writer.write({"__key__": f"{split}-{self.writer.samples:010d}", "tokens.npy": window})

    def to_manifest(self, output: Path) -> dict[str, Any]:
        return {
            "shards": [p.relative_to(output).as_posix() for p in self.writer.shards],
            "shard_samples": list(self.writer.shard_samples),
            "samples": self.writer.samples,
            "tokens": self.packer.tokens_out,
            "documents": self.packer.documents,
            "dropped_tokens": self.packer.dropped_tokens,
        }


def _write_shards(config: PrepareConfig, specs: list[InputSpec], tokenizer_dir: Path, eos_id: int,
                  dtype: Any, report: ScanReport, warn: Callable[[str], None] | None,
                  err: TextIO) -> dict[str, _SplitOutput]:
    outputs = {
        split: _SplitOutput(TokenPacker(config.seq_len, eos_id, dtype),
                            RecordingShardWriter(config.output / split, config.samples_per_shard))
        for split in SPLITS
    }
    tagged = ((_split_of(config, text), text) for text in _documents(config, specs, report, warn))
    tokens = 0
    with tqdm(unit="doc", desc="tokenizing", disable=not _progress_on(config, err), file=err) as bar:
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


def build_manifest(config: PrepareConfig, tokenizer: Any, trained: bool, dtype: Any,
                   report: ScanReport, outputs: dict[str, _SplitOutput]) -> dict[str, Any]:
    return {
        "kind": "text",
        "version": MANIFEST_VERSION,
        "created_by": PROG,
        "seq_len": config.seq_len,
        "token_dtype": str(dtype),
        "tokenizer": {
            "path": TOKENIZER_SUBDIR,
            "vocab_size": len(tokenizer),
            "eos_token": tokenizer.eos_token,
            "eos_token_id": tokenizer.eos_token_id,
            "trained": trained,
            "source": None if trained else str(config.tokenizer),
        },
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "test_fraction": config.test_fraction,
        "samples_per_shard": config.samples_per_shard,
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
        reasons = ", ".join(f"{r}={c:,}" for r, c in skipped["by_reason"].items())
        lines.append(f"  skipped {skipped['total']:,} records: {reasons}")
    else:
        lines.append("  skipped 0 records")
    return "\n".join(lines)


def run(config: PrepareConfig, out: TextIO | None = None, err: TextIO | None = None) -> dict[str, Any]:
    """Prepare the dataset described by `config`; return the manifest written."""
    # Looked up per call, not bound at import, so redirected streams (tests, notebooks) work.
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    started = time.perf_counter()
    problems = config.problems()
    if problems:
        raise UsageError("; ".join(problems))
    specs = _outside(resolve_inputs(config.inputs), config.output)
    if not specs:
        raise InputError(f"every input is inside the output directory {config.output}")
    external = load_tokenizer(config.tokenizer) if config.tokenizer is not None else None
    prepare_output_dir(config.output, config.overwrite, owned=[TOKENIZER_SUBDIR])

    tokenizer_dir = config.output / TOKENIZER_SUBDIR
    trained = external is None
    save_tokenizer(_train_tokenizer(config, specs, err) if trained else external, tokenizer_dir)
    # From here on only the saved copy is used, as the trainer will.
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(len(tokenizer))

    report = ScanReport.for_inputs(specs)
    # When training, the first pass has already printed the per-file warnings.
    warn = None if trained else _warn(err)
    outputs = _write_shards(config, specs, tokenizer_dir, tokenizer.eos_token_id, dtype, report, warn, err)
    if report.documents == 0:
        raise UsageError(f"no usable documents in the inputs{_skip_summary(report)}")

    manifest = build_manifest(config, tokenizer, trained, dtype, report, outputs)
    write_manifest(config.output, manifest)
    print(format_summary(manifest, config.output, time.perf_counter() - started), file=out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, build_parser(), argv, lambda args: run(config_from_args(args)), (InputError, TokenizerError))


if __name__ == "__main__":
    sys.exit(main())
