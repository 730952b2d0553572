#!/usr/bin/env python
"""Throughput of ``prepare-text`` (tokenize + pack + write shards), what --workers buys, and how
close it comes to the tokenizer itself.

Runs ``python -m data_pipelines.text.prepare ... --no-progress`` as a subprocess on a corpus
of Python standard library sources (by default its top-level ``*.py`` files; --recursive
takes every ``*.py`` below it, outside site-packages: about 7x more) with --seq-len 128.
Every row but one has TOKENIZERS_PARALLELISM=false in its environment, so that "one worker"
is one core (the fair baseline):

  workers=1             --tokenizer T --workers 1     (T: one BPE trained beforehand, untimed)
  workers=2             --tokenizer T --workers 2
  workers=1 rust-pool   as workers=1, without TOKENIZERS_PARALLELISM=false: the Hugging Face
                        tokenizer then encodes each batch on its own Rust thread pool
  train+workers=1       --vocab-size 4096 --workers 1 (BPE training included in the time)
  startup w=1, w=2      --tokenizer T --workers 1 / 2 on the corpus's first file only: the
                        fixed cost of a run (interpreter, imports, tokenizer load, exit)

and, as the absolute reference, ``encode_batch``: the Hugging Face tokenizer's own
``tokenizers.Tokenizer.encode_batch`` (T's tokenizer.json, special tokens matched as text and
none added, like prepare-text), single-threaded (TOKENIZERS_PARALLELISM=false), on the same
documents in prepare-text's batches, timed around the encode calls only (reading the files and
the interpreter excluded): the most a core can do in this design. ``encode_batch_fast`` (the
same without character offsets, which prepare-text uses where available) is timed alongside.

tokens/s = manifest tokens (sum over splits of tokens + dropped_tokens: document tokens plus
one eos each; the reference counts the same) / wall seconds of the whole subprocess
(interpreter start-up and imports included). Also reported: the seconds prepare-text prints
itself (from its start, imports excluded, 0.1 s resolution), the CPU seconds of the process
tree (user + sys; CPU/wall shows how many cores it kept busy), the ratio of each row to
workers=1, and per core: tokens/s divided by the cores the row is given (its worker count;
all CPUs for rust-pool) as a ratio of encode_batch's tokens/s.

    python benchmarks/bench_prepare_text.py --json prepare.json
    python benchmarks/bench_prepare_text.py --recursive --repeats 5 --json prepare-recursive.json
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
        files = sorted(
            p
            for p in root.rglob("*.py")
            if p.is_file() and not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)
        )
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
    cmd = [
        sys.executable,
        "-m",
        "data_pipelines.text.prepare",
        *map(str, files),
        "--output",
        str(output),
        "--seq-len",
        str(SEQ_LEN),
        "--no-progress",
        "--overwrite",
        *extra,
    ]
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
    return {
        "wall_s": wall,
        "cli_s": float(match.group(1)) if match else None,
        "cpu_s": cpu,
        "tokens": tokens,
        "documents": sum(s["documents"] for s in manifest["splits"].values()),
        "skipped": manifest["skipped"]["total"],
        "tokens_per_s": tokens / wall,
    }


def encode_reference(tokenizer_dir: Path, file_list: Path) -> dict[str, Any]:
    """In a subprocess (--encode-reference): time encode_batch and encode_batch_fast, one thread."""
    from tokenizers import Tokenizer

    from data_pipelines.text import prepare
    from data_pipelines.text.sources import ScanReport, iter_documents, resolve_inputs

    assert os.environ.get("TOKENIZERS_PARALLELISM") == "false"
    specs = resolve_inputs(file_list.read_text().splitlines())
    docs = list(iter_documents(specs, "text", 1, ScanReport.for_inputs(specs)))
    batches = [texts for _, texts in prepare._batches((0, d) for d in docs)]
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.encode_special_tokens = True  # as prepare-text: a literal "<|endoftext|>" is text
    result: dict[str, Any] = {"documents": len(docs), "batches": len(batches)}
    for name in ("encode_batch", "encode_batch_fast"):
        encode = getattr(tokenizer, name, None)
        if encode is None:
            continue
        tokens = 0
        started = time.perf_counter()
        for texts in batches:
            tokens += sum(len(e.ids) for e in encode(texts, add_special_tokens=False))
        seconds = time.perf_counter() - started
        result[name] = {"s": seconds, "tokens": tokens + len(docs), "tokens_per_s": (tokens + len(docs)) / seconds}
    return result


def run_reference(tokenizer_dir: Path, file_list: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--encode-reference", str(tokenizer_dir), str(file_list)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the encode_batch reference failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.splitlines()[-1])


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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=_HelpFormatter, epilog="More in benchmarks/README.md."
    )
    parser.add_argument(
        "--recursive",
        action="store_true",
        help="use every *.py file under the stdlib directory (site-packages excluded; ~30 MB, "
        "~9.4M tokens, ~1 min per repeat on 2 cores) instead of only its top-level *.py files "
        "(~4.7 MB, ~1.3M tokens)",
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        metavar="N",
        help="keep only the first files (sorted by path) whose sizes add up to at most N bytes (at least one file)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        metavar="W",
        help="worker count of the parallel row, compared with --workers 1",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="R",
        help="runs per row, interleaved across rows; the median is reported",
    )
    parser.add_argument(
        "--no-rust-pool",
        action="store_true",
        help="skip the 'workers=1 rust-pool' row (TOKENIZERS_PARALLELISM left unset)",
    )
    parser.add_argument("--no-train", action="store_true", help="skip the --vocab-size row (BPE training timed)")
    parser.add_argument("--no-startup", action="store_true", help="skip the one-file start-up rows")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write settings, every run and the medians here")
    parser.add_argument(
        "--encode-reference", nargs=2, type=Path, metavar=("TOKENIZER", "FILE_LIST"), help=argparse.SUPPRESS
    )  # internal: the reference, run in its own process
    return parser


SERIAL = {"TOKENIZERS_PARALLELISM": "false"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.encode_reference is not None:
        print(json.dumps(encode_reference(*args.encode_reference)))
        return 0
    if args.workers < 2 or args.repeats < 1:
        raise SystemExit("--workers must be >= 2 and --repeats >= 1")
    if args.max_bytes is not None and args.max_bytes < 1:
        raise SystemExit("--max-bytes must be >= 1")
    files = corpus_files(args.recursive, args.max_bytes)
    corpus_bytes = sum(f.stat().st_size for f in files)
    corpus = ("stdlib **/*.py" if args.recursive else "stdlib top-level *.py") + (
        f", first {args.max_bytes:,} bytes" if args.max_bytes is not None else ""
    )
    cpus = os.cpu_count() or 1
    print(f"corpus: {corpus}: {len(files):,} files, {corpus_bytes / 1e6:.1f} MB; {cpus} CPUs")

    with tempfile.TemporaryDirectory(prefix="bench-prepare-text-") as tmp_name:
        tmp = Path(tmp_name)
        tok_dir = tmp / "tokenizer"
        train_s = train_tokenizer(files, tok_dir)
        print(f"shared tokenizer (vocab {VOCAB_SIZE}) trained in {train_s:.1f}s (not part of any row)")
        file_list = tmp / "files.txt"
        file_list.write_text("".join(f"{f}\n" for f in files))

        w = args.workers
        tok = ["--tokenizer", str(tok_dir)]
        # name, files, extra arguments, environment, cores given
        rows: list[tuple[str, list[Path], list[str], dict[str, str], int]] = [
            ("workers=1", files, [*tok, "--workers", "1"], SERIAL, 1),
            (f"workers={w}", files, [*tok, "--workers", str(w)], SERIAL, min(w, cpus)),
        ]
        if not args.no_rust_pool:
            rows.append(("workers=1 rust-pool", files, [*tok, "--workers", "1"], {}, cpus))
        if not args.no_train:
            rows.append(("train+workers=1", files, ["--vocab-size", str(VOCAB_SIZE), "--workers", "1"], SERIAL, 1))
        if not args.no_startup:
            rows.append(("startup w=1", files[:1], [*tok, "--workers", "1"], SERIAL, 1))
            rows.append((f"startup w={w}", files[:1], [*tok, "--workers", str(w)], SERIAL, min(w, cpus)))

        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in rows}
        references: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            for i, (name, row_files, extra, env, _) in enumerate(rows):
                r = run_prepare(row_files, tmp / f"out{i}", extra, env)
                runs[name].append(r)
                print(
                    f"  run {rep + 1}/{args.repeats} {name:<20} {r['wall_s']:6.1f}s wall "
                    f"{r['tokens_per_s']:>10,.0f} tokens/s",
                    flush=True,
                )
            ref = run_reference(tok_dir, file_list)
            references.append(ref)
            print(
                f"  run {rep + 1}/{args.repeats} {'encode_batch':<20} {ref['encode_batch']['s']:6.1f}s "
                f"{ref['encode_batch']['tokens_per_s']:>10,.0f} tokens/s (encode calls only)",
                flush=True,
            )

    token_counts = {r["tokens"] for name, rs in runs.items() if not name.startswith("startup") for r in rs}
    if len(token_counts) > 1:
        print(
            f"note: token totals differ between rows ({sorted(token_counts)}): the trained tokenizer of "
            "the --vocab-size row sees only the train split"
        )

    def med(name: str, key: str) -> float | None:
        values = [r[key] for r in runs[name] if r[key] is not None]
        return statistics.median(values) if values else None

    ref_kinds = [k for k in ("encode_batch", "encode_batch_fast") if k in references[0]]
    reference = {
        k: {
            "tokens": references[0][k]["tokens"],
            "s": statistics.median(r[k]["s"] for r in references),
            "tokens_per_s": statistics.median(r[k]["tokens_per_s"] for r in references),
            "runs": [r[k] for r in references],
        }
        for k in ref_kinds
    }
    ref_tps = reference["encode_batch"]["tokens_per_s"]
    base = med("workers=1", "tokens_per_s")
    results = []
    for name, _, extra, env, cores in rows:
        tps, wall, cpu = med(name, "tokens_per_s"), med(name, "wall_s"), med(name, "cpu_s")
        walls = [r["wall_s"] for r in runs[name]]
        results.append(
            {
                "name": name,
                "args": extra,
                "env": env,
                "cores_given": cores,
                "tokens": runs[name][0]["tokens"],
                "min_wall_s": min(walls),
                "max_wall_s": max(walls),
                "wall_s": wall,
                "cli_s": med(name, "cli_s"),
                "cpu_s": cpu,
                "cores_busy": cpu / wall,
                "tokens_per_s": tps,
                "ratio_vs_workers1": tps / base,
                "per_core_vs_encode_batch": tps / cores / ref_tps,
                "runs": runs[name],
            }
        )

    print()
    print(
        f"{'row':<20} {'tokens':>11} {'wall s':>7} {'min..max':>11} {'cli s':>6} {'cpu s':>6} {'cores':>5} "
        f"{'tokens/s':>10} {'vs w=1':>7} {'per core vs encode_batch':>25}"
    )
    for r in results:
        cli = f"{r['cli_s']:6.1f}" if r["cli_s"] is not None else f"{'-':>6}"
        spread = f"{r['min_wall_s']:.1f}..{r['max_wall_s']:.1f}"
        startup = r["name"].startswith("startup")
        print(
            f"{r['name']:<20} {r['tokens']:>11,} {r['wall_s']:7.1f} {spread:>11} {cli} {r['cpu_s']:6.1f} "
            f"{r['cores_busy']:5.2f} {r['tokens_per_s']:>10,.0f} "
            + (
                ""
                if startup
                else f"{r['ratio_vs_workers1']:6.2f}x {r['per_core_vs_encode_batch']:11.2f}x "
                f"of {r['cores_given']} core(s)"
            )
        )
    for kind, ref in reference.items():
        print(
            f"{kind:<20} {ref['tokens']:>11,} {ref['s']:7.1f} (encode calls only, 1 thread) "
            f"{ref['tokens_per_s']:>10,.0f} tokens/s"
        )
    by_name = {r["name"]: r for r in results}
    one, par = by_name["workers=1"], by_name[f"workers={w}"]
    # The two rows of one repeat run seconds apart, so bursts of machine noise mostly cancel.
    paired = statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(runs["workers=1"], runs[f"workers={w}"]))
    summary: dict[str, Any] = {
        f"workers{w}_over_workers1": par["ratio_vs_workers1"],
        f"workers{w}_over_workers1_per_repeat_median": paired,
        "workers1_per_core_vs_encode_batch": one["per_core_vs_encode_batch"],
        f"workers{w}_per_core_vs_encode_batch": par["per_core_vs_encode_batch"],
    }
    print(
        f"\nworkers={w} / workers=1 (both TOKENIZERS_PARALLELISM=false): {par['ratio_vs_workers1']:.2f}x tokens/s "
        f"(wall, start-up included); median of the per-repeat ratios {paired:.2f}x"
    )
    if not args.no_startup:
        s1, sw = by_name["startup w=1"]["wall_s"], by_name[f"startup w={w}"]["wall_s"]
        if one["wall_s"] > s1 and par["wall_s"] > sw:
            work = (one["wall_s"] - s1) / (par["wall_s"] - sw)
            summary[f"workers{w}_over_workers1_after_startup"] = work
            per_core = {
                n: r["tokens"] / (r["wall_s"] - s) / r["cores_given"] / ref_tps
                for n, r, s in (("workers1", one, s1), (f"workers{w}", par, sw))
            }
            summary.update({f"{n}_per_core_vs_encode_batch_after_startup": v for n, v in per_core.items()})
            print(
                f"  without the fixed cost of a run ({s1:.1f}s / {sw:.1f}s, the start-up rows): {work:.2f}x; "
                f"per core against encode_batch: workers=1 {per_core['workers1']:.2f}x, "
                f"workers={w} {per_core[f'workers{w}']:.2f}x"
            )
    print(
        f"tokens/s per core against encode_batch ({ref_tps:,.0f} tokens/s on one core): "
        f"workers=1 {one['per_core_vs_encode_batch']:.2f}x, workers={w} {par['per_core_vs_encode_batch']:.2f}x"
    )

    if args.json is not None:
        report = {
            "benchmark": "prepare_text",
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": cpus},
            "versions": {
                "python": platform.python_version(),
                **{pkg: _version(pkg) for pkg in ("tokenizers", "transformers", "webdataset", "numpy")},
            },
            "settings": {
                "corpus": corpus,
                "files": len(files),
                "bytes": corpus_bytes,
                "seq_len": SEQ_LEN,
                "vocab_size": VOCAB_SIZE,
                "workers": w,
                "repeats": args.repeats,
                "shared_tokenizer_train_s": train_s,
                "tokens_per_s": "manifest (tokens + dropped_tokens) / subprocess wall seconds",
                "per_core": "tokens_per_s / cores_given / encode_batch tokens_per_s",
            },
            "results": results,
            "reference": reference,
            **summary,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
