"""One image of prepare-image-text: bytes in, checked and re-encoded JPEG out. Runs in worker
processes.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageOps

from data_pipelines.image.geometry import center_crop


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


def _rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (a plain convert would turn it black)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _fit(img: Image.Image, size: int) -> Image.Image:
    """Fit inside size x size keeping the aspect ratio, centred on a black square."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = img.resize((nw, nh), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def process_image(data: bytes | None, path: str | None, opts: ImageOptions) -> Processed:
    """Read (if given a path), decode, check, resize and re-encode one image."""
    if data is None:
        assert path is not None
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return Processed("missing_image", f"no such file: {path}")
        except OSError as exc:
            return Processed("missing_image", f"cannot read {path}: {exc}")
    sha = hashlib.sha256(data).digest()
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if min(width, height) < opts.min_image_size:
            return Processed(
                "too_small",
                f"{width}x{height} < {opts.min_image_size} px on the shorter side",
                sha256=sha,
                width=width,
                height=height,
            )
        if opts.resize_mode != "no":
            # JPEG only (a no-op for other formats): let libjpeg decode at 1/2, 1/4 or 1/8 scale,
            # never below the target size. A 4000 px photo then costs a fraction of a full decode.
            img.draft("RGB", (opts.image_size, opts.image_size))
        img.load()
        orientation = img.getexif().get(0x0112, 1)
        if orientation != 1:  # EXIF orientation: store the picture upright, as viewers show it
            img = ImageOps.exif_transpose(img)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
        img = _rgb(img)
    except Exception as exc:  # noqa: BLE001 - any failure inside a decoder means corrupt data
        return Processed("undecodable", f"{type(exc).__name__}: {exc}", sha256=sha)
    pixels = hashlib.blake2b(img.tobytes(), digest_size=16, person=b"pixels").digest()
    if opts.resize_mode == "center_crop":
        out = center_crop(img, opts.image_size)
    elif opts.resize_mode == "keep_ratio":
        out = _fit(img, opts.image_size)
    else:
        out = img
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=opts.jpeg_quality)
    return Processed(None, "", buffer.getvalue(), sha, pixels, width, height, out.size[0], out.size[1])


def process_chunk(task: tuple[ImageOptions, list[tuple[bytes | None, str | None]]]) -> list[Processed]:
    opts, images = task
    return [process_image(data, path, opts) for data, path in images]
