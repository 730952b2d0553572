"""The scaffold of the data commands (prepare-text, prepare-image-text, make-synthetic-image-text).

They share more than a look: the flags every dataset has (spelled here once, worded by each
command), the checks of those settings, the rules for the output directory, the tokenizer saved
with the data and its manifest entry, how a run reports (warnings, progress bars, the summary
after the manifest) and main()'s error handling (exit 2 with one line, no traceback). A command
keeps only what is its own: its inputs, its samples and its manifest.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar

from tqdm import tqdm

from data_pipelines import limits
from data_pipelines.manifest import MANIFEST_NAME, read_manifest, write_manifest
from data_pipelines.shards import RecordingShardWriter
from data_pipelines.splits import SPLITS, validate_fractions
from data_pipelines.text.tokenizer import MIN_VOCAB_SIZE, load_tokenizer, save_tokenizer

TOKENIZER_SUBDIR = "tokenizer"


class UsageError(Exception):
    """A bad flag combination or output directory; reported without a traceback, exit 2."""


# ---------------------------------------------------------------------------------------------
# Flags: names, types and metavars are the same in every command; the help speaks its language.


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults only where there is one worth showing (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def add_output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        type=Path,
        metavar="DIR",
        help="output directory (must be empty or new unless --overwrite)",
    )


def add_corpus_flags(
    parser: argparse.ArgumentParser, inputs_help: str, *, tokenizer_required: bool, tokenizer_help: str, vocab_help: str
) -> None:
    """The head of a command that reads inputs: the inputs, --output, and the caption or text
    tokenizer, either copied (--tokenizer) or trained on the train split (--vocab-size)."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=inputs_help)
    add_output_flag(parser)
    tok = parser.add_mutually_exclusive_group(required=tokenizer_required)
    tok.add_argument("--tokenizer", type=Path, metavar="PATH", help=tokenizer_help)
    tok.add_argument("--vocab-size", type=int, metavar="N", help=vocab_help)
    add_limit_flags(parser)


