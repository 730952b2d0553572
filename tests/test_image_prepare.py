"""prepare-image-text end to end: img2dataset folders, tables and captioned image folders in,
shards a plain webdataset reader accepts out, with every rejected sample counted by reason."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.image.prepare import ImageOptions, main, process_image
from data_pipelines.manifest import read_manifest
from data_pipelines.splits import SPLITS, assign_split

FAST = ["--no-progress", "--image-size", "32", "--val-fraction", "0.25", "--test-fraction", "0.25"]


def noise(w: int, h: int, seed: int) -> Image.Image:
    """A random image: every seed gives different bytes and different pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


CORRUPT_JPEG = jpeg(noise(48, 48, 99))[:300] + b"\x00garbage" * 20


def read_all(out: Path, manifest: dict) -> dict[str, list[dict]]:
    found = {}
    for split in SPLITS:
        shards = [str(out / s) for s in manifest["splits"][split]["shards"]]
        found[split] = list(wds.WebDataset(shards, shardshuffle=False)) if shards else []
    return found


def write_img2dataset(folder: Path) -> dict[str, str]:
    """Two shards as img2dataset writes them; returns caption by key of the samples that must survive.

    Shard 00000 (with parquet and stats): 3 good images, a corrupt JPEG, an 8x8 image, a failed
    download (only in the parquet), and a "success" the tar lacks. Shard 00001 has only a
    stats file, reporting 2 failures.
    """
    folder.mkdir(parents=True)
    kept = {}
    rows = []
    with wds.TarWriter(str(folder / "00000.tar")) as tar:
        for i in range(7):
            key = f"{i:09d}"
            caption = f"img2dataset photo {i}"
            if i == 3:  # failed download: never in the tar
                rows.append(
                    {
                        "url": f"http://x/{i}",
                        "caption": caption,
                        "key": key,
                        "status": "failed_to_download",
                        "error_message": "HTTP Error 404",
                    }
                )
                continue
            rows.append(
                {"url": f"http://x/{i}", "caption": caption, "key": key, "status": "success", "error_message": None}
            )
            if i == 6:  # listed as a success, missing from the tar
                continue
            data = CORRUPT_JPEG if i == 2 else jpeg(noise(8, 8, i) if i == 4 else noise(64, 48, i))
            meta = {
                "url": f"http://x/{i}",
                "caption": caption,
                "key": key,
                "status": "success",
                "error_message": None,
                "width": 64,
                "height": 48,
                "original_width": 640,
                "original_height": 480,
                "exif": None,
                "sha256": None,
            }
            tar.write({"__key__": key, "jpg": data, "txt": caption, "json": meta})
            if i in (0, 1, 5):
                kept[key] = caption
    pq.write_table(pa.Table.from_pylist(rows), folder / "00000.parquet")
    (folder / "00000_stats.json").write_text(
        json.dumps(
            {
                "count": 7,
                "successes": 6,
                "failed_to_download": 1,
                "failed_to_resize": 0,
                "status_dict": {"success": 6, "HTTP Error 404": 1},
            }
        )
    )
    with wds.TarWriter(str(folder / "00001.tar")) as tar:
        key = f"{10000:09d}"
        tar.write(
            {
                "__key__": key,
                "jpg": jpeg(noise(40, 40, 50)),
                "txt": "second shard photo",
                "json": {"key": key, "status": "success"},
            }
        )
        kept[key] = "second shard photo"
    (folder / "00001_stats.json").write_text(
        json.dumps(
            {
                "count": 3,
                "successes": 1,
                "failed_to_download": 2,
                "failed_to_resize": 0,
                "status_dict": {"success": 1, "timeout": 2},
            }
        )
    )
    return kept


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every input layout, with one of each kind of bad sample."""
    root = tmp_path_factory.mktemp("raw")
    kept = write_img2dataset(root / "laion")

    # A CSV with relative paths (auto-detected "filepath"/"text" columns): a large photo for
    # draft mode, a missing file and an empty caption.
    (root / "table" / "imgs").mkdir(parents=True)
    noise(2000, 1500, 7).save(root / "table" / "imgs" / "big.jpg", quality=80)
    noise(50, 40, 8).save(root / "table" / "imgs" / "plain.jpg")
    noise(50, 40, 9).save(root / "table" / "imgs" / "quiet.jpg")
    (root / "table" / "pairs.csv").write_text(
        "filepath,text\nimgs/big.jpg,a very large photo\nimgs/absent.jpg,a photo that is not there\n"
        "imgs/plain.jpg,a plain photo\nimgs/quiet.jpg,\n"
    )
    kept.update({"imgs/big.jpg": "a very large photo", "imgs/plain.jpg": "a plain photo"})

    # A TSV with the default column names and labels.
    (root / "tsv").mkdir()
    noise(30, 60, 10).save(root / "tsv" / "tall.png")
    (root / "tsv" / "labelled.tsv").write_text("image_path\tcaption\tlabel\ntall.png\ta tall picture\t3\n")
    kept["tall.png"] = "a tall picture"

    # A folder with sidecar captions: one image without a caption, one too long, and an exact
    # copy of plain.jpg (a duplicate across inputs: the CSV's comes first and is kept).
    folder = root / "folder" / "sub"
    folder.mkdir(parents=True)
    noise(64, 64, 11).save(folder / "a.jpg")
    (folder / "a.txt").write_text("  a folder photo \n")
    noise(64, 64, 12).save(folder / "nocaption.jpg")
    noise(64, 64, 13).save(folder / "long.jpg")
    (folder / "long.txt").write_text("x" * 2000)
    (folder / "copy.jpg").write_bytes((root / "table" / "imgs" / "plain.jpg").read_bytes())
    (folder / "copy.txt").write_text("the same image again")
    noise(64, 64, 14).save(folder / "latin1.jpg")
    (folder / "latin1.txt").write_bytes("a caf\xe9 photo".encode("latin-1"))  # not UTF-8: counted, not U+FFFD
    kept["sub/a"] = "a folder photo"
    inputs = [root / "laion", root / "table" / "pairs.csv", root / "tsv" / "labelled.tsv", root / "folder"]
    return {"root": root, "inputs": [str(p) for p in inputs], "kept": kept}


@pytest.fixture(scope="module")
def prepared(raw: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "pairs"
    assert main([*raw["inputs"], "--output", str(out), "--vocab-size", "300", *FAST]) == 0
    return out


def test_rejections_are_counted_by_reason_with_named_examples(prepared: Path, raw: dict) -> None:
    rejected = read_manifest(prepared)["rejected"]
    assert rejected["by_reason"] == {
        "failed_download": 3,  # one from the parquet, two from the second shard's stats
        "undecodable": 1,
        "too_small": 1,
        "missing_image": 2,  # absent.jpg in the CSV; a parquet "success" the tar lacks
        "empty_caption": 1,
        "caption_too_long": 1,
        "missing_caption": 1,
        "duplicate_image": 1,
        "caption_not_utf8": 1,
    }
    assert rejected["total"] == 12
    by_reason = {}
    for example in rejected["examples"]:
        by_reason.setdefault(example["reason"], []).append(example)
    assert by_reason["undecodable"][0]["source"].endswith("00000.tar:000000002")
    assert by_reason["too_small"][0]["detail"].startswith("8x8")
    assert by_reason["failed_download"][0]["source"].endswith("00000.parquet:000000003")
    assert "404" in by_reason["failed_download"][0]["detail"]
    assert any(
        e["source"].endswith("pairs.csv:line 3") and "absent.jpg" in e["detail"] for e in by_reason["missing_image"]
    )
    assert by_reason["duplicate_image"][0]["source"].endswith("copy.jpg")
    assert by_reason["caption_not_utf8"][0]["source"].endswith("latin1.jpg")


def test_shards_hold_resized_jpegs_captions_and_metadata(prepared: Path, raw: dict) -> None:
    manifest = read_manifest(prepared)
    assert (manifest["kind"], manifest["version"], manifest["created_by"]) == ("image-text", 1, "prepare-image-text")
    assert (manifest["image_size"], manifest["resize_mode"], manifest["jpeg_quality"]) == (32, "center_crop", 90)
    assert (manifest["seed"], manifest["val_fraction"], manifest["test_fraction"]) == (0, 0.25, 0.25)
    assert [i["format"] for i in manifest["inputs"]] == ["img2dataset", "table", "table", "folder"]
    assert [i["samples"] for i in manifest["inputs"]] == [4, 2, 1, 1]
    tok = manifest["tokenizer"]
    assert tok["path"] == "tokenizer" and tok["trained"] is True and tok["eos_token_id"] == 0
    assert (prepared / "tokenizer" / "tokenizer.json").is_file()

    samples = read_all(prepared, manifest)
    captions = {}
    for split, items in samples.items():
        info = manifest["splits"][split]
        assert len(items) == info["samples"] == sum(info["shard_samples"])
        assert [s["__key__"] for s in items] == [f"{split}-{i:010d}" for i in range(len(items))]
        for s in items:
            img = Image.open(io.BytesIO(s["jpg"]))
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
            meta = json.loads(s["json"])
            assert (meta["resized_width"], meta["resized_height"]) == (32, 32)
            captions[meta["key"]] = s["txt"].decode()
            assert meta["source"]
            if meta["key"] == "imgs/big.jpg":
                assert (meta["width"], meta["height"]) == (2000, 1500)
            if meta["key"] == "tall.png":
                assert meta["label"] == 3 and (meta["width"], meta["height"]) == (30, 60)
            if meta["key"] == "000000000":
                assert meta["url"] == "http://x/0" and meta["original_width"] == 640
    assert captions == raw["kept"], "exactly the good samples, each once, captions stripped"


def test_duplicates_land_in_one_split_once(prepared: Path, raw: dict) -> None:
    manifest = read_manifest(prepared)
    plain = (raw["root"] / "table" / "imgs" / "plain.jpg").read_bytes()
    import hashlib

    split = assign_split(hashlib.sha256(plain).digest(), 0.25, 0.25, 0)
    where = [
        (s, json.loads(x["json"])["key"])
        for s, items in read_all(prepared, manifest).items()
        for x in items
        if x["txt"] in (b"a plain photo", b"the same image again")
    ]
    assert where == [(split, "imgs/plain.jpg")]


def test_pixel_identical_images_in_different_files_are_duplicates(tmp_path: Path) -> None:
    img = noise(40, 40, 1)
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.bmp")  # other bytes, same pixels
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    out = tmp_path / "out"
    assert main([str(tmp_path), "--output", str(out), *FAST]) == 0
    manifest = read_manifest(out)
    assert manifest["rejected"]["by_reason"] == {"duplicate_image": 1}
    assert "pixels" in manifest["rejected"]["examples"][0]["detail"]
    assert manifest["tokenizer"] is None, "neither --tokenizer nor --vocab-size: the recipe names one"


def test_worker_count_does_not_change_the_output(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(45):  # several chunks of work per worker
        noise(48 + i, 40, 100 + i).save(src / f"{i:03d}.jpg")
        (src / f"{i:03d}.txt").write_text(f"caption {i}" if i % 9 else "")
    (src / "bad.jpg").write_bytes(CORRUPT_JPEG)
    (src / "bad.txt").write_text("broken")
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main([str(src), "--output", str(out), "--workers", str(workers), "--samples-per-shard", "7", *FAST]) == 0
        outputs.append(out)
    shards = [{p.relative_to(o).as_posix(): p.read_bytes() for p in sorted(o.glob("*/shard-*.tar"))} for o in outputs]
    assert len(shards[0]) >= 4 and shards[0] == shards[1]
    m1, m2 = read_manifest(outputs[0]), read_manifest(outputs[1])
    assert m1["splits"] == m2["splits"] and m1["rejected"] == m2["rejected"]
    assert m1["rejected"]["by_reason"] == {"empty_caption": 5, "undecodable": 1}


def test_workers_train_the_same_caption_tokenizer_with_its_imports_overlapped(tmp_path: Path) -> None:
    """With --workers 2 the parent imports the shard writer and the tokenizer classes on a thread
    while the workers decode; the shards and the tokenizer it then trains, saves and names in the
    manifest are the ones --workers 1 makes."""
    import threading

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        noise(40, 40, 300 + i).save(src / f"{i:03d}.jpg")
        (src / f"{i:03d}.txt").write_text(f"a caption about picture {i} of many")
    from data_pipelines.workers import BackgroundImports

    started = []
    original = BackgroundImports.start

    def spy(self):
        started.append([step.__name__ for step in self.steps])
        return original(self)

    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(BackgroundImports, "start", spy)
            args = [str(src), "--output", str(out), "--workers", str(workers), "--vocab-size", "300", *FAST]
            assert main(args) == 0
        outputs.append(out)
    assert started == [["import_shard_writer", "_import_tokenizer_class"]], "only beside worker processes"
    assert not [t for t in threading.enumerate() if t.name == "background-imports"], "the thread has finished"
    m1, m2 = read_manifest(outputs[0]), read_manifest(outputs[1])
    assert m1["tokenizer"] == m2["tokenizer"] and m1["tokenizer"]["trained"]
    for name in ("tokenizer/tokenizer.json", "train/shard-000000.tar"):
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name


def test_large_jpeg_is_decoded_at_reduced_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import JpegImagePlugin

    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        calls.append((mode, size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = jpeg(noise(2000, 1500, 3), quality=75)
    result = process_image(data, None, ImageOptions(image_size=64))
    assert result.reason is None
    assert (result.width, result.height, result.resized_width, result.resized_height) == (2000, 1500, 64, 64)
    # libjpeg decoded at 1/8 scale: 250x188 pixels, not 3 million.
    assert calls == [("RGB", (64, 64), (250, 188))]
    assert Image.open(io.BytesIO(result.jpeg)).size == (64, 64)


def test_resize_modes(tmp_path: Path) -> None:
    wide = Image.new("RGB", (200, 100), (10, 10, 10))
    data = jpeg(wide)
    # img2dataset's meanings: border pads (white) to the square, keep_ratio only scales the shorter side
    bordered = process_image(data, None, ImageOptions(image_size=50, resize_mode="border"))
    out = np.asarray(Image.open(io.BytesIO(bordered.jpeg)))
    assert out.shape == (50, 50, 3)
    assert out[:10].min() > 240 and out[-10:].min() > 240, "white borders above and below"
    assert out[20:30].max() < 40, "the image in the middle"
    kept = process_image(data, None, ImageOptions(image_size=50, resize_mode="keep_ratio"))
    assert np.asarray(Image.open(io.BytesIO(kept.jpeg))).shape == (50, 100, 3)
    same = process_image(data, None, ImageOptions(image_size=50, resize_mode="no"))
    assert (same.resized_width, same.resized_height) == (200, 100)
    crop = process_image(data, None, ImageOptions(image_size=50, resize_mode="center_crop"))
    assert (crop.resized_width, crop.resized_height) == (50, 50)


def test_alpha_is_composited_on_white() -> None:
    img = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    result = process_image(buffer.getvalue(), None, ImageOptions(image_size=20))
    assert np.asarray(Image.open(io.BytesIO(result.jpeg))).min() > 240


def test_parquet_table_with_explicit_fields_and_an_external_tokenizer(tmp_path: Path) -> None:
    from data_pipelines.text.tokenizer import save_tokenizer, train_bpe_tokenizer

    tok_dir = save_tokenizer(train_bpe_tokenizer(["a photo of a thing"] * 5, 300), tmp_path / "tok")
    (tmp_path / "data").mkdir()
    for i in range(3):
        noise(40, 40, i).save(tmp_path / "data" / f"{i}.jpg")
    pq.write_table(
        pa.table({"img": [f"{i}.jpg" for i in range(3)], "alt": ["one", "two", "three"]}),
        tmp_path / "data" / "pairs.parquet",
    )
    out = tmp_path / "out"
    argv = [
        str(tmp_path / "data" / "pairs.parquet"),
        "--output",
        str(out),
        "--image-field",
        "img",
        "--caption-field",
        "alt",
        "--tokenizer",
        str(tok_dir),
        *FAST,
    ]
    assert main(argv) == 0
    manifest = read_manifest(out)
    assert sum(s["samples"] for s in manifest["splits"].values()) == 3
    assert manifest["tokenizer"]["trained"] is False and manifest["tokenizer"]["source"] == str(tok_dir)
    assert (out / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "case", ["missing_input", "bad_field", "not_empty", "both_tokenizers", "bad_quality", "nothing_usable"]
)
def test_user_errors_exit_2_without_traceback(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "src"
    src.mkdir()
    noise(40, 40, 0).save(src / "x.jpg")
    (src / "x.txt").write_text("a caption")
    (tmp_path / "t.csv").write_text("picture,caption\nsrc/x.jpg,hello\n")
    (tmp_path / "t.csv.d").mkdir()
    (tmp_path / "t.csv.d" / "old.txt").write_text("someone else's file")
    out = tmp_path / "out"
    argv = {
        "missing_input": [str(tmp_path / "nope"), "--output", str(out)],
        "bad_field": [str(tmp_path / "t.csv"), "--output", str(out), "--image-field", "photo"],
        "not_empty": [str(src), "--output", str(tmp_path / "t.csv.d")],
        "both_tokenizers": [str(src), "--output", str(out), "--tokenizer", str(src), "--vocab-size", "300"],
        "bad_quality": [str(src), "--output", str(out), "--jpeg-quality", "0", "--workers", "0"],
        "nothing_usable": [str(src), "--output", str(out), "--min-image-size", "100"],
    }[case]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("prepare-image-text: error:" in err or "usage:" in err)
    expected = {
        "missing_input": "nope",
        "bad_field": "t.csv",
        "not_empty": "--overwrite",
        "both_tokenizers": "not allowed with",
        "bad_quality": "--workers must be >= 1",
        "nothing_usable": "too_small=1",
    }[case]
    assert expected in err
    if case == "bad_quality":
        assert "--jpeg-quality" in err, "every problem is reported at once"


def test_runs_as_a_module_and_overwrites(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        noise(40, 40, i).save(src / f"{i}.jpg")
        (src / f"{i}.txt").write_text(f"caption {i}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    cmd = [sys.executable, "-m", "data_pipelines.image.prepare", str(src), "--output", str(out), "--overwrite", *FAST]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "rejected 0" in result.stdout
    assert read_manifest(out)["kind"] == "image-text"
