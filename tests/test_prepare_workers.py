"""The prepare commands' worker pool (`data_pipelines.workers`) and their torch-free start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines.workers import ordered_map


def _square(x: int) -> int:
    return x * x


def _pulled_before_first_result(workers: int, nbytes: int, **window) -> tuple[int, list]:
    pulled = []

    def tasks():
        for i in range(200):
            pulled.append(i)
            yield i, i, nbytes

    results = ordered_map(_square, tasks(), workers, **window)
    first = next(results)
    before = len(pulled)
    return before, [first, *results]


@pytest.mark.parametrize("nbytes, expected", [(1 << 30, 4 * 2), (0, 64 * 2), (1 << 20, 10 * 2)])
def test_ordered_map_keeps_input_order_in_a_window_bounded_by_tasks_and_bytes(nbytes: int, expected: int) -> None:
    """Big tasks: the minimum of 4 per worker; empty ones: the maximum of 64 per worker; 1 MiB
    tasks under a 10 MiB-per-worker byte window: 10 per worker."""
    before, results = _pulled_before_first_result(2, nbytes, window_bytes=10 << 20)
    assert before == expected
    assert results == [(i, i * i) for i in range(200)]


def test_ordered_map_calls_on_start_once_the_workers_exist() -> None:
    calls = []
    out = list(ordered_map(_square, ((i, i, 1) for i in range(10)), 2, on_start=lambda: calls.append(1)))
    assert calls == [1] and out == [(i, i * i) for i in range(10)]


def test_the_data_commands_start_without_torch(tmp_path: Path) -> None:
    """torch (~1 s to import) is loaded only by the first shard write, which a command with
    workers does on a thread after forking them: importing the commands and loading a plain
    fast tokenizer must not pull it in."""
    from data_pipelines.text.tokenizer import save_tokenizer, train_bpe_tokenizer

    save_tokenizer(train_bpe_tokenizer(["some text to learn a few merges from"] * 20, 300), tmp_path / "tok")
    code = (
        "import sys\n"
        "import data_pipelines.text.prepare, data_pipelines.image.prepare, data_pipelines.nodes\n"
        "from data_pipelines.text.tokenizer import load_tokenizer\n"
        f"tok = load_tokenizer({str(tmp_path / 'tok')!r})\n"
        "assert tok.eos_token_id == 0, tok.eos_token_id\n"
        "loaded = sorted(m for m in ('torch', 'webdataset') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_a_tokenizer_of_a_model_class_still_loads_through_auto_tokenizer(tmp_path: Path) -> None:
    from transformers import GPT2TokenizerFast

    from data_pipelines.text.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer

    plain = train_bpe_tokenizer(["some text to learn a few merges from"] * 20, 300)
    save_tokenizer(plain, tmp_path / "plain")
    gpt2 = GPT2TokenizerFast(tokenizer_object=plain.backend_tokenizer, eos_token="<|endoftext|>")
    gpt2.save_pretrained(tmp_path / "gpt2")
    loaded = load_tokenizer(tmp_path / "gpt2")
    assert isinstance(loaded, GPT2TokenizerFast)
    text = "some text, learnt"
    assert loaded(text)["input_ids"] == load_tokenizer(tmp_path / "plain")(text)["input_ids"]
