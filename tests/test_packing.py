"""TokenPacker: exact windows, eos after every document, tail dropped and counted."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.text.packing import TokenPacker, inputs_and_targets, pack_documents
from data_pipelines.text.tokenizer import token_dtype

EOS = 0


def test_windows_and_eos_placement() -> None:
    # stream: 1 2 3 E 4 5 E 6 7 8 9 E  -> windows of 4, nothing left over
    windows = list(pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=3, eos_id=EOS))
    assert [w.tolist() for w in windows] == [[1, 2, 3, EOS], [4, 5, EOS, 6], [7, 8, 9, EOS]]
    assert all(w.dtype == np.uint16 for w in windows)


def test_tail_is_dropped_and_counted() -> None:
    packer = TokenPacker(seq_len=4, eos_id=EOS)
    out = packer.add([1, 2, 3]) + packer.add([4, 5, 6, 7, 8, 9])
    assert [w.tolist() for w in out] == [[1, 2, 3, EOS, 4], [5, 6, 7, 8, 9]]
    assert packer.add([10, 11]) == []  # stream tail: E 10 11 E
    assert packer.finish() == 4
    assert packer.tokens_in == packer.tokens_out + packer.dropped_tokens == 14
    assert packer.documents == 3 and packer.windows == 2


def test_a_long_document_fills_many_windows() -> None:
    packer = TokenPacker(seq_len=9, eos_id=EOS)
    windows = packer.add(np.arange(1, 36))
    assert len(windows) == 3 and windows[0][0] == 1 and windows[2][-1] == 30
    assert packer.finish() == 6  # 31..35 + eos


def test_matches_a_reference_concatenation() -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50_000, size=rng.integers(0, 300)) for _ in range(200)]
    seq_len = 63
    stream = np.concatenate([np.append(d, EOS) for d in docs])
    full = len(stream) // (seq_len + 1)
    expected = stream[: full * (seq_len + 1)].reshape(full, seq_len + 1)
    got = np.stack(list(pack_documents(docs, seq_len, EOS)))
    np.testing.assert_array_equal(got, expected)


def test_empty_document_still_gets_its_eos() -> None:
    assert [w.tolist() for w in pack_documents([[], [7], []], seq_len=2, eos_id=EOS)] == [[EOS, 7, EOS]]


def test_windows_are_independent_copies() -> None:
    packer = TokenPacker(seq_len=1, eos_id=EOS)
    first = packer.add([5, 6, 7])
    packer.add([8, 9, 10, 11])
    assert [w.tolist() for w in first] == [[5, 6], [7, EOS]]


def test_inputs_and_targets_shift_by_one() -> None:
    inputs, targets = inputs_and_targets(np.array([1, 2, 3, 4], dtype=np.uint16))
    assert inputs.tolist() == [1, 2, 3] and targets.tolist() == [2, 3, 4]


def test_out_of_range_ids_are_refused_not_wrapped() -> None:
    packer = TokenPacker(seq_len=4, eos_id=EOS, dtype=np.uint16)
    with pytest.raises(ValueError, match="out of range"):
        packer.add([1, 70_000])
    wide = TokenPacker(seq_len=1, eos_id=70_000, dtype=np.uint32)
    assert wide.add([69_999])[0].tolist() == [69_999, 70_000]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        TokenPacker(seq_len=0, eos_id=EOS)
    with pytest.raises(ValueError, match="eos"):
        TokenPacker(seq_len=8, eos_id=1 << 16, dtype=np.uint16)
    packer = TokenPacker(seq_len=8, eos_id=EOS)
    packer.finish()
    with pytest.raises(RuntimeError):
        packer.add([1])


@pytest.mark.parametrize(("vocab", "dtype"), [(1000, np.uint16), (65_536, np.uint16), (65_537, np.uint32)])
def test_token_dtype(vocab: int, dtype: type) -> None:
    assert token_dtype(vocab) == np.dtype(dtype)


@pytest.mark.parametrize("seq_len", [1, 5, 63])
def test_add_documents_equals_add_one_by_one(seq_len: int) -> None:
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(1, 60_000, size=rng.integers(0, 200)) for _ in range(300)]
    docs[3:6] = [np.array([], dtype=np.int64)] * 3  # empty documents still get their eos
    one, many = TokenPacker(seq_len, EOS), TokenPacker(seq_len, EOS)
    expected = [w for d in docs for w in one.add(d)]
    got = []
    start = 0
    for size in [0, 1, 7, 50, 1, 241]:  # uneven groups, one empty, across window boundaries
        group = docs[start : start + size]
        flat = np.concatenate(group) if group else np.empty(0, dtype=np.int64)
        windows = many.add_documents(flat, [len(d) for d in group])
        assert windows.shape == (len(windows), seq_len + 1) and windows.dtype == np.uint16
        got.extend(windows)
        start += size
    assert start == len(docs)
    np.testing.assert_array_equal(np.array(got), np.array(expected))
    assert one.finish() == many.finish()
    assert (one.documents, one.tokens_in, one.windows) == (many.documents, many.tokens_in, many.windows)


def test_add_documents_refuses_bad_input() -> None:
    packer = TokenPacker(seq_len=4, eos_id=EOS, dtype=np.uint16)
    with pytest.raises(ValueError, match="out of range"):
        packer.add_documents(np.array([1, 70_000]), [2])
    with pytest.raises(ValueError, match="do not describe"):
        packer.add_documents(np.array([1, 2, 3]), [1, 1])
    with pytest.raises(ValueError, match="do not describe"):
        packer.add_documents(np.array([1, 2]), [3, -1])
    packer.finish()
    with pytest.raises(RuntimeError):
        packer.add_documents(np.array([1]), [1])


def test_a_bos_starts_every_document_in_add_and_add_documents_alike():
    from data_pipelines.text.packing import TokenPacker

    docs = [[5, 6, 7], [], [8], [9, 10, 11, 12, 13]]
    one = TokenPacker(4, eos_id=1, bos_id=2)
    windows = [w for d in docs for w in one.add(d)]
    many = TokenPacker(4, eos_id=1, bos_id=2)
    rows = many.add_documents(np.array([t for d in docs for t in d]), [len(d) for d in docs])
    assert [list(w) for w in windows] == [list(r) for r in rows]
    assert [int(t) for w in windows for t in w] == [2, 5, 6, 7, 1, 2, 1, 2, 8, 1, 2, 9, 10, 11, 12]
    assert one.tokens_in == many.tokens_in == sum(len(d) + 2 for d in docs)
