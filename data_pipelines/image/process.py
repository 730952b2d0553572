"""One image of prepare-image-text: bytes in, checked and re-encoded JPEG out. Runs in worker
processes.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image

from data_pipelines import limits
from data_pipelines.image.decode import (
    WHITE,
    TooManyPixels,
    decode_opened,
    image_orientation,
    open_image,
    to_rgb,
    upright_size,
)
from data_pipelines.image.geometry import RESAMPLE, center_crop


@dataclass(frozen=True)
class ImageOptions:
    """What every worker needs to turn source bytes into an output JPEG."""

    image_size: int = 256
    resize_mode: str = "center_crop"
    jpeg_quality: int = 90
    min_image_size: int = 16


class Processed(NamedTuple):
    reason: str | None  # None: accepted
    detail: str = ""
    jpeg: bytes = b""
    sha256: bytes = b""  # of the source bytes: the split key and the first duplicate check
    pixels: bytes = b""  # digest of the decoded pixels: the second duplicate check
    width: int = 0
    height: int = 0
    resized_width: int = 0
    resized_height: int = 0


_rgb = to_rgb  # the old name (benchmarks/bench_image_loader.py imports it)
RESIZE_MODES: tuple[str, ...] = ("center_crop", "keep_ratio", "keep_ratio_largest", "border", "no")


def _scaled(img: Image.Image, scale: float) -> Image.Image:
    w, h = img.size
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img if size == img.size else img.resize(size, RESAMPLE)


def resize(img: Image.Image, size: int, mode: str) -> Image.Image:
    """img2dataset's resize modes, with its names and meanings:

    * center_crop: the shorter side to `size`, then the centre `size` x `size` square;
    * keep_ratio: the shorter side to `size`, nothing cropped or padded (not square);
    * keep_ratio_largest: the longer side to `size`, nothing cropped or padded;
    * border: the longer side to `size`, centred on a white `size` x `size` square;
    * no: as it is.

    Manifests written before this matched img2dataset call its `border` "keep_ratio" (with black
    bars): they hold square letterboxed images, which the loaders read as any other image.
    """
    w, h = img.size
    if mode == "center_crop":
        return center_crop(img, size)
    if mode == "keep_ratio":
        return _scaled(img, size / min(w, h))
    if mode in ("keep_ratio_largest", "border"):
        fitted = _scaled(img, size / max(w, h))
        if mode == "keep_ratio_largest":
            return fitted
        canvas = Image.new("RGB", (size, size), WHITE)
        canvas.paste(fitted, ((size - fitted.size[0]) // 2, (size - fitted.size[1]) // 2))
        return canvas
    if mode == "no":
        return img
    raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")


def process_image(data: bytes | None, path: str | None, opts: ImageOptions) -> Processed:
    """Read (if given a path), decode, check, resize and re-encode one image."""
    if data is None:
        assert path is not None
        try:  # a regular file only (a FIFO or device is never opened), up to --max-member-bytes
            data = limits.read_regular(path, limits.current().max_member_bytes)
        except limits.TooLarge as exc:
            return Processed(exc.reason, str(exc))
        except FileNotFoundError:
            return Processed("missing_image", f"no such file: {path}")
        except OSError as exc:
            return Processed("missing_image", f"cannot read {path}: {exc}")
    sha = hashlib.sha256(data).digest()
    try:
        img = open_image(data)
        width, height = img.size
        if min(width, height) < opts.min_image_size:
            return Processed(
                "too_small",
                f"{width}x{height} < {opts.min_image_size} px on the shorter side",
                sha256=sha,
                width=width,
                height=height,
            )
        orientation = image_orientation(img)
        # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the target size.
        # A 4000 px photo then costs a fraction of a full decode.
        draft = None if opts.resize_mode == "no" else (opts.image_size, opts.image_size)
        # decode.py's decode, the training and evaluation loaders' too: stored upright by EXIF
        # orientation, as viewers show it; 16-bit grey scaled to 8 bits; transparency on white
        img = decode_opened(img, draft, orientation)
        width, height = upright_size(width, height, orientation)
    except TooManyPixels as exc:
        return Processed(limits.TOO_MANY_PIXELS, str(exc), sha256=sha)
    except Exception as exc:  # noqa: BLE001 - any failure inside a decoder means corrupt data
        return Processed("undecodable", f"{type(exc).__name__}: {exc}", sha256=sha)
    pixels = hashlib.blake2b(img.tobytes(), digest_size=16, person=b"pixels").digest()
    out = resize(img, opts.image_size, opts.resize_mode)
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=opts.jpeg_quality)
    return Processed(None, "", buffer.getvalue(), sha, pixels, width, height, out.size[0], out.size[1])


def process_chunk(task: tuple[ImageOptions, list[tuple[bytes | None, str | None]]]) -> list[Processed]:
    opts, images = task
    return [process_image(data, path, opts) for data, path in images]
