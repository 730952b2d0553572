"""Weighted mixtures of sources and resume in O(1) of the run's length (issue 9, items 4 and 5):
real webdataset shards, the real streams; the reading a resume costs is counted by the stream
itself (``EpochStream.io``)."""

import itertools
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from data_pipelines.loader import StreamSource, train_loader
from tests.test_image_loader import CTX, SIZE
from tests.test_image_loader import make_dataset as make_images
from tests.test_loader import SEQ, make_dataset

COMMON = dict(seed=11, shuffle_buffer=16, trace=True)


@pytest.fixture(scope="module")
def tokenizer():
    from data_pipelines.text.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([f"sample number {i}" for i in range(100)], 300)


def _ids(stream, n):
    return [i for b in itertools.islice(stream, n) for i in b.meta["ids"]]


def _two_corpora(tmp_path, a=(20,) * 6, b=(15,) * 4):
    da = make_dataset(tmp_path / "a", {"train": list(a)})
    db = make_dataset(tmp_path / "b", {"train": list(b)})
    return da, [
        ("web", da.shards("train"), da.shard_samples("train"), 0.8),
        ("code", db.shards("train"), list(db.manifest["splits"]["train"]["shard_samples"]), 0.2),
    ]


def test_a_late_resume_reads_one_shard_and_a_block_however_long_the_run(tmp_path):
    """12 shards of 20, blocks of 16, batches of 4: resuming at batch 10 (epoch 0) or at batch 200
    (late in epoch 3) opens at most 3 shards and reads at most one shard and two blocks, and the
    batches that follow are the uninterrupted stream's, with the same counters."""
    data = make_dataset(tmp_path, {"train": [20] * 12})
    costs = {}
    for at in (10, 200):
        original = train_loader(data, "train", 4, 0, 1, **COMMON)
        _ids(original, at)
        state = original.state_dict()
        expected, counts = _ids(original, 5), None
        counts = original.counts()
        assert state["slots"]["0"]["cursors"][0]["epoch"] == (0 if at == 10 else 3)

        resumed = train_loader(data, "train", 4, 0, 1, **COMMON)
        resumed.load_state_dict(state)
        first = _ids(resumed, 1)
        costs[at] = dict(resumed.dataset.io)
        assert first + _ids(resumed, 4) == expected
        assert resumed.counts() == counts and resumed.micro_batches == at + 5
        assert resumed.samples_by_source() == original.samples_by_source() == {data.root.name: 4 * (at + 5)}
    for at, io in costs.items():
        assert io["shards_opened"] <= 3 and io["raw_samples"] <= 20 + 2 * 16, (at, io)
    replayed = train_loader(data, "train", 4, 0, 1, **COMMON)
    _ids(replayed, 201)
    assert replayed.dataset.io["raw_samples"] > 20 * costs[200]["raw_samples"], "what replaying would have cost"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_weighted_mixture_resumes_exactly_with_and_without_workers(tmp_path, workers):
    """Two corpora mixed 0.8 / 0.2 under 0 or 2 DataLoader workers, cut after an odd number of
    batches (the round-robin resumes at the second worker): the same batches follow."""
    data, sources = _two_corpora(tmp_path)
    original = train_loader(data, "train", 3, 0, 1, num_workers=workers, sources=sources, **COMMON)
    _ids(original, 7)
    state = original.state_dict()
    assert state["sources"] == ["web", "code"] and sum(original.samples_by_source().values()) == 21
    expected = _ids(original, 8)

    resumed = train_loader(data, "train", 3, 0, 1, num_workers=workers, sources=sources, **COMMON)
    resumed.load_state_dict(state)
    assert _ids(resumed, 8) == expected
    assert resumed.samples_by_source() == original.samples_by_source()
    assert {i.split(":")[1].split("/")[0] for i in expected} == {"web", "code"}

    renamed = train_loader(data, "train", 3, 0, 1, num_workers=workers, sources=sources[:1], **COMMON)
    with pytest.raises(ValueError, match="data sources changed"):
        renamed.load_state_dict(state)


def test_the_realised_mixture_follows_the_weights_within_2_percent_over_10000_samples(tmp_path):
    data, sources = _two_corpora(tmp_path)
    stream = train_loader(data, "train", 100, 0, 1, sources=sources, seed=3, shuffle_buffer=0, trace=True)
    taken = Counter(i.split(":")[1].split("/")[0] for i in _ids(stream, 100))
    assert stream.samples_by_source() == dict(taken) and sum(taken.values()) == 10_000
    assert taken["web"] / 10_000 == pytest.approx(0.8, abs=0.02)
    assert taken["code"] / 10_000 == pytest.approx(0.2, abs=0.02)
    # another rank draws other samples in the same proportions
    other = train_loader(data, "train", 100, 1, 2, sources=sources, seed=3, shuffle_buffer=0, trace=True)
    mine = Counter(i.split(":")[1].split("/")[0] for i in _ids(other, 20))
    assert mine["web"] / 2000 == pytest.approx(0.8, abs=0.04)
    with pytest.raises(ValueError, match="weight must be > 0"):
        StreamSource.of(("x", ["a.tar"], None, 0))


