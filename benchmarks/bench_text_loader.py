#!/usr/bin/env python
"""Throughput of the streaming text loader against a bare webdataset read loop.

Prepares (once) packed token shards from the top-level ``*.py`` files of the Python
standard library, then measures tokens/s of:

  bare        read_samples + np.load of tokens.npy: no shuffle, no batching (the baseline)
  loader_w0   train_loader(..., world_size=1, num_workers=0)
  loader_w2   train_loader(..., world_size=1, num_workers=2)   (torch DataLoader; --workers)
  rank0_of_2  train_loader(..., rank=0, world_size=2, num_workers=0): tokens/s *per rank*

Every measurement reads the same number of samples (``--epochs`` passes over the train
split, rounded up to whole batches) after a warm-up (``--warmup-samples``, which also fills
the --shuffle-buffer), on a freshly built stream. Each row is measured ``--repeats`` times,
rows interleaved; reported are the median tokens/s and the median of the per-repeat ratios
to the bare loop (a row and the bare loop of one repeat run seconds apart, so bursts of
machine noise mostly cancel). "1st batch" is the median time from building a stream to its
first batch (shuffle buffer fill, DataLoader worker start). Tokens are counted as samples x
seq_len (the tokens a model trains on; each stored window holds seq_len + 1 ids) for every
row alike, so the ratios are like for like.

    python benchmarks/bench_text_loader.py --json loader.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# Runnable as a plain script from anywhere: the repository root goes on sys.path.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset  # noqa: E402

from data_pipelines.loader import TextShards, read_samples, train_loader  # noqa: E402
from data_pipelines.manifest import MANIFEST_NAME, read_manifest  # noqa: E402

VOCAB_SIZE = 4096
SEQ_LEN = 128
SPLIT = "train"


def stdlib_files() -> list[Path]:
    """The corpus: top-level *.py files of the standard library, sorted."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def ensure_data(directory: Path, workers: int) -> tuple[TextShards, float | None]:
    """Prepare shards into ``directory`` unless a complete dataset is already there.

    Returns the dataset and the preparation time (None when reused)."""
    if (directory / MANIFEST_NAME).is_file():
        manifest = read_manifest(directory)
        if manifest.get("kind") == "text" and manifest.get("seq_len") == SEQ_LEN:
            return TextShards(directory), None
        raise SystemExit(
            f"{directory} holds a dataset with seq_len {manifest.get('seq_len')} "
            f"(kind {manifest.get('kind')!r}); expected text with seq_len {SEQ_LEN}. "
            "Pass another --data directory."
        )
    cmd = [
        sys.executable,
        "-m",
        "data_pipelines.text.prepare",
        *map(str, stdlib_files()),
        "--output",
        str(directory),
        "--vocab-size",
        str(VOCAB_SIZE),
        "--seq-len",
        str(SEQ_LEN),
        "--workers",
        str(workers),
        "--no-progress",
        "--overwrite",
    ]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"prepare-text failed with exit code {proc.returncode}")
    return TextShards(directory), seconds


# ---------------------------------------------------------------------------------------------
# Streams. Each yields batches as an int count of samples, so one timing loop serves them all.


def bare_stream(urls: list[str], batch_size: int) -> Iterator[int]:
    """The baseline: read every shard in order, decode tokens.npy, forever. Counts samples
    in groups of batch_size so it is timed over exactly as many samples as the loaders."""
    n = 0
    while True:
        for sample in read_samples(urls):
            window = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
            assert window.size == SEQ_LEN + 1
            n += 1
            if n == batch_size:
                yield n
                n = 0


