"""The one decode from image bytes to 8-bit RGB, shared by every path that turns bytes into pixels:
prepare-image-text (`process.py`), the training loaders and the labelled-folder dataset
(`transforms.decode_image`, behind `TrainView`) and the evaluation loaders (`decode_rgb`).

Pillow and numpy only (prepare's worker processes never import torch). What it does, in order:

* decodes, JPEGs optionally at a reduced DCT scale (`draft`, Pillow's draft mode);
* converts to 8 bits per channel by scaling, never by clipping (`to_rgb`; a plain
  ``convert("RGB")`` clips 16-bit grey at 255, so a 0..65535 ramp came out 99% white):
  - ``I;16`` / ``I;16L`` / ``I;16B`` / ``I;16N`` (16-bit grey): value / 257, rounded (65535 -> 255);
  - ``I`` (32-bit integers: 16-bit PNGs in older Pillow, 16/32-bit TIFF, PGM): by the bit depth
    the values fit, 0..255 as they are, 0..65535 as 16 bits (/ 257), anything else (negative or
    wider) stretched from its minimum..maximum to 0..255;
  - ``F`` (32-bit floats): 0..1 times 255, 0..255 as they are, else stretched min..max;
    NaN counts as 0;
* composites transparency (RGBA, LA, PA, RGBa, La, P / L / RGB with a transparent colour) onto
  WHITE, as img2dataset does (a plain convert puts transparent areas on black);
* turns the picture upright by its EXIF orientation tag (as viewers, img2dataset and Hugging Face's
  ``load_image`` show it); an unreadable EXIF block counts as upright.

`jpeg_orientation` reads a JPEG's orientation without Pillow (microseconds), so the training
loader's simplejpeg path applies the same transposition (`upright_array`) as this Pillow path.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image

from data_pipelines import limits

WHITE = (255, 255, 255)
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transposition that shows the picture upright (ImageOps.exif_transpose's table)
TRANSPOSES: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPS_SIDES = (5, 6, 7, 8)  # orientations whose upright picture is the stored one turned by 90 degrees
DRAFT_FORMATS = ("JPEG", "MPO")  # Pillow formats whose decoder can shrink by 1/2, 1/4, 1/8 (draft mode)
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"


class TooManyPixels(ValueError):
    """An image whose header declares more pixels than `limits.current().max_image_pixels`
    (--max-image-pixels): refused before a single pixel is decoded."""

    reason = limits.TOO_MANY_PIXELS


def open_image(data: bytes) -> Image.Image:
    """Pillow's lazy open: the header only, nothing decoded yet. `TooManyPixels` for an image over
    the pixel cap (Pillow's DecompressionBombWarning is replaced by that check; its
    DecompressionBombError, at twice its own MAX_IMAGE_PIXELS, becomes TooManyPixels too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise TooManyPixels(str(exc)) from None
    check_pixels(img)
    return img


def check_pixels(img: Image.Image) -> None:
    """`TooManyPixels` when the opened (not yet decoded) image is over the pixel cap."""
    cap = limits.current().max_image_pixels
    width, height = img.size
    if width * height > cap:
        raise TooManyPixels(f"{width}x{height} = {width * height:,} pixels > {cap:,} (--max-image-pixels)")


def image_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image: 1 without one, or with an invalid or
    unreadable one (the pixels are fine; a broken EXIF block is no reason to lose the image).
    Decodes any but a JPEG (draft mode must come first): PNG keeps EXIF after the pixels, and a
    failed decode must raise here, not leave a half-loaded image behind."""
    if img.format not in DRAFT_FORMATS:
        img.load()
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - Pillow raises many kinds on malformed EXIF
        return 1
    return value if isinstance(value, int) and value in TRANSPOSES else 1


def upright_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """The (width, height) of a stored width x height picture once shown upright."""
    return (height, width) if orientation in SWAPS_SIDES else (width, height)


def upright(img: Image.Image, orientation: int) -> Image.Image:
    """The image turned upright for its EXIF orientation (unchanged for 1 or an invalid value)."""
    method = TRANSPOSES.get(orientation)
    return img if method is None else img.transpose(method)


def upright_array(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """`upright` of (h, w, 3) uint8 pixels; a writable copy when transposed."""
    method = TRANSPOSES.get(orientation)
    return pixels if method is None else np.array(Image.fromarray(pixels).transpose(method))


def _to_8bit(img: Image.Image) -> Image.Image:
    """An ``L`` (or ``LA``, with a transparent grey value) image of a 16-bit, 32-bit integer or
    float grey image, scaled as the module docstring says."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = (arr.astype(np.uint32) * 255 + 32767) // 65535  # round(v / 257)
    else:
        values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if img.mode == "F" and lo >= 0 and hi <= 1:
            out = np.rint(values * 255)
        elif lo >= 0 and hi <= 255:
            out = np.rint(values)
        elif img.mode == "I" and lo >= 0 and hi <= 65535:
            out = np.rint(values / 257)
        else:
            out = np.rint((values - lo) * (255 / (hi - lo))) if hi > lo else np.zeros_like(values)
    grey = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "L")
    transparent = img.info.get("transparency")
    if isinstance(transparent, int) and not isinstance(transparent, bool):  # a tRNS grey value
        alpha = Image.fromarray(np.where(arr == transparent, 0, 255).astype(np.uint8), "L")
        grey = Image.merge("LA", (grey, alpha))
    return grey