LIMIT_FLAGS: dict[str, tuple[str, str]] = {  # Limits field -> (metavar, help)
    "max_member_bytes": (
        "N",
        "skip a sample whose tar member (by its size header, never read) or image file is larger (reason 'too_large')",
    ),
    "max_document_bytes": (
        "N",
        "skip a text file, JSON-lines line (decompressed) or text cell larger than this "
        "(reasons 'too_large', 'line_too_long'); read in bounded pieces",
    ),
    "max_image_pixels": (
        "N",
        "skip an image whose header declares more pixels (width x height), before decoding it "
        "(reason 'too_many_pixels')",
    ),
    "max_sidecar_bytes": ("N", "skip a sample whose sidecar (caption .txt, .json) is larger; cap on _stats.json"),
    "max_template_chars": ("N", "skip a conversation whose rendered chat template is longer (chat data)"),
}


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The caps on what one input may cost (`data_pipelines.limits`), and --follow-symlinks."""
    group = parser.add_argument_group("limits on hostile or broken inputs (skipped and counted by reason)")
    defaults = limits.Limits()
    for name, (metavar, text) in LIMIT_FLAGS.items():
        group.add_argument(
            f"--{name.replace('_', '-')}", type=int, metavar=metavar, default=getattr(defaults, name), help=text
        )
    group.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read symbolic links found in input folders (files and folders; each real folder once) and "
        "table paths outside the table's folder; without it they are skipped (reasons 'symlink', "
        "'outside_root'). FIFOs, devices and sockets are always skipped ('not_regular_file')",
    )


def configure_limits(args: argparse.Namespace) -> None:
    """Set this process's `limits` from the flags of `add_limit_flags` (if the command has them);
    worker processes inherit them. UsageError for a cap below 1."""
    flags = vars(args)
    if "follow_symlinks" not in flags:
        return
    chosen = limits.Limits(**{name: flags[name] for name in LIMIT_FLAGS}, follow_symlinks=flags["follow_symlinks"])
    problems = chosen.problems()
    if problems:
        raise UsageError("; ".join(problems))
    limits.configure(chosen)


def add_fraction_flags(parser: argparse.ArgumentParser, default: float, help_template: str) -> None:
    """--val-fraction and --test-fraction; `help_template` names the split as {split}."""
    for split in ("val", "test"):
        parser.add_argument(
            f"--{split}-fraction", type=float, metavar="F", default=default, help=help_template.format(split=split)
        )


def add_shard_flag(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument("--samples-per-shard", type=int, metavar="N", default=default, help="samples per .tar shard")


def add_sharding_flags(parser: argparse.ArgumentParser, samples_per_shard: int, worker: str) -> None:
    """--samples-per-shard, --workers (`worker` names what a worker process does) and the seed of
    the split hash, as a command that reads inputs has them."""
    add_shard_flag(parser, samples_per_shard)
    parser.add_argument(
        "--workers", type=int, metavar="N", default=1, help=f"{worker} processes; the output is identical for any value"
    )
    parser.add_argument("--seed", type=int, metavar="N", default=0, help="seed of the split hash")


CORPUS_OVERWRITE_HELP = "replace the dataset (manifest, tokenizer, split folders) in a non-empty --output"


def add_overwrite_flags(parser: argparse.ArgumentParser, overwrite_help: str, progress_help: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    parser.add_argument("--no-progress", action="store_true", help=progress_help)


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def node_defaults() -> tuple[int, int]:
    """(--num-nodes, --node-rank) defaults: a SLURM array job's task count and this task's index
    from its first (SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN), else (1, 0)."""
    count, task = _env_int("SLURM_ARRAY_TASK_COUNT"), _env_int("SLURM_ARRAY_TASK_ID")
    if count is None or task is None:
        return 1, 0
    return count, task - (_env_int("SLURM_ARRAY_TASK_MIN") or 0)


def add_node_flags(parser: argparse.ArgumentParser, unit: str) -> None:
    """--num-nodes and --node-rank: prepare one share of the inputs on each of several machines."""
    num_nodes, node_rank = node_defaults()
    parser.add_argument(
        "--num-nodes",
        type=int,
        metavar="N",
        default=num_nodes,
        help=f"split the inputs ({unit}) across N machines sharing --output: each writes its own "
        "shards and DIR/parts/node-RANK.json, then `prepare-merge DIR` writes manifest.json; "
        "in a SLURM array job the default is $SLURM_ARRAY_TASK_COUNT",
    )
    parser.add_argument(
        "--node-rank",
        type=int,
        metavar="I",
        default=node_rank,
        help="this machine's index, 0 to N-1 (default: $SLURM_ARRAY_TASK_ID - "
        "$SLURM_ARRAY_TASK_MIN in a SLURM array job, else 0)",
    )


def node_problems(num_nodes: int, node_rank: int) -> list[str]:
    if num_nodes < 1:
        return ["--num-nodes must be >= 1"]
    if not 0 <= node_rank < num_nodes:
        return [f"--node-rank must be in 0..{num_nodes - 1} for --num-nodes {num_nodes}, got {node_rank}"]
    return []


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True, kw_only=True)
class CommandConfig:
    """The settings of every data command: where the dataset goes, how it is split and sharded,
    and whether progress shows. A command subclasses it, giving its own defaults where they differ."""

    output: Path
    val_fraction: float = 0.01
    test_fraction: float = 0.01
    samples_per_shard: int = 1000
    seed: int = 0
    overwrite: bool = False
    progress: bool = True

    def problems(self) -> list[str]:
        """Every invalid shared setting, named as the user typed it; a subclass puts its own first."""
        found: list[str] = []
        try:
            validate_fractions(self.val_fraction, self.test_fraction)
        except ValueError as exc:
            found.append(str(exc).replace("val_fraction", "--val-fraction").replace("test_fraction", "--test-fraction"))
        if self.samples_per_shard < 1:
            found.append("--samples-per-shard must be >= 1")
        workers = getattr(self, "workers", None)  # only commands that read inputs have workers
        if workers is not None and workers < 1:
            found.append("--workers must be >= 1")
        if not -(2**63) <= self.seed < 2**63:
            found.append("--seed must fit in a signed 64-bit integer")
        if self.output.exists() and not self.output.is_dir():
            found.append(f"--output {self.output} exists and is not a directory")
        return found

    def split_manifest(self) -> dict[str, Any]:
        """The settings that decide which split a sample lands in and how it is sharded."""
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "samples_per_shard": self.samples_per_shard,
        }


@dataclass(frozen=True, kw_only=True)
class CorpusConfig(CommandConfig):
    """The settings of a command that reads inputs with worker processes and saves a tokenizer."""

    inputs: tuple[str, ...]
    tokenizer: Path | None = None
    vocab_size: int | None = None
    workers: int = 1

    def tokenizer_problems(self, required: bool) -> list[str]:
        found: list[str] = []
        if required and (self.tokenizer is None) == (self.vocab_size is None):
            found.append("pass exactly one of --tokenizer PATH or --vocab-size N")
        if not required and self.tokenizer is not None and self.vocab_size is not None:
            found.append("pass at most one of --tokenizer PATH or --vocab-size N")
        if self.vocab_size is not None and self.vocab_size < MIN_VOCAB_SIZE:
            found.append(f"--vocab-size must be >= {MIN_VOCAB_SIZE} (256 bytes + <|endoftext|>)")
        if self.tokenizer is not None and not self.tokenizer.is_dir():
            found.append(f"--tokenizer {self.tokenizer}: not a directory")
        return found


Config = TypeVar("Config", bound=CommandConfig)


def config_from_args(cls: type[Config], args: argparse.Namespace) -> Config:
    """Each field from the flag of the same name (a missing one is a KeyError, not a silent
    default), but `progress`, which --no-progress turns off; inputs become a tuple, so the
    frozen config stays hashable."""
    flags = vars(args)
    values = {f.name: flags[f.name] for f in dataclasses.fields(cls) if f.name != "progress"}
    if "inputs" in values:
        values["inputs"] = tuple(values["inputs"])
    return cls(**values, progress=not flags["no_progress"])


# ---------------------------------------------------------------------------------------------
# The output directory


class _HasPath(Protocol):
    path: Path


Spec = TypeVar("Spec", bound=_HasPath)


def outside(specs: list[Spec], output: Path) -> list[Spec]:
    """Drop inputs inside the output directory, so a re-run never reads its own results."""
    out = output.resolve()
    return [s for s in specs if out != s.path.resolve() and out not in s.path.resolve().parents]


# The commands whose manifest.json marks a folder as a dataset of ours, which --overwrite may replace.
DATASET_MAKERS = {"prepare-text": "text", "prepare-image-text": "image-text", "make-synthetic-image-text": "image-text"}


# What a split folder of ours holds: shards (un-ranked or a node's), sizes.json and their temporary files.
_SPLIT_FILE = re.compile(r"shard-(r[0-9]{5}-)?[0-9]{6}\.tar|sizes\.json|\.(shard-|sizes\.json-).*")


def holds_our_dataset(output: Path) -> bool:
    """A manifest.json one of the DATASET_MAKERS wrote (its kind and created_by), node parts, or
    (what a run or an overwrite that was interrupted leaves) split folders holding only our shards."""
    if any(p.is_file() for p in (output / "parts").glob("node-[0-9][0-9][0-9][0-9][0-9].json")):
        return True
    try:
        manifest = read_manifest(output / MANIFEST_NAME, paths=False)  # a FIFO or a huge file: refused
        if isinstance(manifest, dict) and DATASET_MAKERS.get(manifest.get("created_by")) == manifest.get("kind"):
            return True
    except (OSError, ValueError):
        pass
    splits = [output / s for s in SPLITS if (output / s).exists() or (output / s).is_symlink()]
    return bool(splits) and all(
        d.is_dir() and not d.is_symlink() and all(_SPLIT_FILE.fullmatch(f.name) and f.is_file() for f in d.iterdir())
        for d in splits
    )


def prepare_output_dir(output: Path, overwrite: bool, owned: Iterable[str] = ()) -> None:
    """Create the output directory, refusing to mix a new dataset into an old one. With
    overwrite, the manifest goes first (an interrupted overwrite must not look complete), then
    the split folders and the other names the dataset ``owned``: only in a folder that holds a
    dataset of ours (`holds_our_dataset`), never someone's own train/ or test/."""
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise UsageError(f"output directory {output} is not empty; pass --overwrite to replace its dataset")
        doomed = [output / n for n in (*owned, *SPLITS) if (output / n).exists() or (output / n).is_symlink()]
        if doomed and not holds_our_dataset(output):
            raise UsageError(
                f"--overwrite: {output} holds {doomed[0].name} but no manifest.json or parts/ of a dataset "
                f"this toolkit prepared, so nothing there is replaced; remove it yourself or choose another --output"
            )
        (output / MANIFEST_NAME).unlink(missing_ok=True)
        for path in doomed:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    output.mkdir(parents=True, exist_ok=True)