def loader_stream(
    data: TextShards, batch_size: int, rank: int, world_size: int, num_workers: int, shuffle_buffer: int
) -> Iterator[int]:
    it = train_loader(
        data,
        SPLIT,
        batch_size,
        rank=rank,
        world_size=world_size,
        seed=0,
        shuffle_buffer=shuffle_buffer,
        num_workers=num_workers,
    )
    try:
        for batch in it:
            ids = batch["input_ids"]
            assert ids.shape == (batch_size, SEQ_LEN) and batch["labels"].shape == ids.shape
            yield ids.shape[0]
    finally:
        # Stops DataLoader worker processes now instead of at garbage collection.
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def measure(make: Callable[[], Iterator[int]], warmup_batches: int, batches: int) -> dict[str, float]:
    """Build a fresh stream, time to its first batch (start-up), skip the warm-up, then time
    ``batches`` batches."""
    started = time.perf_counter()
    stream = make()
    next(stream)
    first = time.perf_counter() - started
    for _ in range(warmup_batches - 1):
        next(stream)
    t0 = time.perf_counter()
    samples = 0
    for _ in range(batches):
        samples += next(stream)
    seconds = time.perf_counter() - t0
    stream.close()
    return {
        "samples": samples,
        "tokens": samples * SEQ_LEN,
        "seconds": seconds,
        "tokens_per_s": samples * SEQ_LEN / seconds,
        "first_batch_s": first,
    }


