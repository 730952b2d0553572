"""prepare-text on several "machines" (--num-nodes N --node-rank I), then prepare-merge: the merged
dataset holds the windows of a single-machine run, and every folder of shards has OpenCLIP's sizes.json."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_pipelines import nodes
from data_pipelines.loader import TextShards, eval_batches
from data_pipelines.manifest import read_manifest
from data_pipelines.splits import SPLITS
from data_pipelines.text import prepare

# 30 stdlib files of 2-40 kB: blocks of >= 60 kB make several packing blocks, so both nodes get some.
BLOCK = 60_000
FLAGS = [
    "--no-progress",
    "--seq-len",
    "32",
    "--samples-per-shard",
    "16",
    "--val-fraction",
    "0.2",
    "--test-fraction",
    "0.2",
]


def windows(out: Path, shards: list[str]) -> Counter:
    if not shards:
        return Counter()
    samples = wds.WebDataset([str(out / s) for s in shards], shardshuffle=False).decode()
    return Counter(s["tokens.npy"].tobytes() for s in samples)


def argv(files: list[Path], out: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [*map(str, files), "--output", str(out), "--tokenizer", str(tokenizer), *FLAGS, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stdlib_files, prepared_stdlib) -> dict[str, Path]:
    """One single-machine run and one two-node run (merged) of the same corpus and tokenizer."""
    tokenizer = prepared_stdlib / "tokenizer"
    root = tmp_path_factory.mktemp("nodes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "BLOCK_BYTES", BLOCK)
        assert prepare.main(argv(stdlib_files, root / "single", tokenizer)) == 0
        for rank in (1, 0):  # any order: the nodes do not wait for each other
            assert (
                prepare.main(
                    argv(stdlib_files, root / "multi", tokenizer, "--num-nodes", "2", "--node-rank", str(rank))
                )
                == 0
            )
    assert not (root / "multi" / "manifest.json").exists(), "only the merge writes the manifest"
    assert nodes.main([str(root / "multi")]) == 0
    return {"single": root / "single", "multi": root / "multi", "tokenizer": tokenizer}


def test_blocks_spread_over_both_nodes(stdlib_files, runs) -> None:
    parts = [read_manifest(nodes.part_path(runs["multi"], r)) for r in (0, 1)]
    assert all(p["splits"]["train"]["samples"] > 0 for p in parts)
    assert sorted(int(i) for p in parts for i in p["inputs"]) == list(range(len(stdlib_files)))
    assert {Path(s).name.split("-")[1] for p in parts for split in SPLITS for s in p["splits"][split]["shards"]} == {
        "r00000",
        "r00001",
    }


def test_merged_run_holds_the_windows_of_a_single_machine(runs) -> None:
    single, multi = read_manifest(runs["single"]), read_manifest(runs["multi"])
    assert multi["num_nodes"] == 2 and multi["inputs"] == single["inputs"]
    assert multi["skipped"] == single["skipped"]
    for split in SPLITS:
        a, b = single["splits"][split], multi["splits"][split]
        for key in ("samples", "documents", "tokens", "dropped_tokens"):
            assert a[key] == b[key], (split, key)
        assert windows(runs["single"], a["shards"]) == windows(runs["multi"], b["shards"])
        assert sum(b["shard_samples"]) == b["samples"]
    assert single["splits"]["val"]["samples"] and single["splits"]["test"]["samples"]
    # Split assignment by content hash: a window of one split is in no other.
    assert not set(windows(runs["multi"], multi["splits"]["train"]["shards"])) & set(
        windows(runs["multi"], multi["splits"]["val"]["shards"])
    )


def test_the_loader_reads_the_merged_manifest(runs) -> None:
    single, multi = TextShards(runs["single"]), TextShards(runs["multi"])
    for split in SPLITS:
        assert multi.num_samples(split) == single.num_samples(split) > 0
        assert all(Path(s).is_file() for s in multi.shards(split))
        read = sum(len(next(iter(b.values()))) for b in eval_batches(multi, split, 8))
        assert read == single.num_samples(split)


@pytest.mark.parametrize("run", ["single", "multi"])
def test_sizes_json_counts_what_each_tar_holds(runs, run) -> None:
    out = runs[run]
    manifest = read_manifest(out)
    for split in SPLITS:
        shards = manifest["splits"][split]["shards"]
        sizes = json.loads((out / split / "sizes.json").read_text())
        assert sorted(sizes) == sorted(Path(s).name for s in shards)
        for shard in shards:
            with tarfile.open(out / shard) as tar:
                members = [m for m in tar.getmembers() if m.name.endswith(".tokens.npy")]
            assert sizes[Path(shard).name] == len(members) > 0


def test_merge_names_the_missing_node(tmp_path, stdlib_files, runs, capsys) -> None:
    out = tmp_path / "half"
    assert prepare.main(argv(stdlib_files[:4], out, runs["tokenizer"], "--num-nodes", "3", "--node-rank", "0")) == 0
    assert prepare.main(argv(stdlib_files[:4], out, runs["tokenizer"], "--num-nodes", "3", "--node-rank", "2")) == 0
    capsys.readouterr()
    assert nodes.main([str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing the part of node 1 of 3" in err and "node-00001.json" in err
    assert not (out / "manifest.json").exists()


def test_merge_refuses_nodes_with_different_settings(tmp_path, stdlib_files, runs, capsys) -> None:
    out = tmp_path / "mixed"
    files = stdlib_files[:4]
    assert prepare.main(argv(files, out, runs["tokenizer"], "--num-nodes", "2", "--node-rank", "0")) == 0
    assert prepare.main(argv(files, out, runs["tokenizer"], "--num-nodes", "2", "--node-rank", "1", "--seed", "7")) == 0
    capsys.readouterr()
    assert nodes.main([str(out)]) == 2
    assert "node 1 ran with a different seed than node 0" in capsys.readouterr().err


def test_merge_refuses_nodes_that_saw_an_input_at_another_size(tmp_path, stdlib_files, runs, capsys) -> None:
    """Issue 23 item 5: each node plans the blocks from its own view of the input sizes; an input that
    differs between nodes (a copy still being written) would duplicate or lose windows. Named, refused."""
    import shutil

    out, copies = tmp_path / "drift", tmp_path / "inputs"
    copies.mkdir()
    files = [Path(shutil.copy(f, copies / f.name)) for f in stdlib_files[:4]]
    assert prepare.main(argv(files, out, runs["tokenizer"], "--num-nodes", "2", "--node-rank", "0")) == 0
    with files[2].open("a") as f:  # grows before node 1 reads it
        f.write("\n# appended later\n" * 50)
    assert prepare.main(argv(files, out, runs["tokenizer"], "--num-nodes", "2", "--node-rank", "1")) == 0
    capsys.readouterr()
    assert nodes.main([str(out)]) == 2
    err = capsys.readouterr().err
    assert f"input {files[2]} is" in err and "on node 1 and" in err and "on node 0" in err
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-nodes", "2", "--node-rank", "2"], "--node-rank must be in 0..1 for --num-nodes 2, got 2"),
        (["--num-nodes", "0"], "--num-nodes must be >= 1"),
        (["--num-nodes", "2", "--node-rank", "0", "--limit-documents", "3"], "--limit-documents"),
    ],
)
def test_bad_node_flags_exit_2(tmp_path, stdlib_files, runs, capsys, extra, message) -> None:
    assert prepare.main(argv(stdlib_files[:2], tmp_path / "o", runs["tokenizer"], *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_multi_node_text_needs_a_given_tokenizer(tmp_path, stdlib_files, capsys) -> None:
    args = [
        *map(str, stdlib_files[:2]),
        "--output",
        str(tmp_path / "o"),
        "--vocab-size",
        "300",
        *FLAGS,
        "--num-nodes",
        "2",
        "--node-rank",
        "1",
    ]
    assert prepare.main(args) == 2
    assert "--num-nodes > 1 needs --tokenizer" in capsys.readouterr().err


def test_a_node_refuses_to_overwrite_its_own_part_without_overwrite(tmp_path, stdlib_files, runs, capsys) -> None:
    out = tmp_path / "again"
    args = argv(stdlib_files[:3], out, runs["tokenizer"], "--num-nodes", "2", "--node-rank", "0")
    assert prepare.main(args) == 0
    assert prepare.main(args) == 2
    assert "of node 0" in capsys.readouterr().err
    assert prepare.main([*args, "--overwrite"]) == 0


def test_slurm_array_variables_are_the_defaults(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    args = prepare.build_parser().parse_args(["in", "--output", "o", "--tokenizer", "t"])
    assert (args.num_nodes, args.node_rank) == (4, 2)
    assert "SLURM_ARRAY_TASK_COUNT" in prepare.build_parser().format_help()
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    args = prepare.build_parser().parse_args(["in", "--output", "o", "--tokenizer", "t"])
    assert (args.num_nodes, args.node_rank) == (1, 0)


def test_packing_blocks_cut_by_bytes() -> None:
    from data_pipelines.text.sources import InputSpec

    specs = [InputSpec(Path(f"{i}"), "text", n) for i, n in enumerate([5, 5, 20, 1, 1, 9, 3])]
    assert prepare.packing_blocks(specs, 10) == [[0, 1], [2], [3, 4, 5], [6]]
    assert prepare.packing_blocks(specs, 10**9) == [list(range(7))]
    assert np.concatenate(prepare.packing_blocks(specs, 1)).tolist() == list(range(7))


def test_prepare_image_text_writes_sizes_json(tmp_path) -> None:
    from PIL import Image

    from data_pipelines.image import prepare as image_prepare

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"photo number {i}")
    out = tmp_path / "pairs"
    assert (
        image_prepare.main(
            [
                str(folder),
                "--output",
                str(out),
                "--image-size",
                "16",
                "--samples-per-shard",
                "4",
                "--val-fraction",
                "0.3",
                "--test-fraction",
                "0.01",
                "--no-progress",
            ]
        )
        == 0
    )
    manifest = read_manifest(out)
    for split, info in manifest["splits"].items():
        if not info["shards"]:
            assert not (out / split / "sizes.json").exists()
            continue
        sizes = json.loads((out / split / "sizes.json").read_text())
        for shard in info["shards"]:
            with tarfile.open(out / shard) as tar:
                assert sizes[Path(shard).name] == sum(m.name.endswith(".jpg") for m in tar.getmembers())
        assert sum(sizes.values()) == info["samples"]
    assert sum(info["samples"] for info in manifest["splits"].values()) == 12


def test_node_shard_names_on_the_fast_and_the_fallback_writer(tmp_path, monkeypatch) -> None:
    windows = np.arange(7 * 9, dtype=np.uint16).reshape(7, 9)

    def written(root: Path) -> prepare.WindowShardWriter:
        writer = prepare.WindowShardWriter(root / "val", "val", 3, "val-r00002", nodes.node_shard_pattern(2))
        writer.write(windows[:4])
        writer.write(windows[4:])
        writer.close()
        return writer

    fast = written(tmp_path / "fast")
    monkeypatch.setattr(prepare._MemberLayout, "matching_reference", classmethod(lambda cls, split, window: None))
    slow = written(tmp_path / "slow")
    for writer, root in ((fast, tmp_path / "fast"), (slow, tmp_path / "slow")):
        assert [p.name for p in writer.shards] == [f"shard-r00002-{i:06d}.tar" for i in range(3)]
        assert sorted(p.name for p in (root / "val").iterdir()) == [p.name for p in writer.shards]  # no scratch left
        assert writer.shard_samples == [3, 3, 1]
        samples = list(wds.WebDataset([str(p) for p in writer.shards], shardshuffle=False).decode())
        assert [s["__key__"] for s in samples] == [f"val-r00002-{i:010d}" for i in range(7)]
        assert np.array_equal(np.stack([s["tokens.npy"] for s in samples]), windows)
    assert [p.read_bytes() for p in fast.shards] == [p.read_bytes() for p in slow.shards]
