"""Bad shards and samples are skipped with a warning that names them, and counted by reason."""

import itertools
import tarfile

import numpy as np
import webdataset as wds

from data_pipelines.loader import TextTrainStream, eval_batches
from tests.test_loader import SEQ, make_dataset


def test_truncated_and_non_tar_shards_and_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    data = make_dataset(tmp_path, {"train": [6, 6, 6]})
    shards = data.shards("train")
    raw = open(shards[1], "rb").read()
    open(shards[1], "wb").write(raw[: len(raw) // 2])  # truncated mid-member
    open(shards[2], "wb").write(b"this is not a tar file at all" * 10)  # stray garbage
    with wds.TarWriter(shards[0]) as w:  # rewrite shard 0 with some bad samples among good ones
        for i in range(6):
            tokens = np.full(SEQ + 1, i, dtype=np.uint16)
            if i == 1:
                tokens = tokens.astype(np.float32)
            if i == 2:
                tokens = tokens[:3]
            w.write({"__key__": f"k{i}", "tokens.npy": tokens})
    ds = TextTrainStream(data, "train", 1, shuffle_buffer=0)
    got = [int(b["input_ids"][0, 0]) for b in itertools.islice(iter(ds), 8)]
    assert not {1, 2} & set(got), "the bad samples never come out"
    assert {0, 3, 4, 5} <= set(got) and set(got) <= {0, 3, 4, 5} | set(range(6, 12)), (
        "members before the truncation survive"
    )
    assert ds.skips.counts["wrong_dtype"] >= 1 and ds.skips.counts["wrong_length"] >= 1
    assert ds.skips.counts["bad_shard"] >= 1 and any("shard-000002" in e for e in ds.skips.examples)
    assert any("k1" in e for e in ds.skips.examples), "the warning names the sample"
    assert any("shard-000002" in r.getMessage() or "shard-000001" in r.getMessage() for r in caplog.records)


def test_eval_skips_bad_samples_but_keeps_ranks_in_step(tmp_path):
    data = make_dataset(tmp_path, {"val": [5]})
    with wds.TarWriter(data.shards("val")[0]) as w:
        for i in range(5):
            w.write({"__key__": f"v{i}", "tokens.npy": np.full(SEQ + 1 if i != 3 else 2, i, dtype=np.uint16)})
    per_rank = [list(eval_batches(data, "val", 2, r, 2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    assert sum(float(b["weight"].sum()) for bs in per_rank for b in bs) == 4.0


def test_a_shard_cut_at_a_member_boundary_is_noticed_from_the_manifest(tmp_path):
    """tarfile ends quietly when a shard stops between members; the manifest's counts catch it."""
    data = make_dataset(tmp_path, {"train": [6, 6]})
    shard = data.shards("train")[0]
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[3].offset  # where sample 3 begins: samples 0-2 stay whole
    raw = open(shard, "rb").read()
    open(shard, "wb").write(raw[:cut])
    ds = TextTrainStream(data, "train", 1, shuffle_buffer=0)
    got = [int(b["input_ids"][0, 0]) for b in itertools.islice(iter(ds), 9)]
    assert sorted(got) == [0, 1, 2, 6, 7, 8, 9, 10, 11]
    assert ds.skips.counts["short_shard"] == 3, "the 3 lost samples are counted"
    assert any("shard-000000.tar: 3 of 6 samples" in e for e in ds.skips.examples)
    assert ds.skips.counts["bad_shard"] == 0, "no error was raised: only the count shows it"
