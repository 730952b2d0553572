"""Image transforms for CLIP-style training, in Pillow and torch only.

Every random choice comes from a `random.Random` the caller passes in, so a loader slot that
seeds its own generator gets the same crops on every run, whatever else uses the global RNG.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP's normalisation, which OpenCLIP and Hugging Face's CLIPImageProcessor also use.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

RESAMPLE = Image.Resampling.BICUBIC


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully into an RGB image; raises on corrupt or truncated data."""
    img = Image.open(io.BytesIO(data))
    # open() only reads the header: load() decodes now, so corrupt data fails here and not
    # later in a transform, where the error would name no sample.
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def _square(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def center_crop(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Scale so the image covers `size` (width, height), then cut out the centre.

    Crops in source coordinates and resizes once (`resize(box=...)`), which is both faster
    and sharper than resizing the whole image and cropping afterwards.
    """
    out_w, out_h = _square(size)
    w, h = img.size
    scale = max(out_w / w, out_h / h)
    # min(): out / (out / w) can come back a hair above w in floating point, and Pillow refuses a
    # box that starts before the image (a 49x50 image to 32 px did).
    crop_w, crop_h = min(out_w / scale, w), min(out_h / scale, h)
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    return img.resize((out_w, out_h), RESAMPLE, box=(left, top, left + crop_w, top + crop_h))


def random_resized_crop(img: Image.Image, size: int | tuple[int, int], scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), rng: random.Random | None = None) -> Image.Image:
    """A crop of random area (fraction `scale` of the image) and aspect ratio, resized to `size`.

    The same sampling as torchvision's RandomResizedCrop: ten tries, then a centre crop with
    the aspect ratio clamped into `ratio`.
    """
    rng = random.Random() if rng is None else rng
    w, h = img.size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = rng.randint(0, h - ch)
            left = rng.randint(0, w - cw)
            return img.resize(_square(size), RESAMPLE, box=(left, top, left + cw, top + ch))
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.resize(_square(size), RESAMPLE, box=(left, top, left + cw, top + ch))


def hflip(img: Image.Image, p: float = 0.5, rng: random.Random | None = None) -> Image.Image:
    """Mirror left-right with probability `p`."""
    rng = random.Random() if rng is None else rng
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else img


def to_tensor_normalized(img: Image.Image, mean: tuple[float, ...] = CLIP_MEAN,
                         std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """A float32 tensor (3, H, W): pixels scaled to [0, 1], then (x - mean) / std per channel."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    x = pixels.permute(2, 0, 1).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(m).div_(s)


def train_transform(img: Image.Image, size: int, rng: random.Random, augment: bool = True, flip: bool = True,
                    scale: tuple[float, float] = (0.5, 1.0)) -> torch.Tensor:
    """Training view of an image: a random resized crop (and a random flip unless `flip` is
    False, as for captions that say "left" or "right"), or a centre crop when not augmenting."""
    if not augment:
        return to_tensor_normalized(center_crop(img, size))
    out = random_resized_crop(img, size, scale=scale, rng=rng)
    if flip:
        out = hflip(out, 0.5, rng)
    return to_tensor_normalized(out)


def eval_transform(img: Image.Image, size: int) -> torch.Tensor:
    """Evaluation view: a centre crop, normalised."""
    return to_tensor_normalized(center_crop(img, size))
