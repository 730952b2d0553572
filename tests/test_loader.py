"""The streaming loader over real webdataset shards: rank/worker division, shuffling, eval padding."""

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipelines.loader import Slot, TextShards, TextTrainStream, epoch_shards, eval_batches, train_loader
from data_pipelines.manifest import write_manifest

SEQ = 8


def make_dataset(root, counts: dict[str, list[int]]):
    """Shards whose sample i carries the value i in every position, so tests can identify samples."""
    splits, index = {}, 0
    for split, shard_sizes in counts.items():
        (root / split).mkdir(parents=True)
        shards = []
        for s, n in enumerate(shard_sizes):
            name = f"{split}/shard-{s:06d}.tar"
            with wds.TarWriter(str(root / name)) as w:
                for _ in range(n):
                    w.write(
                        {"__key__": f"{split}-{index:010d}", "tokens.npy": np.full(SEQ + 1, index, dtype=np.uint16)}
                    )
                    index += 1
            shards.append(name)
        splits[split] = {
            "shards": shards,
            "shard_samples": shard_sizes,
            "samples": sum(shard_sizes),
            "tokens": sum(shard_sizes) * SEQ,
            "documents": 0,
            "dropped_tokens": 0,
        }
    write_manifest(
        root,
        {
            "kind": "text",
            "version": 1,
            "seq_len": SEQ,
            "token_dtype": "uint16",
            "tokenizer": {"path": "tokenizer", "vocab_size": 65536},
            "splits": splits,
        },
    )
    return TextShards(root)


def ids_of(batches):
    return [int(row[0]) for b in batches for row in b["input_ids"]]


@pytest.mark.parametrize("shard_sizes", [[5, 7, 6, 4, 8, 3, 5, 2], [10, 13, 9]], ids=["shards>=slots", "shards<slots"])
def test_one_epoch_over_ranks_and_workers_covers_every_sample_once(tmp_path, shard_sizes):
    data = make_dataset(tmp_path, {"train": shard_sizes})
    seen = Counter()
    for rank in range(2):
        for worker in range(2):
            ds = TextTrainStream(data, "train", 1, rank, 2, seed=3, shuffle_buffer=0, num_workers=2)
            slot = Slot(rank, 2, worker, 2)
            urls, by_sample = epoch_shards(ds.shards, slot, 0, 3)
            n = sum(shard_sizes[int(u[-10:-4])] for u in urls)
            expected = n if not by_sample else len(range(slot.index, n, 4))
            seen.update(int(w[0]) for _, w in itertools.islice(ds.samples(slot), expected))
    assert sorted(seen) == list(range(sum(shard_sizes))) and set(seen.values()) == {1}


def test_shard_order_changes_per_epoch_and_is_reproducible(tmp_path):
    data = make_dataset(tmp_path, {"train": [3] * 16})
    shards = data.shards("train")
    e0, e1 = epoch_shards(shards, Slot(), 0, 1)[0], epoch_shards(shards, Slot(), 1, 1)[0]
    assert sorted(e0) == sorted(e1) == sorted(shards) and e0 != e1
    assert epoch_shards(shards, Slot(), 0, 1)[0] == e0
    assert epoch_shards(shards, Slot(), 0, 2)[0] != e0


def test_train_stream_is_endless_shuffled_and_deterministic(tmp_path):
    data = make_dataset(tmp_path, {"train": [6, 6]})
    a = ids_of(itertools.islice(train_loader(data, "train", 4, 0, 1, seed=0, shuffle_buffer=8), 9))
    b = ids_of(itertools.islice(train_loader(data, "train", 4, 0, 1, seed=0, shuffle_buffer=8), 9))
    assert a == b and len(a) == 36, "three epochs of 12 samples, no end"
    assert sorted(a[:12]) != a[:12], "the buffer shuffles samples"
    batch = next(train_loader(data, "train", 4, 0, 1, seed=0))
    assert batch["input_ids"].shape == (4, SEQ) and batch["labels"].dtype == torch.int64