def shards_manifest(writer: RecordingShardWriter, output: Path) -> dict[str, Any]:
    """A split's shards as the manifest lists them: relative to the dataset, so it can move."""
    return {
        "shards": [p.relative_to(output).as_posix() for p in writer.shards],
        "shard_samples": list(writer.shard_samples),
        "samples": writer.samples,
    }


# ---------------------------------------------------------------------------------------------
# The tokenizer saved with the data


def external_tokenizer(path: Path | None) -> Any:
    """The tokenizer a user named, or None; loaded before the output directory is touched, so a
    bad one fails without deleting anything."""
    return None if path is None else load_tokenizer(path)


def save_tokenizer_copy(tokenizer: Any, output: Path) -> Any:
    """Save into DIR/tokenizer and return the saved copy: that is what the trainer will load, so
    the manifest describes it and the command uses it from here on."""
    directory = output / TOKENIZER_SUBDIR
    save_tokenizer(tokenizer, directory)
    return load_tokenizer(directory)


def tokenizer_manifest(tokenizer: Any, source: Path | None) -> dict[str, Any]:
    """The manifest entry of the saved tokenizer: copied from `source`, or trained (None)."""
    return {
        "path": TOKENIZER_SUBDIR,
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "trained": source is None,
        "source": None if source is None else str(source),
    }


