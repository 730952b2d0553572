"""Image transforms for CLIP-style training: Pillow and torch, plus simplejpeg when installed.

Every random choice comes from a `random.Random` the caller passes in, so a loader slot that
seeds its own generator gets the same crops on every run, whatever else uses the global RNG.

Two ways to the same views:

* `train_transform` / `eval_transform` take a decoded Pillow image and return one normalised
  float tensor (the evaluation loader and callers with images in hand use these);
* `TrainView` goes from compressed bytes to a uint8 crop, as the training loader does: JPEGs are
  decoded with libjpeg-turbo's DCT-domain scaling (simplejpeg, or Pillow's draft mode without it)
  at the smallest 1/2, 1/4 or 1/8 scale at which every crop the sampler can draw still has at
  least the output's pixels; the crop box is drawn in full-image coordinates with the same
  generator calls as `random_resized_crop`, mapped onto the reduced image and resized with
  torch's antialiased bicubic (Pillow's filter, vectorised); `normalize_batch` then converts a
  whole batch to float at once.

Both decode as `decode_rgb` (data_pipelines/image/decode.py), prepare-image-text's decode too:
upright by EXIF orientation, 16-bit grey scaled to 8 bits, transparency composited onto white.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipelines import limits
from data_pipelines.image.decode import (  # noqa: F401 - decode_rgb re-exported
    DRAFT_FORMATS,
    TooManyPixels,
    decode_opened,
    decode_rgb,
    image_orientation,
    jpeg_orientation,
    open_image,
    to_rgb,
    upright_array,
    upright_size,
)
from data_pipelines.image.geometry import RESAMPLE, Box, _square, center_box, center_crop  # noqa: F401 - re-exported

try:  # libjpeg-turbo without Pillow's per-image overhead; Pillow decodes when it is missing
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

# OpenAI CLIP's normalisation, which OpenCLIP and Hugging Face's CLIPImageProcessor also use.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def crop_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: random.Random | None = None,
) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) of a random resized crop of a width x height image.

    The same sampling as torchvision's RandomResizedCrop: ten tries at a random area (fraction
    `scale` of the image) and aspect ratio, then a centre crop with the aspect ratio clamped into
    `ratio`. It draws from `rng` only, and only depending on the image's size.
    """
    rng = random.Random() if rng is None else rng
    w, h = width, height
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
            return left, top, left + cw, top + ch
    cw, ch = _fallback_crop(w, h, ratio)
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def _fallback_crop(w: int, h: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """crop_box's centre crop when ten tries fail: the aspect ratio clamped into `ratio`."""
    in_ratio = w / h
    if in_ratio < ratio[0]:
        return w, int(round(w / ratio[0]))
    if in_ratio > ratio[1]:
        return int(round(h * ratio[1])), h
    return w, h


def smallest_crop(
    width: int, height: int, scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int]:
    """Lower bounds of the width and of the height of any box `crop_box` can return."""
    area = width * height * scale[0]
    # cw = round(sqrt(area * aspect)) >= floor(sqrt(...)); the 1e-9 absorbs exp(log(r)) < r.
    loop_w = math.floor(math.sqrt(area * ratio[0]) * (1 - 1e-9))
    loop_h = math.floor(math.sqrt(area / ratio[1]) * (1 - 1e-9))
    fall_w, fall_h = _fallback_crop(width, height, ratio)
    return max(1, min(loop_w, fall_w)), max(1, min(loop_h, fall_h))


def random_resized_crop(
    img: Image.Image,
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: random.Random | None = None,
) -> Image.Image:
    """A crop of random area (fraction `scale` of the image) and aspect ratio, resized to `size`
    (the box is `crop_box`'s)."""
    return img.resize(_square(size), RESAMPLE, box=crop_box(*img.size, scale, ratio, rng))


def hflip(img: Image.Image, p: float = 0.5, rng: random.Random | None = None) -> Image.Image:
    """Mirror left-right with probability `p`."""
    rng = random.Random() if rng is None else rng
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else img


def to_tensor_normalized(
    img: Image.Image, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> torch.Tensor:
    """A float32 tensor (3, H, W): pixels scaled to [0, 1], then (x - mean) / std per channel."""
    if img.mode != "RGB":
        img = to_rgb(img)  # 16-bit scaled, transparency on white (decode.py), not clipped
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    x = pixels.permute(2, 0, 1).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(m).div_(s)


def train_transform(
    img: Image.Image,
    size: int,
    rng: random.Random,
    augment: bool = True,
    flip: bool = True,
    scale: tuple[float, float] = (0.5, 1.0),
) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------
# From compressed bytes to uint8 crops (the training loader's path)


class Decoded(NamedTuple):
    """An image decoded for cropping, possibly at a reduced DCT scale."""

    pixels: np.ndarray  # (h, w, 3) uint8 RGB, upright; smaller than width x height when decoded reduced
    width: int  # the full upright image's size: crop boxes are drawn in these coordinates
    height: int


DECODERS: tuple[str, ...] = ("auto", "simplejpeg", "pillow")
# CMYK and YCCK JPEGs go to Pillow: its conversion to RGB is what every other path here uses.
_PILLOW_COLORSPACES = ("CMYK", "YCCK")


def dct_reduction(width: int, height: int, min_width: float, min_height: float) -> int:
    """The largest of 8, 4, 2, 1 by which libjpeg can shrink a width x height JPEG while decoding
    (its scaled size is ceil(side / f)) that keeps at least min_width x min_height pixels."""
    for f in (8, 4, 2):
        if width >= f * min_width and height >= f * min_height:
            return f
    return 1


MinSize = Callable[[int, int], tuple[float, float]]  # full (width, height) -> smallest decode needed


def decode_image(data: bytes, min_size: MinSize | None = None, *, decoder: str = "auto") -> Decoded:
    """Decode image bytes into upright 8-bit RGB pixels; raises on corrupt or truncated data.

    The same image as `decode_rgb` (decode.py: EXIF orientation applied, 16-bit scaled to 8 bits,
    transparency on white), possibly at a reduced scale; width and height are the upright ones.

    `min_size(width, height)` gives the smallest (width, height) the caller needs from an image of
    that full size; a JPEG is then decoded at the largest 1/2, 1/4 or 1/8 DCT scale that keeps it
    (`dct_reduction`). `decoder`: "simplejpeg" for JPEGs (an ImportError without it), "pillow",
    or "auto": simplejpeg where it is installed and the bytes are a JPEG it can convert, else Pillow.
    Under "auto" a JPEG simplejpeg refuses (it is strict about recoverable errors) is handed to
    Pillow, so exactly the images Pillow accepts are accepted. The simplejpeg path reads the EXIF
    orientation itself (`jpeg_orientation`, Pillow's reading where unsure) and transposes as
    Pillow does.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder != "pillow":
        if simplejpeg is None:
            if decoder == "simplejpeg":
                raise ImportError("decoder='simplejpeg' needs the simplejpeg package (pip install simplejpeg)")
        elif decoder == "simplejpeg" or simplejpeg.is_jpeg(data):
            try:
                return _decode_simplejpeg(data, min_size)
            except Exception:  # noqa: BLE001 - Pillow decides (and raises its own error)
                if decoder == "simplejpeg":
                    raise
    return _decode_pillow(data, min_size)


def _decode_simplejpeg(data: bytes, min_size: MinSize | None) -> Decoded:
    raw_h, raw_w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    cap = limits.current().max_image_pixels
    if raw_w * raw_h > cap:  # refused from the header, as the Pillow path does (--max-image-pixels)
        raise TooManyPixels(f"{raw_w}x{raw_h} = {raw_w * raw_h:,} pixels > {cap:,} (--max-image-pixels)")
    if colorspace in _PILLOW_COLORSPACES:
        raise ValueError(f"{colorspace} JPEG: decoded by Pillow")
    orientation = jpeg_orientation(data)
    if orientation is None:  # a header this reader does not follow: Pillow's reading
        orientation = image_orientation(open_image(data))
    width, height = upright_size(raw_w, raw_h, orientation)
    f = dct_reduction(width, height, *min_size(width, height)) if min_size is not None else 1
    if f == 1:
        pixels = simplejpeg.decode_jpeg(data, "RGB")
    else:  # the smallest libjpeg scale that is at least ceil(side / f): exactly 1/f
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_width=-(-raw_w // f), min_height=-(-raw_h // f))
    return Decoded(upright_array(pixels, orientation), width, height)


def _decode_pillow(data: bytes, min_size: MinSize | None) -> Decoded:
    img = open_image(data)
    orientation = image_orientation(img)
    width, height = upright_size(*img.size, orientation)
    draft = None
    if min_size is not None and img.format in DRAFT_FORMATS:
        f = dct_reduction(width, height, *min_size(width, height))
        if f > 1:
            # draft() picks the largest power of two <= side // requested: with side // f
            # requested that is exactly f, the same scale as the simplejpeg path.
            draft = (img.size[0] // f, img.size[1] // f)
    # decode.py's decode (EXIF orientation, 16-bit scaled, transparency on white), as prepare's
    # and evaluation's; np.array: a writable copy torch can wrap
    return Decoded(np.array(decode_opened(img, draft, orientation)), width, height)


_TORCH_UINT8_RESIZE: bool | None = None  # torch's uint8 antialiased bicubic (not in every build)


def _torch_resize_ok() -> bool:
    global _TORCH_UINT8_RESIZE
    if _TORCH_UINT8_RESIZE is None:
        try:
            F.interpolate(
                torch.zeros((1, 3, 4, 4), dtype=torch.uint8),
                size=(3, 3),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            )
            _TORCH_UINT8_RESIZE = True
        except (RuntimeError, NotImplementedError):  # pragma: no cover - older torch builds
            _TORCH_UINT8_RESIZE = False
    return _TORCH_UINT8_RESIZE


def resize_crop(pixels: np.ndarray, box: Box, size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 (3, H, W): the region `box` of (h, w, 3) uint8 `pixels`, resized to `size` (width,
    height) with antialiased bicubic.

    The box is rounded to whole pixels (at least one). torch's uint8 antialiased bicubic is
    Pillow's filter (Keys a = -0.5, support scaled when shrinking) in vectorised code: on the
    same box the two agree to within 2 of 255 and run about 4x apart. Pillow is the fallback.
    """
    out_w, out_h = _square(size)
    h, w = pixels.shape[:2]
    left = min(max(int(round(box[0])), 0), w - 1)
    top = min(max(int(round(box[1])), 0), h - 1)
    right = min(max(int(round(box[2])), left + 1), w)
    bottom = min(max(int(round(box[3])), top + 1), h)
    if not _torch_resize_ok():  # pragma: no cover - older torch builds
        img = Image.fromarray(pixels).resize((out_w, out_h), RESAMPLE, box=(left, top, right, bottom))
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[:, top:bottom, left:right]
    if (right - left, bottom - top) == (out_w, out_h):
        return x.contiguous()
    return F.interpolate(x.unsqueeze(0), size=(out_h, out_w), mode="bicubic", antialias=True, align_corners=False)[0]


@dataclass(frozen=True)
class TrainView:
    """The training view of an image from its compressed bytes, as `train_transform` gives it
    from a decoded image: a random resized crop (`crop_box`) and, unless `flip` is False, a
    random horizontal flip, or a centre crop when not augmenting; uint8 (3, H, W), for
    `normalize_batch`.

    `decode` decodes at the smallest DCT scale at which the smallest crop `crop_box` can draw
    (or the centre crop) still has `size` pixels; `__call__` draws the box in full-image
    coordinates with the same generator calls as `train_transform` (so a seed gives the same
    boxes and flips), maps it onto the decoded pixels and resizes.
    """

    size: int | tuple[int, int]
    augment: bool = True
    flip: bool = True
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    decoder: str = "auto"

    def min_decoded_size(self, width: int, height: int) -> tuple[float, float]:
        """The smallest decode (width, height) of a width x height image in which every crop this
        view can take still has at least `size` pixels. It exceeds the image when some crop is
        smaller than `size` (upsampled in any case): the image is then decoded at full size."""
        out_w, out_h = _square(self.size)
        if self.augment:
            crop_w, crop_h = smallest_crop(width, height, self.scale, self.ratio)
        else:
            left, top, right, bottom = center_box(width, height, self.size)
            crop_w, crop_h = right - left, bottom - top
        return out_w * width / crop_w, out_h * height / crop_h

    def decode(self, data: bytes) -> Decoded:
        return decode_image(data, self.min_decoded_size, decoder=self.decoder)

    def __call__(self, image: Decoded, rng: random.Random) -> torch.Tensor:
        if self.augment:
            box: Box = crop_box(image.width, image.height, self.scale, self.ratio, rng)
        else:
            box = center_box(image.width, image.height, self.size)
        h, w = image.pixels.shape[:2]
        sx, sy = w / image.width, h / image.height
        out = resize_crop(image.pixels, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), self.size)
        if self.augment and self.flip and rng.random() < 0.5:  # hflip(p=0.5)'s draw
            out = out.flip(-1)
        return out


def normalize_batch(
    pixels: torch.Tensor,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std per channel, as `to_tensor_normalized`
    per image (to within 1e-6), in one conversion, one multiply and one add over the whole batch,
    on the device the pixels are on; into `out` (float32, same shape) when given."""
    device = pixels.device
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    bias = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    if out is None:
        out = torch.empty(pixels.shape, dtype=torch.float32, device=device)
    # copy_ then float ops: torch.mul(uint8, float32) promotes element by element, 3x slower.
    return out.copy_(pixels).mul_(scale).add_(bias)
