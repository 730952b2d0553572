#!/usr/bin/env python
"""Throughput of ``prepare-text`` (tokenize + pack + write shards) and what --workers buys.

Runs ``python -m data_pipelines.text.prepare ... --no-progress`` as a subprocess on a corpus
of Python standard library sources (by default its top-level ``*.py`` files; --recursive
takes every ``*.py`` below it, outside site-packages: about 7x more) with --seq-len 128:

  workers=1            --tokenizer T --workers 1
  workers=2            --tokenizer T --workers 2     (T: one BPE trained beforehand, untimed)
  workers=1 serial     as workers=1, with TOKENIZERS_PARALLELISM=false in its environment
  train+workers=1      --vocab-size 4096 --workers 1 (BPE training included in the time)

tokens/s = manifest tokens (sum over splits of tokens + dropped_tokens) / wall seconds of
the whole subprocess (interpreter start-up and imports included). Also reported: the
seconds prepare-text prints itself (from its start, imports excluded, 0.1 s resolution),
the CPU seconds of the process tree (user + sys; CPU/wall shows how many cores it kept
busy), and the ratio of each row to workers=1.

Why the serial row: with --workers 1 the Hugging Face fast tokenizer encodes each batch
with its own Rust thread pool, so "one worker" can already use several cores;
--workers N > 1 turns that pool off in its worker processes.

    python benchmarks/bench_prepare_text.py --json prepare.json
    python benchmarks/bench_prepare_text.py --recursive --json prepare-recursive.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data_pipelines.manifest import read_manifest  # noqa: E402

SEQ_LEN = 128
VOCAB_SIZE = 4096
SUMMARY = re.compile(r"wrote .* in ([0-9.]+)s \(")


def corpus_files(recursive: bool, max_bytes: int | None) -> list[Path]:
    """Sorted stdlib *.py files (site-packages and __pycache__ left out), cut at max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if recursive:
        files = sorted(p for p in root.rglob("*.py")
                       if p.is_file() and not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts))
    else:
        files = sorted(p for p in root.glob("*.py") if p.is_file())
    if max_bytes is None:
        return files
    chosen: list[Path] = []
    total = 0
    for path in files:
        size = path.stat().st_size
        if chosen and total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def train_tokenizer(files: list[Path], target: Path) -> float:
    """Train the shared BPE once, with the project's own reader and trainer (untimed rows)."""
    from data_pipelines.text.sources import ScanReport, iter_documents, resolve_inputs
    from data_pipelines.text.tokenizer import save_tokenizer, train_bpe_tokenizer

    started = time.perf_counter()
    specs = resolve_inputs([str(f) for f in files])
    docs = iter_documents(specs, "text", 1, ScanReport.for_inputs(specs), None)
    save_tokenizer(train_bpe_tokenizer(docs, VOCAB_SIZE), target)
    return time.perf_counter() - started


