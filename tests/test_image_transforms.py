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
    center_crop,
    decode_rgb,
    eval_transform,
    hflip,
    random_resized_crop,
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
    expected = [(1.0 - CLIP_MEAN[0]) / CLIP_STD[0], (0.0 - CLIP_MEAN[1]) / CLIP_STD[1],
                (128 / 255 - CLIP_MEAN[2]) / CLIP_STD[2]]
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
