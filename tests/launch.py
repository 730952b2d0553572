"""Helpers for tests that run the real command lines (deepspeed launcher, torchrun, console scripts)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "pretrain" / "train.py")
FAULTS = str(REPO / "tests" / "faults.py")  # pretrain/train.py with a FaultPlan: faults.py [FAULTS] -- ARGS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
             OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(cmd: list[str], timeout: int = 600, check: bool = True, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**_env(), **(env or {})},
                       cwd=cwd or REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p


def deepspeed_cmd(nproc: int, args: list[str], script: str = TRAIN) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(free_port()), script, *args]


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), TRAIN, *args]


def module_cmd(module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", module, *args]


def stdlib_files(max_bytes: int) -> list[str]:
    """A real text corpus present on every machine: the standard library's own sources."""
    files, total = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        files.append(str(p))
        total += p.stat().st_size
        if total >= max_bytes:
            break
    return files


def prepare_small_corpus(out: Path, files: int, min_bytes: int, max_bytes: int, vocab_size: int, samples_per_shard: int,
                         test_fraction: float = 0.0) -> Path:
    """A small prepared text corpus (seq_len 32) from ``files`` stdlib sources of min..max bytes,
    so that a test can train through whole epochs."""
    chosen = [str(p) for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
              if min_bytes < p.stat().st_size < max_bytes][:files]
    run(module_cmd("data_pipelines.text.prepare", [*chosen, "--output", str(out), "--vocab-size", str(vocab_size),
                                                    "--seq-len", "32", "--val-fraction", "0.1", "--test-fraction",
                                                    str(test_fraction), "--samples-per-shard", str(samples_per_shard),
                                                    "--no-progress"]))
    return out


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "split" not in m and "event" not in m], [m for m in lines if "split" in m]


env = _env  # the environment every launched command gets