def run_prepare(files: list[Path], output: Path, extra: list[str], env_extra: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "data_pipelines.text.prepare", *map(str, files), "--output", str(output),
           "--seq-len", str(SEQ_LEN), "--no-progress", "--overwrite", *extra]
    env = {**os.environ, **env_extra}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"prepare-text failed with exit code {proc.returncode}: {' '.join(extra)}")
    manifest = read_manifest(output)
    tokens = sum(s["tokens"] + s["dropped_tokens"] for s in manifest["splits"].values())
    match = SUMMARY.search(proc.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cli_s": float(match.group(1)) if match else None, "cpu_s": cpu,
            "tokens": tokens, "documents": sum(s["documents"] for s in manifest["splits"].values()),
            "skipped": manifest["skipped"]["total"], "tokens_per_s": tokens / wall}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's layout; show defaults only where there is one (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter,
                                     epilog="More in benchmarks/README.md.")
    parser.add_argument("--recursive", action="store_true",
                        help="use every *.py file under the stdlib directory (site-packages excluded; ~30 MB, "
                        "~10M tokens, ~1.5 min per repeat on 2 cores) instead of only its top-level *.py files "
                        "(~4.7 MB, ~1.3M tokens)")
    parser.add_argument("--max-bytes", type=int, metavar="N",
                        help="keep only the first files (sorted by path) whose sizes add up to at most N bytes "
                        "(at least one file)")
    parser.add_argument("--workers", type=int, default=2, metavar="W",
                        help="worker count of the parallel row, compared with --workers 1")
    parser.add_argument("--repeats", type=int, default=1, metavar="R",
                        help="runs per row, interleaved across rows; the median is reported")
    parser.add_argument("--no-serial", action="store_true",
                        help="skip the 'workers=1 serial' row (TOKENIZERS_PARALLELISM=false)")
    parser.add_argument("--no-train", action="store_true", help="skip the --vocab-size row (BPE training timed)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write settings, every run and the medians here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 2 or args.repeats < 1:
        raise SystemExit("--workers must be >= 2 and --repeats >= 1")
    if args.max_bytes is not None and args.max_bytes < 1:
        raise SystemExit("--max-bytes must be >= 1")
    files = corpus_files(args.recursive, args.max_bytes)
    corpus_bytes = sum(f.stat().st_size for f in files)
    corpus = ("stdlib **/*.py" if args.recursive else "stdlib top-level *.py") + (
        f", first {args.max_bytes:,} bytes" if args.max_bytes is not None else "")
    print(f"corpus: {corpus}: {len(files):,} files, {corpus_bytes / 1e6:.1f} MB; {os.cpu_count()} CPUs")

    with tempfile.TemporaryDirectory(prefix="bench-prepare-text-") as tmp_name:
        tmp = Path(tmp_name)
        tok_dir = tmp / "tokenizer"
        train_s = train_tokenizer(files, tok_dir)
        print(f"shared tokenizer (vocab {VOCAB_SIZE}) trained in {train_s:.1f}s (not part of any row)")

        rows: list[tuple[str, list[str], dict[str, str]]] = [
            ("workers=1", ["--tokenizer", str(tok_dir), "--workers", "1"], {}),
            (f"workers={args.workers}", ["--tokenizer", str(tok_dir), "--workers", str(args.workers)], {}),
        ]
        if not args.no_serial:
            rows.append(("workers=1 serial", ["--tokenizer", str(tok_dir), "--workers", "1"],
                         {"TOKENIZERS_PARALLELISM": "false"}))
        if not args.no_train:
            rows.append(("train+workers=1", ["--vocab-size", str(VOCAB_SIZE), "--workers", "1"], {}))

        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in rows}
        for rep in range(args.repeats):
            for i, (name, extra, env) in enumerate(rows):
                r = run_prepare(files, tmp / f"out{i}", extra, env)
                runs[name].append(r)
                print(f"  run {rep + 1}/{args.repeats} {name:<18} {r['wall_s']:6.1f}s wall "
                      f"{r['tokens_per_s']:>10,.0f} tokens/s", flush=True)

    token_counts = {r["tokens"] for rs in runs.values() for r in rs}
    if len(token_counts) > 1:
        print(f"note: token totals differ between rows ({sorted(token_counts)}): the trained tokenizer of "
              "the --vocab-size row sees only the train split")

    def med(name: str, key: str) -> float | None:
        values = [r[key] for r in runs[name] if r[key] is not None]
        return statistics.median(values) if values else None

    base = med("workers=1", "tokens_per_s")
    results = []
    for name, extra, env in rows:
        tps, wall, cpu = med(name, "tokens_per_s"), med(name, "wall_s"), med(name, "cpu_s")
        walls = [r["wall_s"] for r in runs[name]]
        results.append({"name": name, "args": extra, "env": env, "tokens": runs[name][0]["tokens"],
                        "min_wall_s": min(walls), "max_wall_s": max(walls),
                        "wall_s": wall, "cli_s": med(name, "cli_s"), "cpu_s": cpu,
                        "cores_busy": cpu / wall, "tokens_per_s": tps, "ratio_vs_workers1": tps / base,
                        "runs": runs[name]})

    print()
    print(f"{'row':<18} {'tokens':>11} {'wall s':>7} {'min..max':>11} {'cli s':>6} {'cpu s':>6} {'cores':>5} "
          f"{'tokens/s':>10} {'vs w=1':>7}")
    for r in results:
        cli = f"{r['cli_s']:6.1f}" if r["cli_s"] is not None else f"{'-':>6}"
        spread = f"{r['min_wall_s']:.1f}..{r['max_wall_s']:.1f}"
        print(f"{r['name']:<18} {r['tokens']:>11,} {r['wall_s']:7.1f} {spread:>11} {cli} {r['cpu_s']:6.1f} {r['cores_busy']:5.2f} "
              f"{r['tokens_per_s']:>10,.0f} {r['ratio_vs_workers1']:6.2f}x")
    w = next(r for r in results if r["name"] == f"workers={args.workers}")
    print(f"\nworkers={args.workers} / workers=1: {w['ratio_vs_workers1']:.2f}x tokens/s (wall, start-up included)")

    if args.json is not None:
        report = {
            "benchmark": "prepare_text",
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count()},
            "versions": {"python": platform.python_version(), **{pkg: _version(pkg) for pkg in ("tokenizers", "transformers", "webdataset", "numpy")}},
            "settings": {"corpus": corpus, "files": len(files), "bytes": corpus_bytes, "seq_len": SEQ_LEN,
                         "vocab_size": VOCAB_SIZE, "workers": args.workers, "repeats": args.repeats,
                         "shared_tokenizer_train_s": train_s,
                         "tokens_per_s": "manifest (tokens + dropped_tokens) / subprocess wall seconds"},
            "results": results,
            f"workers{args.workers}_over_workers1": w["ratio_vs_workers1"],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