def test_a_resume_does_not_count_a_bad_sample_of_the_re_read_block_twice(tmp_path):
    """A window of the wrong length inside the block being re-read: skipped and counted once."""
    (tmp_path / "train").mkdir()
    for s in range(3):
        with wds.TarWriter(str(tmp_path / f"train/shard-{s:06d}.tar")) as w:
            for i in range(10):
                n = SEQ if (s, i) == (1, 3) else SEQ + 1
                w.write({"__key__": f"k{s}-{i}", "tokens.npy": np.full(n, 10 * s + i, dtype=np.uint16)})
    from data_pipelines.loader import TextShards
    from data_pipelines.manifest import write_manifest

    write_manifest(
        tmp_path,
        {
            "kind": "text",
            "version": 1,
            "seq_len": SEQ,
            "tokenizer": {"vocab_size": 100},
            "splits": {
                "train": {
                    "shards": [f"train/shard-{s:06d}.tar" for s in range(3)],
                    "shard_samples": [10] * 3,
                    "samples": 30,
                }
            },
        },
    )
    data = TextShards(tmp_path)
    original = train_loader(data, "train", 2, 0, 1, seed=1, shuffle_buffer=12, trace=True)
    for _ in range(40):
        _ids(original, 1)
        if original.counts()[1]:
            break
    assert original.counts()[1] == {"wrong_length": 1}
    state = original.state_dict()
    assert state["slots"]["0"]["cursors"][0]["emitted"] > 0, "the block that held it is re-read"
    expected = _ids(original, 10)
    resumed = train_loader(data, "train", 2, 0, 1, seed=1, shuffle_buffer=12, trace=True)
    resumed.load_state_dict(state)
    assert _ids(resumed, 10) == expected and resumed.counts() == original.counts()


def test_after_a_change_of_layout_a_mixture_re_divides_and_later_resumes_are_o1_again(tmp_path):
    """2 ranks -> 1 rank with a mixture: within each source's epoch no sample twice; a resume
    inside the re-divided remainder replays, one after it jumps."""
    data, sources = _two_corpora(tmp_path)
    common = dict(sources=sources, **COMMON)
    seen = []
    for rank in range(2):
        seen += _ids(train_loader(data, "train", 3, rank, 2, **common), 6)
    history = [{"world": 2, "workers": 0, "micro": 3, "micro_batches": 6}]
    one = train_loader(data, "train", 4, 0, 1, history=history, **common)
    seen += _ids(one, 120)
    assert Counter(seen).most_common(1)[0][1] == 1, "no sample twice in one epoch of its source"
    assert len({i for i in seen if i.startswith("0:web/")}) == 120, "epoch 0 of each corpus: every sample once"
    assert len({i for i in seen if i.startswith("0:code/")}) == 60

    inside = train_loader(data, "train", 4, 0, 1, history=history, **common)
    _ids(inside, 2)
    state = inside.state_dict()
    assert any(c.get("remainder") for c in state["slots"]["0"]["cursors"])
    again = train_loader(data, "train", 4, 0, 1, **common)
    again.load_state_dict(state)
    assert _ids(again, 5) == _ids(inside, 5), "inside the remainder: replayed, exact"

    late = one.state_dict()
    assert not any(c.get("remainder") for c in late["slots"]["0"]["cursors"])
    jumped = train_loader(data, "train", 4, 0, 1, **common)
    jumped.load_state_dict(late)
    assert _ids(jumped, 4) == _ids(one, 4)
    assert jumped.dataset.io["shards_opened"] <= 6, "no replay of the earlier segment"


def test_an_image_text_mixture_resumes_with_the_same_crops(tmp_path, tokenizer):
    """Two prepared image-text folders (one with an undecodable image), mixed 1:1 with random crops:
    a resumed stream gives the same pixels, captions and per-source counts."""
    import torch

    from data_pipelines.image.loader import image_text_train_loader

    a = make_images(tmp_path / "a", {"train": [6, 6, 6]}, bad={4})
    b = make_images(tmp_path / "b", {"train": [5, 5]})
    sources = [
        ("a", a.shards("train"), a.shard_samples("train"), 1.0),
        ("b", b.shards("train"), b.shard_samples("train"), 1.0),
    ]

    def stream():
        return image_text_train_loader(
            a, "train", 4, tokenizer, CTX, SIZE, seed=4, shuffle_buffer=5, trace=True, sources=sources
        )

    original = stream()
    list(itertools.islice(original, 5))
    state = original.state_dict()
    expected = list(itertools.islice(original, 6))
    resumed = stream()
    resumed.load_state_dict(state)
    for x, y in zip(expected, itertools.islice(resumed, 6)):
        assert x.meta["ids"] == y.meta["ids"] and torch.equal(x["pixel_values"], y["pixel_values"])
        assert torch.equal(x["input_ids"], y["input_ids"])
    assert resumed.samples_by_source() == original.samples_by_source()
    assert resumed.counts() == original.counts() and original.counts()[1] == {"undecodable": 1}
