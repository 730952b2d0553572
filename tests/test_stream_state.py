"""The training stream owns its position: state_dict / load_state_dict round trips, in the same
layout (replay) and across a change of micro-batch size or DataLoader workers (re-division)."""

import itertools
import json
from collections import Counter

import pytest

from data_pipelines.loader import train_loader
from tests.test_loader import make_dataset

COMMON = dict(seed=7, shuffle_buffer=4, trace=True)


def _ids(stream, n):
    return [i for b in itertools.islice(stream, n) for i in b.meta["ids"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_stream_continues_with_the_batches_the_original_would_have_given(tmp_path, workers):
    data = make_dataset(tmp_path, {"train": [5, 7, 6, 4, 8, 3]})
    original = train_loader(data, "train", 3, 0, 1, num_workers=workers, **COMMON)
    _ids(original, 5)
    state = original.state_dict()
    assert json.loads(json.dumps(state)) == state, "plain values: it goes into a checkpoint as it is"
    assert {k: state[k] for k in ("world", "workers", "micro", "micro_batches", "data_history")} == {
        "world": 1,
        "workers": workers,
        "micro": 3,
        "micro_batches": 5,
        "data_history": [],
    }
    slots = {0: 3, 1: 2} if workers else {0: 5}  # the round-robin's share of each DataLoader worker
    assert {int(i): s["batches"] for i, s in state["slots"].items()} == slots, "a cursor per slot"
    expected = _ids(original, 6)

    restored = train_loader(data, "train", 3, 0, 1, num_workers=workers, **COMMON)
    restored.load_state_dict(state)
    assert restored.micro_batches == 5
    assert _ids(restored, 6) == expected


def test_one_dataloader_worker_is_the_same_layout_as_none(tmp_path):
    data = make_dataset(tmp_path, {"train": [5, 7, 6]})
    a = train_loader(data, "train", 2, 0, 1, num_workers=0, **COMMON)
    _ids(a, 3)
    b = train_loader(data, "train", 2, 0, 1, num_workers=1, **COMMON)
    b.load_state_dict(a.state_dict())
    assert b.state_dict()["data_history"] == [], "replayed, not re-divided"
    assert _ids(b, 4) == _ids(a, 4)


@pytest.mark.parametrize("change", ["micro_batch_size", "num_workers", "both"])
def test_another_micro_batch_size_or_worker_count_re_divides_the_epoch_exactly(tmp_path, change):
    """Same world size, another layout: no sample of the epoch is lost or repeated."""
    sizes = [5, 7, 6, 4, 8, 3, 5, 2]
    data = make_dataset(tmp_path, {"train": sizes})
    n = sum(sizes)
    first = train_loader(data, "train", 3, 0, 1, num_workers=0, **COMMON)
    seen = _ids(first, 4)
    micro = 5 if change in ("micro_batch_size", "both") else 3
    workers = 2 if change in ("num_workers", "both") else 0
    second = train_loader(data, "train", micro, 0, 1, num_workers=workers, **COMMON)
    second.load_state_dict(first.state_dict())
    assert second.micro_batches == 0
    assert second.state_dict()["data_history"] == [{"world": 1, "workers": 0, "micro": 3, "micro_batches": 4}]
    seen += _ids(second, -(-2 * n // micro) + 2)  # two more epochs and a bit
    epochs = Counter(s.split(":", 1)[0] for s in seen)
    assert Counter(seen).most_common(1)[0][1] == 1, "no sample twice in one epoch"
    assert epochs["0"] == epochs["1"] == n, f"epochs 0 and 1 each covered every sample once: {epochs}"

    # and the re-divided stream's own position round-trips too
    third = train_loader(data, "train", micro, 0, 1, num_workers=workers, **COMMON)
    third.load_state_dict(second.state_dict())
    assert _ids(third, 3) == _ids(second, 3)


def test_a_resampled_stream_refuses_a_layout_change_and_a_started_stream_refuses_any_state(tmp_path):
    data = make_dataset(tmp_path, {"train": [4, 4]})
    a = train_loader(data, "train", 2, 0, 1, seed=0, resampled=True)
    next(a)
    with pytest.raises(RuntimeError, match="already started"):
        a.load_state_dict(a.state_dict())
    b = train_loader(data, "train", 4, 0, 1, seed=0, resampled=True)
    with pytest.raises(ValueError, match="data.resampled"):
        b.load_state_dict(a.state_dict())