def profile(name: str, make: Callable[[], Iterator[int]], warmup_batches: int, batches: int, top: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    measure(make, warmup_batches, batches)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(f"\n--- cProfile of '{name}' (one measurement incl. warm-up, sorted by own time) ---")
    print(out.getvalue().split("\n", 4)[-1].rstrip())


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's layout; show defaults only where there is one (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=_HelpFormatter, epilog="More in benchmarks/README.md."
    )
    parser.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="dataset directory: reused if it already holds a prepared seq_len-128 text dataset, "
        "else prepared into (and kept). Default: a temporary directory, deleted at the end",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="N",
        help="batch size of the loaders; the bare loop counts samples in groups of N too",
    )
    parser.add_argument(
        "--epochs",
        type=float,
        default=2.0,
        metavar="E",
        help="samples timed per measurement, in passes over the whole train split "
        "(rounded up to whole batches); the same for every row",
    )
    parser.add_argument(
        "--warmup-samples",
        type=int,
        default=2048,
        metavar="N",
        help="samples read (rounded up to whole batches) before the clock starts; should exceed "
        "--shuffle-buffer so the buffer is full",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        metavar="R",
        help="measurements per row (each on a fresh stream); the median is reported",
    )
    parser.add_argument("--shuffle-buffer", type=int, default=1000, metavar="N", help="train_loader shuffle_buffer")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        metavar="W",
        help="num_workers of the DataLoader row, and --workers of prepare-text",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="TOP",
        help="after the timings, cProfile one measurement of the bare loop and of the "
        "num_workers=0 loader and print the TOP functions by own time (0: off)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write settings, every repeat and the medians here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1 or args.epochs <= 0 or args.workers < 1:
        raise SystemExit("--batch-size, --repeats and --workers must be >= 1 and --epochs > 0")

    with tempfile.TemporaryDirectory(prefix="bench-text-loader-") as tmp:
        directory = args.data if args.data is not None else Path(tmp) / "data"
        data, prep_seconds = ensure_data(directory, args.workers)
        split_samples = data.num_samples(SPLIT)
        urls = data.shards(SPLIT)
        batches = -(-int(args.epochs * split_samples) // args.batch_size)
        warmup_batches = max(1, -(-args.warmup_samples // args.batch_size))
        bs = args.batch_size

        rows: list[tuple[str, str, Callable[[], Iterator[int]]]] = [
            ("bare", "webdataset read_samples + np.load (baseline)", lambda: bare_stream(urls, bs)),
            (
                "loader_w0",
                "train_loader, world 1, num_workers=0",
                lambda: loader_stream(data, bs, 0, 1, 0, args.shuffle_buffer),
            ),
            (
                f"loader_w{args.workers}",
                f"train_loader, world 1, num_workers={args.workers}",
                lambda: loader_stream(data, bs, 0, 1, args.workers, args.shuffle_buffer),
            ),
            (
                "rank0_of_2",
                "train_loader, rank 0 of world 2, num_workers=0 (per rank)",
                lambda: loader_stream(data, bs, 0, 2, 0, args.shuffle_buffer),
            ),
        ]
        print(
            f"data: {directory} ({len(urls)} train shards, {split_samples:,} samples of {SEQ_LEN}+1 tokens"
            + (f", prepared in {prep_seconds:.1f}s" if prep_seconds is not None else ", reused")
            + ")"
        )
        print(
            f"per measurement: {batches} batches x {bs} = {batches * bs:,} samples = {batches * bs * SEQ_LEN:,} "
            f"tokens after {warmup_batches} warm-up batches; {args.repeats} repeats, median"
        )

        runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in rows}
        # Round-robin over the rows, so slow drift of the machine hits all of them alike.
        for rep in range(args.repeats):
            for name, _, make in rows:
                runs[name].append(measure(make, warmup_batches, batches))
                print(
                    f"  repeat {rep + 1}/{args.repeats} {name:<12} {runs[name][-1]['tokens_per_s']:>12,.0f} tokens/s",
                    flush=True,
                )

        # The ratio is the median of per-repeat ratios: a row and the bare loop of the same
        # repeat run seconds apart, so bursts of machine noise cancel better than in a ratio
        # of medians.
        bare = [r["tokens_per_s"] for r in runs["bare"]]
        results = []
        for name, what, _ in rows:
            values = [r["tokens_per_s"] for r in runs[name]]
            tps = statistics.median(values)
            ratio = statistics.median(v / b for v, b in zip(values, bare))
            results.append(
                {
                    "name": name,
                    "what": what,
                    "tokens_per_s": tps,
                    "ratio_vs_bare": ratio,
                    "min_tokens_per_s": min(values),
                    "max_tokens_per_s": max(values),
                    "first_batch_s": statistics.median(r["first_batch_s"] for r in runs[name]),
                    "repeats": runs[name],
                }
            )

        print()
        print(f"{'row':<12} {'tokens/s':>12} {'vs bare':>8} {'min..max tokens/s':>23} {'1st batch':>10}  what")
        for r in results:
            spread = f"{r['min_tokens_per_s']:,.0f}..{r['max_tokens_per_s']:,.0f}"
            print(
                f"{r['name']:<12} {r['tokens_per_s']:>12,.0f} {r['ratio_vs_bare']:>7.2f}x {spread:>23} "
                f"{r['first_batch_s']:>9.3f}s  {r['what']}"
            )

        if args.json is not None:
            report = {
                "benchmark": "text_loader",
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpu_count": __import__("os").cpu_count(),
                    "cuda": torch.cuda.is_available(),
                },
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "webdataset": webdataset.__version__,
                    "numpy": np.__version__,
                },
                "settings": {
                    "corpus": "stdlib top-level *.py",
                    "vocab_size": VOCAB_SIZE,
                    "seq_len": SEQ_LEN,
                    "batch_size": bs,
                    "epochs": args.epochs,
                    "warmup_batches": warmup_batches,
                    "batches": batches,
                    "samples_per_measurement": batches * bs,
                    "tokens_per_measurement": batches * bs * SEQ_LEN,
                    "repeats": args.repeats,
                    "shuffle_buffer": args.shuffle_buffer,
                    "workers": args.workers,
                    "token_unit": "samples x seq_len",
                },
                "data": {
                    "dir": str(directory),
                    "train_shards": len(urls),
                    "train_samples": split_samples,
                    "prepare_seconds": prep_seconds,
                },
                "results": results,
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"\nwrote {args.json}")

        if args.profile > 0:
            for name, _, make in rows[:2]:
                profile(name, make, warmup_batches, batches, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
