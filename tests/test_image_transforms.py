"""Pillow + torch image transforms: shapes, normalisation, crops that stay in bounds, determinism."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.image.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    TrainView,
    _square,
    center_crop,
    crop_box,
    dct_reduction,
    decode_image,
    decode_rgb,
    eval_transform,
    hflip,
    normalize_batch,
    random_resized_crop,
    resize_crop,
    simplejpeg,
    smallest_crop,
    to_tensor_normalized,
    train_transform,
)


def coordinates(w: int = 256, h: int = 192) -> Image.Image:
    """Red = x and green = y (in 0..255): any crop's pixels tell where it came from."""
    x = np.linspace(0, 255, w).round().astype(np.uint8)
    y = np.linspace(0, 255, h).round().astype(np.uint8)
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = x[None, :]
    arr[..., 1] = y[:, None]
    return Image.fromarray(arr, "RGB")


def test_to_tensor_normalized_values_and_layout() -> None:
    img = Image.new("RGB", (5, 3), (255, 0, 128))
    t = to_tensor_normalized(img)
    assert t.shape == (3, 3, 5) and t.dtype == torch.float32
    expected = [
        (1.0 - CLIP_MEAN[0]) / CLIP_STD[0],
        (0.0 - CLIP_MEAN[1]) / CLIP_STD[1],
        (128 / 255 - CLIP_MEAN[2]) / CLIP_STD[2],
    ]
    assert torch.allclose(t[:, 1, 2], torch.tensor(expected), atol=1e-6)
    mean_img = Image.new("RGB", (4, 4), tuple(round(m * 255) for m in CLIP_MEAN))
    assert to_tensor_normalized(mean_img).abs().max() < 0.01
    grey = to_tensor_normalized(Image.new("L", (2, 2), 255))
    assert grey.shape == (3, 2, 2)


def test_center_crop_keeps_the_middle() -> None:
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:200] = (0, 255, 0)
    arr[:, 200:] = (0, 0, 255)
    out = center_crop(Image.fromarray(arr), 40)
    assert out.size == (40, 40)
    pixels = np.asarray(out)
    assert pixels[:, 2:-2, 1].min() > 240 and pixels[:, 2:-2, [0, 2]].max() < 15
    assert eval_transform(Image.fromarray(arr), 24).shape == (3, 24, 24)


def test_random_resized_crop_stays_in_scale_and_ratio_and_is_seeded() -> None:
    img = coordinates()
    w, h = img.size
    for seed in range(30):
        out = random_resized_crop(img, 32, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), rng=random.Random(seed))
        assert out.size == (32, 32)
        arr = np.asarray(out).astype(float)
        # Span of the crop in source pixels, from the coordinate colours at its edges.
        crop_w = (arr[:, -1, 0].mean() - arr[:, 0, 0].mean()) / 255 * (w - 1) * 32 / 31
        crop_h = (arr[-1, :, 1].mean() - arr[0, :, 1].mean()) / 255 * (h - 1) * 32 / 31
        area = crop_w * crop_h / (w * h)
        assert 0.45 < area < 1.05, (seed, area)
        assert 3 / 4 * 0.9 < crop_w / crop_h < 4 / 3 * 1.1, (seed, crop_w / crop_h)
    a = np.asarray(random_resized_crop(img, 32, rng=random.Random(5)))
    b = np.asarray(random_resized_crop(img, 32, rng=random.Random(5)))
    c = np.asarray(random_resized_crop(img, 32, rng=random.Random(6)))
    assert (a == b).all() and not (a == c).all()


def test_hflip_probability_and_train_transform_flip_switch() -> None:
    img = coordinates(64, 64)
    assert np.asarray(hflip(img, 1.0, random.Random(0)))[0, 0, 0] == 255
    assert np.asarray(hflip(img, 0.0, random.Random(0)))[0, 0, 0] == 0

    def left_to_right(t: torch.Tensor) -> bool:
        return bool(t[0, :, -1].mean() > t[0, :, 0].mean())

    unflipped = [left_to_right(train_transform(img, 16, random.Random(s), flip=False)) for s in range(20)]
    flipped = [left_to_right(train_transform(img, 16, random.Random(s), flip=True)) for s in range(20)]
    assert all(unflipped), "flip=False must never mirror (captions say left and right)"
    assert 3 <= flipped.count(False) <= 17
    plain = train_transform(img, 16, random.Random(0), augment=False)
    assert torch.equal(plain, eval_transform(img, 16))


def test_decode_rgb_converts_and_rejects_corrupt_data() -> None:
    buffer = io.BytesIO()
    Image.new("LA", (8, 6), (100, 255)).save(buffer, format="PNG")
    img = decode_rgb(buffer.getvalue())
    assert img.mode == "RGB" and img.size == (8, 6)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="JPEG")
    with pytest.raises(Exception):
        decode_rgb(buffer.getvalue()[:200])
    with pytest.raises(Exception):
        decode_rgb(b"not an image")


