"""Centre-crop geometry in Pillow alone, without torch: `prepare-image-text` crops with it in
worker processes that never import torch, and the training transforms (`transforms.py`) build
on it."""

from __future__ import annotations

from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC


def _square(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


Box = tuple[float, float, float, float]  # left, top, right, bottom


def center_box(width: int, height: int, size: int | tuple[int, int]) -> Box:
    """The centre region of a width x height image that scales to cover `size` (width, height)."""
    out_w, out_h = _square(size)
    scale = max(out_w / width, out_h / height)
    # min(): out / (out / w) can come back a hair above w in floating point, and Pillow refuses a
    # box that starts before the image (a 49x50 image to 32 px did).
    crop_w, crop_h = min(out_w / scale, width), min(out_h / scale, height)
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return left, top, left + crop_w, top + crop_h


def center_crop(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Scale so the image covers `size` (width, height), then cut out the centre.

    Crops in source coordinates and resizes once (`resize(box=...)`), which is both faster
    and sharper than resizing the whole image and cropping afterwards.
    """
    return img.resize(_square(size), RESAMPLE, box=center_box(*img.size, size))
