"""One decode for prepare, training and evaluation (data_pipelines/image/decode.py): 16-bit grey is
scaled to 8 bits (not clipped at 255), EXIF orientation is applied, transparency goes on white,
the same in every path; and --resize-mode has img2dataset's names and meanings."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from data_pipelines.image.decode import decode_rgb, image_orientation, jpeg_orientation, open_image, to_rgb
from data_pipelines.image.folder import ImageFolder, folder_eval_batches
from data_pipelines.image.loader import decode_sample, decode_train_sample
from data_pipelines.image.prepare import build_parser, main
from data_pipelines.image.process import ImageOptions, process_image
from data_pipelines.image.transforms import CLIP_MEAN, CLIP_STD, TrainView, decode_image, eval_transform, simplejpeg

TRAIN_DECODERS = ["pillow"] + (["simplejpeg"] if simplejpeg is not None else [])


def png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def grey16_ramp(w: int = 64, h: int = 32) -> bytes:
    """A 16-bit grey PNG (mode I;16) whose values run 0..65520 row by row."""
    values = np.linspace(0, 65520, w * h).round().astype(np.uint16).reshape(h, w)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    data = png(img)
    assert open_image(data).mode == "I;16"
    return data


def exif_jpeg(orientation: int, w: int = 48, h: int = 24, exif: bytes | None = None) -> bytes:
    """A w x h JPEG, grey with a red block in its stored top-left corner, tagged `orientation`."""
    arr = np.full((h, w, 3), 128, dtype=np.uint8)
    arr[: h // 2, : h // 2] = (230, 20, 20)
    if exif is None:
        tags = Image.Exif()
        tags[0x0112] = orientation
        exif = tags.tobytes()
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG", quality=95, subsampling=0, exif=exif)
    return buffer.getvalue()


def la_png() -> bytes:
    """40 x 20 LA: the left half transparent black, the right half opaque grey 60."""
    arr = np.zeros((20, 40, 2), dtype=np.uint8)
    arr[:, 20:] = (60, 255)
    return png(Image.fromarray(arr, "LA"))


def jpeg_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def every_decode(data: bytes) -> dict[str, np.ndarray]:
    """(h, w, 3) uint8 pixels of `data` by each path: evaluation (image-text loader), training
    (TrainView's decoders; at full size, as a view this large needs) and the labelled-folder dataset's decode."""
    out = {"eval": np.asarray(decode_sample({"png": data, "txt": b"caption"})[0])}
    for decoder in ("auto", "pillow"):
        out[f"train-{decoder}"] = decode_train_sample({"png": data, "txt": b"c"}, TrainView(512, decoder=decoder))[
            0
        ].pixels
    out["train-full"] = decode_image(data).pixels
    return out


# ---------------------------------------------------------------------------------------------
# 16-bit grey


def test_16bit_grey_ramp_is_scaled_to_8_bits_in_prepare_and_the_loaders() -> None:
    data = grey16_ramp()
    for name, pixels in every_decode(data).items():
        assert pixels.dtype == np.uint8 and pixels.shape == (32, 64, 3), name
        assert 120 < pixels.mean() < 135, (name, pixels.mean())  # clipped at 255 it was 254.4
        assert pixels[0, 0].max() == 0 and pixels[-1, -1].min() >= 254, name
        row = pixels[:, :, 0].reshape(-1).astype(int)
        assert (np.diff(row) >= 0).all(), f"{name}: the ramp still rises"
    for mode in ("no", "center_crop"):
        result = process_image(data, None, ImageOptions(image_size=32, resize_mode=mode, min_image_size=8))
        assert result.reason is None
        assert 120 < jpeg_pixels(result.jpeg).mean() < 135, (mode, jpeg_pixels(result.jpeg).mean())


def test_32bit_integer_and_float_grey_are_scaled_by_their_range() -> None:
    ramp = np.linspace(0, 1, 64 * 16).reshape(16, 64)
    as_16bit = to_rgb(Image.fromarray((ramp * 65535).round().astype(np.int32)))  # mode I, 16-bit values
    as_float = to_rgb(Image.fromarray(ramp.astype(np.float32)))  # mode F in 0..1
    wide = to_rgb(Image.fromarray((ramp * 1e6 - 5e5).round().astype(np.int32)))  # neither: min..max
    for img in (as_16bit, as_float, wide):
        arr = np.asarray(img).astype(int)
        assert img.mode == "RGB" and 120 < arr.mean() < 135 and arr.min() == 0 and arr.max() == 255
    eight = to_rgb(Image.fromarray(np.full((4, 4), 200, dtype=np.int32)))  # 8-bit values in I: as they are
    assert (np.asarray(eight) == 200).all()


# ---------------------------------------------------------------------------------------------
# EXIF orientation


def test_exif_orientation_6_jpeg_is_upright_in_prepare_train_and_eval() -> None:
    data = exif_jpeg(6)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert upright.shape == (48, 24, 3), "orientation 6: the stored 48 x 24 picture shows 24 wide, 48 high"
    assert upright[:8, -8:, 0].mean() > 200 and upright[:8, :8, 0].mean() < 150, "red block now top right"
    for name, pixels in every_decode(data).items():
        assert np.array_equal(pixels, upright), name
    for decoder in TRAIN_DECODERS:
        decoded = TrainView(512, decoder=decoder).decode(data)  # large: decoded at full size
        assert (decoded.width, decoded.height) == (24, 48), decoder
        assert np.array_equal(decoded.pixels, upright), decoder
    result = process_image(data, None, ImageOptions(image_size=16, resize_mode="no", jpeg_quality=95))
    assert result.reason is None and (result.width, result.height) == (24, 48)
    stored = jpeg_pixels(result.jpeg)
    assert stored.shape == upright.shape and np.abs(stored - upright.astype(int)).mean() < 3
    # eval crops the same centre in both loaders
    image_text = eval_transform(decode_rgb(data), 16)
    plain = TrainView(16, augment=False)
    folder_view = plain(plain.decode(data), None)  # type: ignore[arg-type]
    diff = folder_view.float() / 255 - (
        image_text * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    )
    assert diff.abs().mean() < 0.02


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_decodes_alike_at_full_and_reduced_scale(orientation: int) -> None:
    data = exif_jpeg(orientation, 320, 160)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(decode_image(data).pixels, np.asarray(upright))
    views = {d: TrainView(24, decoder=d).decode(data) for d in TRAIN_DECODERS}  # reduced: 1/4 scale
    for decoder, decoded in views.items():
        assert (decoded.width, decoded.height) == upright.size, decoder
        assert decoded.pixels.shape[:2] == (upright.size[1] // 4, upright.size[0] // 4), decoder
    if len(views) == 2:
        a, b = (v.pixels.astype(int) for v in views.values())
        assert np.abs(a - b).max() <= 2


def test_jpeg_orientation_reads_what_pillow_reads() -> None:
    for orientation in range(1, 9):
        data = exif_jpeg(orientation)
        assert jpeg_orientation(data) == image_orientation(open_image(data)) == orientation
    big_endian = b"Exif\0\0MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x06\0\0\0\0\0\0"
    data = exif_jpeg(1, exif=big_endian)
    assert jpeg_orientation(data) == image_orientation(open_image(data)) == 6
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="JPEG")
    assert jpeg_orientation(plain.getvalue()) == 1
    assert jpeg_orientation(b"not a jpeg") is None


# ---------------------------------------------------------------------------------------------
# Transparency


def test_transparent_la_png_is_white_in_prepare_train_and_eval() -> None:
    data = la_png()
    for name, pixels in every_decode(data).items():
        assert pixels.shape == (20, 40, 3), name
        assert (pixels[:, :20] == 255).all(), f"{name}: transparent is white, not black"
        assert (pixels[:, 20:] == 60).all(), name
    result = process_image(data, None, ImageOptions(image_size=20, resize_mode="no", min_image_size=8))
    stored = jpeg_pixels(result.jpeg)
    assert stored[:, :16].min() > 240 and stored[:, 24:].max() < 80


def test_labelled_folder_and_prepare_cli_decode_alike(tmp_path: Path) -> None:
    """End to end: the folder classifier's eval batches and prepare-image-text's shards."""
    images = {"rotated.jpg": exif_jpeg(6), "alpha.png": la_png(), "deep.png": grey16_ramp()}
    root = tmp_path / "folder"
    for split in ("train", "val"):
        (root / split / "thing").mkdir(parents=True)
        for name, data in images.items():
            (root / split / "thing" / name).write_bytes(data)
    files = [Path(p).name for p, _ in ImageFolder(root).files("val")]
    batch = next(folder_eval_batches(ImageFolder(root), "val", 8, 16))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    for row, name in enumerate(files):
        levels = (batch["pixel_values"][row] * std + mean) * 255
        expected = eval_transform(decode_rgb(images[name]), 16) * std + mean
        assert (levels - expected * 255).abs().mean() < 3, name
    alpha = (batch["pixel_values"][files.index("alpha.png")] * std + mean) * 255
    assert alpha[:, :, :4].min() > 250, "transparent on white in the folder loader"

    captioned = tmp_path / "captioned"
    captioned.mkdir()
    for name, data in images.items():
        (captioned / name).write_bytes(data)
        (captioned / name).with_suffix(".txt").write_text(f"a {name}")
    out = tmp_path / "out"
    argv = [str(captioned), "--output", str(out), "--no-progress", "--image-size", "16", "--min-image-size", "8"]
    assert main([*argv, "--resize-mode", "no", "--jpeg-quality", "95"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejected"]["total"] == 0
    from data_pipelines.loader import read_samples

    shards = [str(out / s) for split in manifest["splits"].values() for s in split["shards"]]
    seen = {}
    for sample in read_samples(shards):
        meta = json.loads(sample["json"])
        seen[Path(meta["source"]).name] = (jpeg_pixels(sample["jpg"]), meta)
    assert sorted(seen) == sorted(images)
    rotated, meta = seen["rotated.jpg"]
    assert rotated.shape == (48, 24, 3) and (meta["width"], meta["height"]) == (24, 48)
    assert 120 < seen["deep.png"][0].mean() < 135
    assert seen["alpha.png"][0][:, :16].min() > 240


# ---------------------------------------------------------------------------------------------
# Resize modes


def test_resize_modes_have_img2dataset_meanings() -> None:
    black = Image.new("RGB", (200, 100), (0, 0, 0))
    data = png(black)

    def run(mode: str) -> tuple[np.ndarray, tuple[int, int]]:
        result = process_image(data, None, ImageOptions(image_size=50, resize_mode=mode))
        assert result.reason is None, mode
        return jpeg_pixels(result.jpeg), (result.resized_width, result.resized_height)

    border, size = run("border")
    assert size == (50, 50) and border.shape == (50, 50, 3)
    assert border[:10].min() > 240 and border[-10:].min() > 240, "white bars above and below"
    assert border[20:30].max() < 20, "the picture in the middle"
    kept, size = run("keep_ratio")
    assert size == (100, 50) and kept.shape == (50, 100, 3), "shorter side to 50, the ratio kept"
    assert kept.max() < 20, "no padding"
    largest, size = run("keep_ratio_largest")
    assert size == (50, 25) and largest.max() < 20
    assert run("center_crop")[1] == (50, 50) and run("no")[1] == (200, 100)
    tall = process_image(png(Image.new("RGB", (30, 90))), None, ImageOptions(image_size=20, resize_mode="keep_ratio"))
    assert (tall.resized_width, tall.resized_height) == (20, 60)


def test_resize_mode_flag_offers_img2dataset_names(tmp_path: Path) -> None:
    parser = build_parser()
    for mode in ("center_crop", "keep_ratio", "keep_ratio_largest", "border", "no"):
        assert (
            parser.parse_args([str(tmp_path), "--output", str(tmp_path / "o"), "--resize-mode", mode]).resize_mode
            == mode
        )
    text = parser.format_help()
    assert "border" in text and "white" in text