# ---------------------------------------------------------------------------------------------
# A run


@dataclass(frozen=True)
class Console:
    """Where a run reports: the summary on `out`; warnings and progress bars on `err`."""

    prog: str
    out: TextIO
    err: TextIO
    progress: bool
    started: float

    def warn(self, message: str) -> None:
        print(f"{self.prog}: warning: {message}", file=self.err)

    @property
    def bars(self) -> bool:
        """Progress bars only on a terminal: in a log file they are noise."""
        return self.progress and self.err.isatty()

    def bar(self, iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
        return tqdm(iterable, disable=not self.bars, file=self.err, **kwargs)

    def finish(
        self, output: Path, manifest: dict[str, Any], summary: Callable[[dict[str, Any], Path, float], str]
    ) -> dict[str, Any]:
        """Write the manifest, last, as its presence means "complete"; then print the summary."""
        write_manifest(output, manifest)
        print(summary(manifest, output, time.perf_counter() - self.started), file=self.out)
        for problem in empty_splits(manifest):
            self.warn(problem)
        return manifest


def empty_splits(manifest: Mapping[str, Any]) -> list[str]:
    """A split asked for (a fraction above 0) that got no sample: a corpus too small for its
    fraction. Training refuses such data at start; say so now, when re-preparing is cheap."""
    found = []
    for split in ("val", "test"):
        fraction = manifest.get(f"{split}_fraction") or 0
        info = manifest.get("splits", {}).get(split, {})
        if fraction > 0 and not info.get("samples"):
            total = sum(s.get("samples", 0) for s in manifest.get("splits", {}).values())
            found.append(
                f"the {split} split is empty: --{split}-fraction {fraction} of {total:,} samples gave none "
                f"(hashing assigns whole documents or samples); use a larger --{split}-fraction or more data"
                + (", or training will refuse this data without data.eval_sources" if split == "val" else "")
            )
    return found


def start_run(prog: str, config: CommandConfig, out: TextIO | None, err: TextIO | None) -> Console:
    """The opening of every run(): start the clock and refuse the config with every problem at
    once, so a user fixes them in one go. Streams are looked up per call, not bound at import, so
    redirected ones (tests, notebooks) work."""
    started = time.perf_counter()
    problems = config.problems()
    if problems:
        raise UsageError("; ".join(problems))
    return Console(
        prog, sys.stdout if out is None else out, sys.stderr if err is None else err, config.progress, started
    )


def reason_counts(counts: Mapping[str, int], number_format: str = "") -> str:
    """'reason=count, ...' in reason order, for summaries and error messages."""
    return ", ".join(f"{reason}={count:{number_format}}" for reason, count in sorted(counts.items()))


def run_main(
    prog: str,
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    config: type[Config],
    run: Callable[[Config], Any],
    errors: tuple[type[BaseException], ...],
) -> int:
    """Parse, run, and turn the command's own errors into one line on stderr and exit 2."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    try:
        configure_limits(args)
        run(config_from_args(config, args))
    except (UsageError, *errors) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


_exit_hook_registered = False


def freeze_heap_at_exit() -> None:
    """Have the interpreter skip its final garbage collections over what is alive at exit.

    Those passes walk every object torch (imported by webdataset) and transformers created at
    import: ~0.3-0.4 s of each prepare run on this project's 2-core machine, more than the
    tokenizing of a small corpus. gc.freeze, as the first exit handler, moves those objects out
    of the collector's reach; the process frees them as it ends all the same.
    """
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(gc.freeze)
        _exit_hook_registered = True