@pytest.mark.parametrize("w,h,size", [(49, 50, 32), (50, 49, 32), (97, 100, 64), (333, 334, 224)])
def test_center_crop_of_nearly_square_images_stays_inside_them(w: int, h: int, size: int) -> None:
    # out / (out / w) can round to a hair above w; the crop box must still start at >= 0
    out = center_crop(Image.new("RGB", (w, h), (10, 20, 30)), size)
    assert out.size == (size, size) and out.getpixel((0, 0)) == (10, 20, 30)


# ---------------------------------------------------------------------------------------------
# The training loader's path: bytes -> reduced decode -> crop box -> uint8 -> batch normalisation


def encoded(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def smooth(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth colour field (a bicubic upsampling of 4x3 random colours): no detail finer than
    DCT-domain downscaling keeps, so a reduced decode must match a full one closely."""
    coarse = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("w,h", [(256, 192), (1000, 700), (4000, 500), (90, 800), (7, 7), (640, 480)])
def test_smallest_crop_bounds_every_box_crop_box_draws(w: int, h: int) -> None:
    for scale, ratio in [((0.5, 1.0), (3 / 4, 4 / 3)), ((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (1.0, 1.0))]:
        min_w, min_h = smallest_crop(w, h, scale, ratio)
        for seed in range(300):
            left, top, right, bottom = crop_box(w, h, scale, ratio, random.Random(seed))
            assert 0 <= left < right <= w and 0 <= top < bottom <= h
            assert right - left >= min_w and bottom - top >= min_h, (w, h, scale, ratio, seed)


def test_random_resized_crop_is_its_crop_box_resized() -> None:
    img = coordinates(300, 200)
    for seed in range(5):
        box = crop_box(300, 200, (0.5, 1.0), (3 / 4, 4 / 3), random.Random(seed))
        expected = img.resize((32, 32), Image.Resampling.BICUBIC, box=box)
        ours = random_resized_crop(img, 32, rng=random.Random(seed))
        assert np.array_equal(np.asarray(ours), np.asarray(expected))


def test_dct_reduction_keeps_the_needed_pixels() -> None:
    assert dct_reduction(1024, 768, 300, 300) == 2  # 1/4 would be 256 x 192 < 300
    assert dct_reduction(1024, 768, 100, 90) == 8
    assert dct_reduction(256, 256, 300, 300) == 1  # upsampling: full size
    assert dct_reduction(1001, 1001, 125, 125) == 8 and dct_reduction(1001, 1001, 126, 126) == 4


def test_simplejpeg_and_pillow_decode_the_same_reduced_image() -> None:
    pytest.importorskip("simplejpeg")
    data = encoded(smooth(640, 480), quality=92)
    need = lambda w, h: (150, 100)  # noqa: E731 - 1/4 scale: 160 x 120
    fast = decode_image(data, need, decoder="simplejpeg")
    slow = decode_image(data, need, decoder="pillow")
    assert (fast.width, fast.height) == (slow.width, slow.height) == (640, 480)
    assert fast.pixels.shape == slow.pixels.shape == (120, 160, 3)
    assert fast.pixels.dtype == slow.pixels.dtype == np.uint8
    assert np.abs(fast.pixels.astype(int) - slow.pixels.astype(int)).max() <= 2
    full = decode_image(data, decoder="simplejpeg")
    assert full.pixels.shape == (480, 640, 3)
    assert np.array_equal(full.pixels, np.asarray(decode_rgb(data))), "full size: the same libjpeg output"


def test_decode_image_falls_back_to_pillow_and_rejects_what_pillow_rejects() -> None:
    png = encoded(Image.new("LA", (9, 5), (100, 255)), "PNG")
    for decoder in ("auto", "pillow"):
        out = decode_image(png, lambda w, h: (1, 1), decoder=decoder)
        assert out.pixels.shape == (5, 9, 3) and (out.width, out.height) == (9, 5)
        assert np.array_equal(out.pixels, np.asarray(decode_rgb(png)))
    cmyk = encoded(Image.new("CMYK", (16, 8), (10, 200, 30, 40)))
    assert np.array_equal(decode_image(cmyk).pixels, np.asarray(decode_rgb(cmyk))), "CMYK converted as Pillow does"
    grey = decode_image(encoded(Image.new("L", (8, 8), 77)))
    assert grey.pixels.shape == (8, 8, 3) and (grey.pixels == 77).all()
    truncated = encoded(smooth(64, 64))[:200]
    for bad in (truncated, b"\xff\xd8broken", b"not an image"):
        with pytest.raises(Exception):
            decode_image(bad)
    if simplejpeg is not None:
        with pytest.raises(ValueError):
            decode_image(png, decoder="simplejpeg")
    with pytest.raises(ValueError, match="decoder"):
        decode_image(png, decoder="turbo")


@pytest.mark.parametrize("w,h,size", [(64, 48, 32), (1024, 768, 64), (300, 900, 48)])
@pytest.mark.parametrize("decoder", ["auto", "pillow"])
def test_train_view_takes_the_crops_train_transform_takes(w: int, h: int, size: int, decoder: str) -> None:
    """Same seed, same boxes and flips as the Pillow transform of the full-size image; the reduced
    decode (1024x768 to 64 px decodes at 1/8, 300x900 to 48 at 1/4) and torch's bicubic keep the
    pixels within a few levels. The red/green coordinate gradient would show any misplaced box."""
    img = coordinates(w, h)
    data = encoded(img, quality=95, subsampling=0)
    view = TrainView(size, decoder=decoder)
    decoded = view.decode(data)
    expected_f = dct_reduction(w, h, *view.min_decoded_size(w, h))
    assert decoded.pixels.shape[:2] == (-(-h // expected_f), -(-w // expected_f))
    assert (w, h, size) != (1024, 768, 64) or expected_f == 8, "the reduced decode is exercised"
    for seed in range(12):
        ours = view(decoded, random.Random(seed))
        assert ours.shape == (3, size, size) and ours.dtype == torch.uint8
        theirs = train_transform(decode_rgb(data), size, random.Random(seed))
        ours_f = normalize_batch(ours[None])[0]
        diff = (ours_f - theirs).abs() * torch.tensor(CLIP_STD).view(3, 1, 1) * 255  # in 0..255 levels
        assert diff[:2].mean() < 1.5 and diff[:2].max() < 6, (seed, diff.mean(), diff.max())
    plain = TrainView(size, augment=False, decoder=decoder)
    centre = normalize_batch(plain(plain.decode(data), random.Random(0))[None])[0]
    diff = centre - eval_transform(decode_rgb(data), size)
    assert (diff.abs() * torch.tensor(CLIP_STD).view(3, 1, 1) * 255)[:2].mean() < 1.5


def test_train_view_flip_switch_and_generator_use() -> None:
    data = encoded(coordinates(64, 64), quality=95)
    on, off = TrainView(16), TrainView(16, flip=False)
    image = on.decode(data)

    def left_to_right(t: torch.Tensor) -> bool:
        return bool(t[0, :, -1].float().mean() > t[0, :, 0].float().mean())

    assert all(left_to_right(off(image, random.Random(s))) for s in range(20))
    assert 3 <= [left_to_right(on(image, random.Random(s))) for s in range(20)].count(False) <= 17
    a, b = random.Random(3), random.Random(3)
    on(image, a)
    train_transform(decode_rgb(data), 16, b)
    assert a.random() == b.random(), "the generator advances exactly as train_transform's does"


def test_normalize_batch_matches_to_tensor_normalized() -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)) for _ in range(3)]
    pixels = torch.stack([torch.from_numpy(np.asarray(i).copy()).permute(2, 0, 1) for i in images])
    out = normalize_batch(pixels)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 7, 5)
    assert torch.allclose(out, torch.stack([to_tensor_normalized(i) for i in images]), atol=1e-5)
    into = torch.empty(3, 3, 7, 5)
    assert normalize_batch(pixels, out=into) is into and torch.equal(into, out)


def test_resize_crop_matches_pillow_bicubic() -> None:
    arr = np.asarray(smooth(120, 90, seed=4)).copy()
    for box, size in [((10, 5, 100, 80), 48), ((0, 0, 120, 90), (64, 40)), ((3, 3, 23, 19), 40)]:
        ours = resize_crop(arr, box, size).permute(1, 2, 0).numpy().astype(int)
        theirs = Image.fromarray(arr).resize(_square(size), Image.Resampling.BICUBIC, box=box)
        theirs = np.asarray(theirs).astype(int)
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 2


def test_without_simplejpeg_pillow_decodes_at_the_same_reduced_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    from data_pipelines.image import transforms

    data = encoded(smooth(640, 480), quality=92)
    with_it = TrainView(64).decode(data)
    monkeypatch.setattr(transforms, "simplejpeg", None)
    without = TrainView(64).decode(data)
    assert without.pixels.shape == with_it.pixels.shape == (120, 160, 3), "1/4 scale either way"
    assert np.abs(without.pixels.astype(int) - with_it.pixels.astype(int)).max() <= 2
    with pytest.raises(ImportError, match="simplejpeg"):
        decode_image(data, decoder="simplejpeg")