def _has_alpha(img: Image.Image) -> bool:
    try:
        return img.has_transparency_data
    except AttributeError:  # pragma: no cover - Pillow < 10.1
        return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image: high bit depths scaled to 8 bits, transparency composited onto white
    (orientation untouched: see `decode_opened`)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _HIGH_BIT_MODES:
        img = _to_8bit(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_opened(
    img: Image.Image, draft: tuple[int, int] | None = None, orientation: int | None = None
) -> Image.Image:
    """Decode an image from `open_image` into upright 8-bit RGB; raises on corrupt or truncated data.

    `draft` (width, height): a JPEG is decoded at the largest 1/2, 1/4 or 1/8 scale that keeps at
    least that many pixels in the stored (not upright) orientation; ignored for other formats.
    `orientation`: the image's EXIF orientation when the caller has read it already.
    """
    if draft is not None and img.format in DRAFT_FORMATS:
        img.draft("RGB", draft)
    if orientation is None:
        orientation = image_orientation(img)
    # open() only reads the header: load() decodes now, so corrupt data fails here and not later
    # in a transform, where the error would name no sample.
    img.load()
    return upright(to_rgb(img), orientation)


def decode_rgb(data: bytes, draft: tuple[int, int] | None = None) -> Image.Image:
    """Image bytes -> upright 8-bit RGB Pillow image (see the module docstring); raises on corrupt
    or truncated data. The one decode of prepare, training and evaluation."""
    return decode_opened(open_image(data), draft)


# ---------------------------------------------------------------------------------------------
# A JPEG's orientation without Pillow


def jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation tag's value that Pillow reads from JPEG bytes (1 without one), from the
    markers before the first scan; None when unsure (ask Pillow): not a well-formed marker run,
    several EXIF segments (Pillow joins them), an XMP ``tiff:Orientation`` without an EXIF one
    (Pillow falls back on it), or an EXIF block this reader does not follow."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, exif, xmp = 2, None, False
    while True:
        if i + 4 > n or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: Pillow reads no further
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # no length field
            if marker in (0xD8, 0xD9):
                return None
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            return None
        if marker == 0xE1:
            segment = data[i + 4 : i + 2 + length]
            if segment.startswith(b"Exif\0\0"):
                if exif is not None:
                    return None
                exif = segment[6:]
            elif segment.startswith(_XMP) and b"tiff:Orientation" in segment:
                xmp = True
        i += 2 + length
    if exif is not None:
        try:
            value = _ifd0_orientation(exif)
        except (ValueError, struct.error):
            return None
        if value is not None:
            return value
    return None if xmp else 1


def _ifd0_orientation(tiff: bytes) -> int | None:
    """The orientation tag of a TIFF block's first IFD; None without one; ValueError or
    struct.error when the block is malformed or the tag is not one SHORT or LONG."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        raise ValueError("not a TIFF header")
    magic, offset = struct.unpack_from(order + "HI", tiff, 2)
    if magic != 42:
        raise ValueError("not a classic TIFF header")
    (count,) = struct.unpack_from(order + "H", tiff, offset)
    found = None
    for k in range(count):
        entry = offset + 2 + 12 * k
        tag, kind, items = struct.unpack_from(order + "HHI", tiff, entry)
        if tag != ORIENTATION_TAG:
            continue
        if items != 1 or kind not in (3, 4):
            raise ValueError("unusual orientation entry")
        found = struct.unpack_from(order + ("H" if kind == 3 else "I"), tiff, entry + 8)[0]
    return found