def test_dataloader_workers_read_disjoint_shards_deterministically(tmp_path):
    data = make_dataset(tmp_path, {"train": [4, 4, 4, 4]})
    run = lambda: ids_of(
        itertools.islice(train_loader(data, "train", 2, 1, 2, seed=0, shuffle_buffer=0, num_workers=2), 4)
    )  # noqa: E731
    first = run()
    assert first == run()
    assert len(set(first)) == 8, "rank 1's two workers read rank 1's two shards, 4 samples each"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_are_equal_per_rank_and_cover_the_split_once(tmp_path, world):
    data = make_dataset(tmp_path, {"val": [4, 3]})
    per_rank = [list(eval_batches(data, "val", 2, r, world)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1, "every rank runs the same number of forward passes"
    weighted = Counter()
    for batches in per_rank:
        for b in batches:
            for row, w in zip(b["input_ids"], b["weight"]):
                weighted[int(row[0])] += float(w)
    assert weighted == Counter({i: 1.0 for i in range(7)}) | Counter()


def _pull(loader, n):
    return [i for b in itertools.islice(loader, n) for i in b.meta["ids"]]


@pytest.mark.parametrize("shard_sizes", [[5, 7, 6, 4, 8, 3, 5, 2], [10, 13, 9]], ids=["shards>=slots", "shards<slots"])
def test_a_world_size_change_re_divides_the_epoch_without_losing_or_repeating_samples(tmp_path, shard_sizes):
    """2 ranks x 2 DataLoader workers -> 1 rank -> 3 ranks: within every epoch each sample once."""
    data = make_dataset(tmp_path, {"train": shard_sizes})
    n = sum(shard_sizes)
    common = dict(seed=5, shuffle_buffer=4, trace=True)
    seen = []
    for rank in range(2):  # segment 1: world 2, 2 workers each, 4 micro-batches of 3 per rank
        seen += _pull(train_loader(data, "train", 3, rank, 2, num_workers=2, **common), 4)
    history = [{"world": 2, "workers": 2, "micro": 3, "micro_batches": 4}]
    seen += _pull(train_loader(data, "train", 5, 0, 1, history=history, **common), 7)  # segment 2: world 1
    history.append({"world": 1, "workers": 0, "micro": 5, "micro_batches": 7})
    for rank in range(3):  # segment 3: world 3, far enough to finish two more epochs
        seen += _pull(train_loader(data, "train", 2, rank, 3, history=history, **common), 2 * n // 6 + 2)
    assert Counter(seen).most_common(1)[0][1] == 1, "no sample twice in one epoch"
    assert max(int(s.split(":", 1)[0]) for s in seen) >= 3
    for e in (0, 1):  # the epochs the changes of world size cut through, long finished by every slot
        keys = {s.rsplit(":", 1)[1] for s in seen if s.startswith(f"{e}:")}
        assert len(keys) == n, f"epoch {e}: {len(keys)} of {n} samples"


def test_resampled_streams_refuse_a_history(tmp_path):
    data = make_dataset(tmp_path, {"train": [4, 4]})
    with pytest.raises(ValueError, match="resampled"):
        TextTrainStream(
            data, "train", 2, resampled=True, history=[{"world": 2, "workers": 0, "micro": 2, "micro_batches": 1}]
        )


def test_the_start_says_how_an_epoch_is_covered_when_shards_do_not_divide_the_slots(tmp_path):
    """Issue 22 item 7: 5 shards over 2 ranks x 2 workers, 3 over 4 slots; 8 over 4 says nothing."""
    from data_pipelines.loader.slots import epoch_coverage

    (line,) = train_loader(
        make_dataset(tmp_path, {"train": [3] * 5}), "train", 1, 0, 2, seed=0, num_workers=2
    ).coverage()
    assert "5 shard(s) for 4 reading slots (2 rank(s) x 2 worker(s))" in line
    assert "slot 0 reads 2 shards an epoch and slots 1-3 read 1" in line
    assert "each shard is read 4 times" in epoch_coverage("s", 3, 2, 2)
    assert epoch_coverage("s", 8, 2, 2) is None and epoch_coverage("s", 5, 2, 2, resampled=True) is None
    # the counts epoch_shards gives, per slot
    per_slot = [
        len(epoch_shards([f"{i}" for i in range(7)], Slot(r, 2, w, 2), 0, 0)[0]) for r in (0, 1) for w in (0, 1)
    ]
    assert per_slot == [2, 2, 2, 1] and "slots 0-2 read 2 shards an epoch and slot 3 reads 1" in epoch_coverage(
        "s", 7, 2, 2
    )


def test_max_samples_scores_a_fixed_subset_spread_over_the_whole_split(tmp_path):
    """Issue 23 item 3: a split stored class by class (here: samples 0-99 in 10 shards, sample i of
    class i // 10) scored with max_samples 20 touches every class, the same subset on any world size."""
    data = make_dataset(tmp_path, {"train": [1], "val": [10] * 10})
    offset = 1  # sample ids run on from the train split's one sample

    def scored(world):
        ids = []
        for rank in range(world):
            for b in eval_batches(data, "val", 4, rank, world, max_samples=20):
                ids += [int(r[0]) - offset for r, w in zip(b["input_ids"], b["weight"]) if w > 0]
        return sorted(ids)

    one = scored(1)
    assert len(one) == 20 and len(set(one)) == 20
    assert {i // 10 for i in one} == set(range(10)), "every class of the split, not the first two"
    assert scored(2) == one and scored(1) == one, "fixed: every evaluation scores the same samples"


def test_a_shard_one_rank_cannot_read_does_not_give_it_fewer_eval_batches(tmp_path):
    """Issue 23 item 3: rank 1 cannot fetch one shard of the split (here: gone from its copy of the
    data); both ranks still run the same number of batches, padded, as ZeRO-3's forwards need."""
    import shutil

    mine = tmp_path / "rank0"
    data0 = make_dataset(mine, {"train": [1], "val": [6, 6, 6]})
    shutil.copytree(mine, tmp_path / "rank1")
    (tmp_path / "rank1" / "val" / "shard-000001.tar").unlink()
    data1 = TextShards(tmp_path / "rank1")
    batches = [list(eval_batches(d, "val", 2, rank, 2)) for rank, d in ((0, data0), (1, data1))]
    assert len(batches[0]) == len(batches[1]) == 5  # 18 windows: 9 rows a rank, batches of 2
    assert sum(float(b["weight"].sum()) for b in batches[1]) == 6, "rank 1 scored what it could read"
