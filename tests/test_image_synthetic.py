"""make-synthetic-image-text: held-out classes, captions that match the pictures, determinism."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.image.loader import ImageTextShards
from data_pipelines.image.synthetic import COLOURS, SHAPES, WHERE, class_index, main
from data_pipelines.manifest import read_manifest
from data_pipelines.splits import SPLITS
from data_pipelines.text.tokenizer import load_tokenizer

SIZE = 64


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "shapes"
    assert (
        main(
            [
                "--output",
                str(out),
                "--count",
                "600",
                "--image-size",
                str(SIZE),
                "--seed",
                "3",
                "--samples-per-shard",
                "100",
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def samples_of(root: Path) -> dict[str, list[dict]]:
    manifest = read_manifest(root)
    out = {}
    for split in SPLITS:
        shards = [str(root / s) for s in manifest["splits"][split]["shards"]]
        out[split] = [
            {
                "img": np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")),
                "txt": s["txt"].decode(),
                "meta": json.loads(s["json"]),
            }
            for s in wds.WebDataset(shards, shardshuffle=False)
        ]
    return out


def test_manifest_classes_and_tokenizer(shapes: Path) -> None:
    manifest = read_manifest(shapes)
    assert (manifest["kind"], manifest["created_by"], manifest["classes"]) == (
        "image-text",
        "make-synthetic-image-text",
        "classes.json",
    )
    assert manifest["image_size"] == SIZE and manifest["seed"] == 3
    assert sum(s["samples"] for s in manifest["splits"].values()) == 600
    assert all(n == 100 for s in manifest["splits"].values() for n in s["shard_samples"][:-1])
    classes = ImageTextShards(shapes).classes()
    assert classes == json.loads((shapes / "classes.json").read_text())
    names = classes["classnames"]
    assert len(names) == len(set(names)) == len(COLOURS) * len(SHAPES) >= 30
    assert len(COLOURS) >= 6 and len(SHAPES) >= 5
    assert len(classes["templates"]) >= 3 and all("{}" in t for t in classes["templates"])
    assert classes["attributes"]["colours"] == list(COLOURS) and classes["attributes"]["shapes"] == list(SHAPES)
    held = classes["held_out"]
    assert 0.1 <= len(held) / len(names) <= 0.2 and held == sorted(set(held))
    # Every colour and every shape still appears in some train class.
    train_classes = [names[i].split() for i in range(len(names)) if i not in held]
    assert {c for c, _ in train_classes} == set(COLOURS) and {s for _, s in train_classes} == set(SHAPES)
    tok = load_tokenizer(shapes / manifest["tokenizer"]["path"])
    assert manifest["tokenizer"]["trained"] and len(tok) == manifest["tokenizer"]["vocab_size"]
    assert tok.decode(tok("a small red star on the left")["input_ids"]) == "a small red star on the left"


def test_held_out_classes_only_in_val_and_test(shapes: Path) -> None:
    held = set(ImageTextShards(shapes).classes()["held_out"])
    samples = samples_of(shapes)
    train_labels = {s["meta"]["label"] for s in samples["train"]}
    eval_labels = {s["meta"]["label"] for split in ("val", "test") for s in samples[split]}
    assert not train_labels & held
    assert eval_labels & held, "unseen combinations are there to be measured"
    assert len(train_labels) == 48 - len(held), "every other class is trained on"
    assert all(s["meta"]["held_out"] == (s["meta"]["label"] in held) for ss in samples.values() for s in ss)


def test_captions_and_pixels_match_the_attributes(shapes: Path) -> None:
    names = ImageTextShards(shapes).classes()["classnames"]
    checked = 0
    areas = {"small": [], "large": []}
    for s in (s for ss in samples_of(shapes).values() for s in ss):
        meta, caption = s["meta"], s["txt"]
        colour, shape, size, position = meta["colour"], meta["shape"], meta["size"], meta["position"]
        assert names[meta["label"]] == f"{colour} {shape}" and meta["label"] == class_index(colour, shape)
        words = caption.replace(",", "").split()
        assert colour in words and shape in words and size in words and WHERE[position] in caption
        assert s["img"].shape == (SIZE, SIZE, 3)
        # Pixels close to the named colour: the shape. Its centroid must be where the caption says.
        close = np.abs(s["img"].astype(int) - np.array(COLOURS[colour])).max(axis=2) < 50
        assert close.sum() > 4, caption
        ys, xs = np.nonzero(close)
        cx, cy = xs.mean() / SIZE, ys.mean() / SIZE
        expected = {
            "left": cx < 0.4,
            "right": cx > 0.6,
            "top": cy < 0.4,
            "bottom": cy > 0.6,
            "center": 0.4 < cx < 0.6 and 0.4 < cy < 0.6,
        }[position]
        assert expected, (caption, cx, cy)
        areas[size].append(close.sum())
        checked += 1
    assert checked == 600
    assert np.mean(areas["large"]) > 2.5 * np.mean(areas["small"])


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    def make(name: str, seed: int) -> dict[str, bytes]:
        out = tmp_path / name
        assert (
            main(
                [
                    "--output",
                    str(out),
                    "--count",
                    "60",
                    "--seed",
                    str(seed),
                    "--image-size",
                    "32",
                    "--vocab-size",
                    "300",
                    "--no-progress",
                ]
            )
            == 0
        )
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/shard-*.tar"))}

    a, b, c = make("a", 0), make("b", 0), make("c", 1)
    assert a and a == b
    assert a != c


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--output", str(tmp_path / "x"), "--count", "0", "--val-fraction", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--count must be >= 1" in err and "--val-fraction" in err and "Traceback" not in err
