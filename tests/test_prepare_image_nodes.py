"""prepare-image-text on two "machines" (--num-nodes 2 --node-rank I), then prepare-merge: duplicates
that land on different nodes are dropped by the merge, so the merged dataset holds exactly the
samples (keys, captions, images) of a single-machine run, and the loader reads it."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import nodes
from data_pipelines.image import prepare
from data_pipelines.image.loader import ImageTextShards
from data_pipelines.loader import read_samples
from data_pipelines.manifest import read_manifest
from data_pipelines.splits import SPLITS

FLAGS = [
    "--no-progress",
    "--image-size",
    "16",
    "--samples-per-shard",
    "2",
    "--val-fraction",
    "0.25",
    "--test-fraction",
    "0.25",
]


def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8), "RGB")


def make_inputs(root: Path) -> list[Path]:
    """A table whose rows alternate between the two nodes (row r on node r % 2), with duplicates of
    bytes and of pixels on the same node and across nodes, then a captioned folder repeating one."""
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(14):
        noise(i).save(images / f"{i:02d}.png")
    noise(1).save(images / "01-again.png", compress_level=0)  # other bytes, the same pixels as 01.png
    assert (images / "01-again.png").read_bytes() != (images / "01.png").read_bytes()
    rows = [
        "00.png",
        "00.png",  # bytes repeated on the other node: the merge drops row 1
        "01.png",
        "02.png",
        "01.png",  # bytes repeated on the same node: node 0 drops it
        "01-again.png",  # pixels repeated on the other node: the merge drops it
        "absent.png",
        "03.png",
        "02.png",  # repeats row 3 (node 1), here on node 0: the merge drops it
        *[f"{i:02d}.png" for i in range(4, 14)],
        "00.png",
    ]  # row 19, on node 1, which kept row 1: node 1 drops it
    lines = ["image_path,caption"] + [f"images/{name},caption of row {r}" for r, name in enumerate(rows)]
    lines[8] = "images/03.png,"  # row 7: an empty caption
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    folder = root / "folder"
    folder.mkdir()
    shutil.copy(images / "04.png", folder / "a.png")  # repeats row 9 (node 1), here on node 0
    (folder / "a.txt").write_text("folder copy of 04")
    noise(50).save(folder / "b.png")
    (folder / "b.txt").write_text("a new one")
    return [root / "pairs.csv", folder]


def samples(out: Path, shards: list[str]) -> Counter:
    """What a split holds, sample keys aside (those name the node): the json (with the input's key
    and source), caption and JPEG of each."""
    return Counter((s["json"], s["txt"], s["jpg"]) for s in read_samples(str(out / p) for p in shards))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image-nodes")
    inputs = [str(p) for p in make_inputs(root / "in")]
    assert prepare.main([*inputs, "--output", str(root / "single"), *FLAGS]) == 0
    for rank in (1, 0):  # any order
        assert (
            prepare.main(
                [*inputs, "--output", str(root / "multi"), *FLAGS, "--num-nodes", "2", "--node-rank", str(rank)]
            )
            == 0
        )
    assert not (root / "multi" / "manifest.json").exists(), "only the merge writes the manifest"
    parts = [read_manifest(nodes.part_path(root / "multi", r)) for r in (0, 1)]
    assert nodes.main([str(root / "multi")]) == 0
    return {"single": root / "single", "multi": root / "multi", "parts": parts}


def test_merged_nodes_hold_the_samples_of_one_machine(runs) -> None:
    single, multi = read_manifest(runs["single"]), read_manifest(runs["multi"])
    assert multi["kind"] == "image-text" and multi["num_nodes"] == 2
    assert multi["inputs"] == single["inputs"]
    assert {k: v for k, v in multi["rejected"].items() if k != "examples"} == {
        k: v for k, v in single["rejected"].items() if k != "examples"
    }
    assert single["rejected"]["by_reason"] == {"duplicate_image": 6, "empty_caption": 1, "missing_image": 1}
    for split in SPLITS:
        a, b = single["splits"][split], multi["splits"][split]
        assert a["samples"] == b["samples"] == sum(b["shard_samples"]), split
        assert samples(runs["single"], a["shards"]) == samples(runs["multi"], b["shards"]), split
    assert all(single["splits"][s]["samples"] for s in SPLITS)
    # The nodes kept 4 duplicates of samples the other node kept earlier (rows 1, 5, 8, the folder's a.png).
    written = sum(p["splits"][s]["samples"] for p in runs["parts"] for s in SPLITS)
    assert written == sum(multi["splits"][s]["samples"] for s in SPLITS) + 4
    assert all(p["splits"]["train"]["samples"] for p in runs["parts"])
    for key in ("image_size", "resize_mode", "seed", "val_fraction", "test_fraction", "samples_per_shard", "tokenizer"):
        assert multi[key] == single[key], key


def test_loader_reads_the_merged_manifest(runs) -> None:
    single, multi = ImageTextShards(runs["single"]), ImageTextShards(runs["multi"])
    for split in SPLITS:
        assert multi.num_samples(split) == single.num_samples(split) > 0
        read = list(read_samples(multi.shards(split)))
        assert len(read) == multi.num_samples(split)
        assert all(s["__key__"].startswith(f"{split}-r0000") for s in read)
        sizes = json.loads((runs["multi"] / split / "sizes.json").read_text())
        assert sorted(sizes) == sorted(Path(s).name for s in multi.shards(split))
        for shard in multi.shards(split):
            with tarfile.open(shard) as tar:
                assert sizes[Path(shard).name] == sum(m.name.endswith(".jpg") for m in tar.getmembers()) > 0


def test_merging_again_gives_the_same_dataset(runs) -> None:
    before = read_manifest(runs["multi"])
    held = {split: samples(runs["multi"], before["splits"][split]["shards"]) for split in SPLITS}
    assert nodes.main([str(runs["multi"])]) == 0
    after = read_manifest(runs["multi"])
    assert after == before
    assert {split: samples(runs["multi"], after["splits"][split]["shards"]) for split in SPLITS} == held


def test_multi_node_image_text_cannot_train_a_tokenizer(tmp_path, capsys) -> None:
    assert (
        prepare.main(
            [
                str(tmp_path),
                "--output",
                str(tmp_path / "o"),
                "--vocab-size",
                "300",
                *FLAGS,
                "--num-nodes",
                "2",
                "--node-rank",
                "0",
            ]
        )
        == 2
    )
    assert "--num-nodes > 1 cannot train a caption tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_merge_refuses_nodes_that_read_a_table_at_another_size(tmp_path, capsys) -> None:
    """Issue 23 item 5: rows alternate between the nodes by their order; a table that grew between
    node 0's and node 1's reading would shift them. prepare-merge names it and refuses."""
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    argv = [*map(str, inputs), "--output", str(out), *FLAGS, "--num-nodes", "2"]
    assert prepare.main([*argv, "--node-rank", "0"]) == 0
    with inputs[0].open("a") as f:
        f.write("images/05.png,a row added later\n")
    assert prepare.main([*argv, "--node-rank", "1"]) == 0
    capsys.readouterr()
    assert nodes.main([str(out)]) == 2
    err = capsys.readouterr().err
    assert f"input {inputs[0]} is" in err and "bytes on node 1" in err
