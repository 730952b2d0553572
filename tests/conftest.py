"""Shared fixtures: offline Hugging Face libraries, a real text corpus, one prepared dataset."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

# Set before any test imports transformers / huggingface_hub: nothing may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def stdlib_files() -> list[Path]:
    """A few dozen real Python source files from the standard library: a small real corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 2_000 < p.stat().st_size < 40_000)
    assert len(files) >= 20, f"expected stdlib sources under {root}"
    return files[:30]


@pytest.fixture(scope="session")
def prepared_stdlib(tmp_path_factory: pytest.TempPathFactory, stdlib_files: list[Path]) -> Path:
    """The stdlib corpus prepared once with a freshly trained tokenizer; treat it as read-only."""
    from data_pipelines.text.prepare import main

    out = tmp_path_factory.mktemp("prepared") / "stdlib"
    argv = [
        *map(str, stdlib_files),
        "--output",
        str(out),
        "--vocab-size",
        "1000",
        "--seq-len",
        "64",
        "--val-fraction",
        "0.15",
        "--test-fraction",
        "0.15",
        "--samples-per-shard",
        "40",
        "--no-progress",
    ]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread per test process, as tests/launch.py gives every launched rank (OMP_NUM_THREADS=1).
    Torch's default (one thread per core) spins against the other pytest-xdist workers and the launched ranks on
    2 cores: the in-process trainer tests took 50-260 s each that way instead of a few seconds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
