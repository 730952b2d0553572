"""Helpers for tests that run the real command lines (deepspeed launcher, torchrun, console scripts)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
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


@contextlib.contextmanager
def world_of_one():
    """A gloo process group of one in this test process, as the launcher would set it up for one rank. On exit
    the group, DeepSpeed's cached groups, the environment and the signal handlers are put back, so that the next
    in-process run in the same pytest worker starts clean (DeepSpeed keeps a clone of the world group in a module
    global, and a clone of a destroyed group makes the next engine's broadcast fail)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups

    from pretrain.train import _remove_shm_buffers

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    saved = dict(os.environ)
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        TOKENIZERS_PARALLELISM="false",
    )
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        yield
    finally:
        _remove_shm_buffers()
        dist.destroy_process_group()
        for name in (
            "_WORLD_GROUP",
            "_DATA_PARALLEL_GROUP",
            "_MODEL_PARALLEL_GROUP",
            "_TENSOR_MODEL_PARALLEL_GROUP",
            "_ZERO_PARAM_INTRA_PARALLEL_GROUP",
            "mpu",
        ):
            if hasattr(groups, name):
                setattr(groups, name, None)
        os.environ.clear()
        os.environ.update(saved)
        for s, h in handlers.items():
            signal.signal(s, h)


def inprocess_trainer(argv: list[str], hooks=None):
    """A real `Trainer` set up in this process from command-line arguments (inside `world_of_one`)."""
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    args = build_parser().parse_args([*argv, "--no-progress"])
    resolved, inputs, run_dir = prepare(args)
    trainer = Trainer(resolved, inputs, run_dir, args.resume, progress=False, hooks=hooks)
    trainer.setup()
    return trainer


def with_key(d: dict, dotted: str, value) -> dict:
    """A deep copy of ``d`` with ``dotted`` (e.g. "training.lr") set to ``value``."""
    d = json.loads(json.dumps(d))
    node = d
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return d


def kill_tree(proc: subprocess.Popen, port: str) -> None:
    """SIGKILL a launcher and every process under it at once, then remove the CPU all-reduce buffers
    (RAM in /dev/shm) that DeepSpeed's ranks on ``port`` could not remove themselves."""
    import psutil

    tree = [proc, *psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []
    for p in tree:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    for leftover in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        os.remove(leftover)


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(
    cmd: list[str], timeout: int = 600, check: bool = True, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**_env(), **(env or {})}, cwd=cwd or REPO
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}"
        )
    return p


def deepspeed_cmd(nproc: int, args: list[str], script: str = TRAIN) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        script,
        *args,
    ]


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        TRAIN,
        *args,
    ]


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


def prepare_small_corpus(
    out: Path,
    files: int,
    min_bytes: int,
    max_bytes: int,
    vocab_size: int,
    samples_per_shard: int,
    test_fraction: float = 0.0,
    val_fraction: float = 0.1,
) -> Path:
    """A small prepared text corpus (seq_len 32) from ``files`` stdlib sources of min..max bytes,
    so that a test can train through whole epochs."""
    chosen = [
        str(p)
        for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        if min_bytes < p.stat().st_size < max_bytes
    ][:files]
    run(
        module_cmd(
            "data_pipelines.text.prepare",
            [
                *chosen,
                "--output",
                str(out),
                "--vocab-size",
                str(vocab_size),
                "--seq-len",
                "32",
                "--val-fraction",
                str(val_fraction),
                "--test-fraction",
                str(test_fraction),
                "--samples-per-shard",
                str(samples_per_shard),
                "--no-progress",
            ],
        )
    )
    return out


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "split" not in m and "event" not in m], [m for m in lines if "split" in m]


env = _env  # the environment every launched command gets
