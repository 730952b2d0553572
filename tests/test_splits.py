"""assign_split: stable, proportional, seed-dependent, and strict about its fractions."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from data_pipelines.splits import SPLITS, assign_split, split_hash, validate_fractions

KEYS = [f"document number {i}".encode() for i in range(20_000)]


def test_pinned_assignments_never_change() -> None:
    # Changing the hash silently reshuffles every prepared dataset's splits: pin it.
    got = [assign_split(f"doc-{i}".encode(), 0.3, 0.3, 0) for i in range(12)]
    assert got == ["train", "test", "val", "train", "train", "val", "test", "test", "val", "val", "test", "test"]
    assert split_hash(b"hello", 0) == pytest.approx(0.21888718507297128, abs=0)


def test_stable_across_processes() -> None:
    # Python's own hash() is salted per process; ours must not be.
    code = "from data_pipelines.splits import split_hash; print(repr(split_hash(b'hello', 7)))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(other.stdout) == split_hash(b"hello", 7)


def test_fractions_are_respected() -> None:
    counts = Counter(assign_split(k, 0.1, 0.2, seed=0) for k in KEYS)
    assert set(counts) == set(SPLITS)
    assert counts["val"] / len(KEYS) == pytest.approx(0.1, abs=0.01)
    assert counts["test"] / len(KEYS) == pytest.approx(0.2, abs=0.01)


def test_zero_fractions_put_everything_in_train() -> None:
    assert {assign_split(k, 0.0, 0.0, seed=3) for k in KEYS[:2000]} == {"train"}


def test_duplicates_share_a_split_and_seed_reshuffles() -> None:
    first = [assign_split(k, 0.25, 0.25, seed=1) for k in KEYS[:2000]]
    again = [assign_split(bytes(k), 0.25, 0.25, seed=1) for k in KEYS[:2000]]
    other_seed = [assign_split(k, 0.25, 0.25, seed=2) for k in KEYS[:2000]]
    assert first == again
    differing = sum(a != b for a, b in zip(first, other_seed))
    assert 0.4 * 2000 < differing < 0.8 * 2000  # ~62.5% expected for independent draws


def test_hash_is_uniform_in_unit_interval() -> None:
    values = [split_hash(k, 0) for k in KEYS[:5000]]
    assert all(0.0 <= v < 1.0 for v in values)
    assert sum(values) / len(values) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize(
    ("val", "test", "message"),
    [(-0.1, 0.0, "val_fraction"), (0.0, 1.0, "test_fraction"), (0.5, 0.5, "< 1"), (0.7, 0.4, "< 1")],
)
def test_invalid_fractions_raise(val: float, test: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_fractions(val, test)
    with pytest.raises(ValueError, match=message):
        assign_split(b"x", val, test, seed=0)
