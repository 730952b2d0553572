"""Shards in img2dataset's exact output layout, made locally (no network), for the tests of raw sources.

img2dataset writes, per shard: ``{shard:05d}.tar`` with ``{key}.jpg`` (or png/webp), ``{key}.txt``
(the caption) and ``{key}.json`` (url, caption, key, status, error_message, width, height,
original_width, original_height, exif, sha256), successful samples only; ``{shard:05d}.parquet``
with a row per URL, failures included; ``{shard:05d}_stats.json`` (count, successes,
failed_to_download, failed_to_resize, duration, start_time, end_time, status_dict). Keys are the
shard id and the index within the shard, zero-padded (``shard_id * 10**4 + i`` as 9 digits here).
Images are coloured squares whose caption names the colour, so a tiny CLIP can learn something.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import webdataset as wds
from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 180),
    "orange": (240, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}


def _image(colour: str, size: int, rng: random.Random, fmt: str) -> bytes:
    img = Image.new("RGB", (size, size), tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour]))
    buf = io.BytesIO()
    img.save(
        buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], **({"quality": 95} if fmt == "jpg" else {})
    )
    return buf.getvalue()


def write_img2dataset(
    folder: Path,
    shards: int = 4,
    per_shard: int = 40,
    size: int = 40,
    seed: int = 0,
    failures: int = 2,
    corrupt: int = 1,
    caption_key: str = "txt",
    formats=("jpg",),
    sidecars: bool = True,
) -> dict:
    """Write ``shards`` shards into ``folder``; returns {"keys": [...], "samples": n_in_tars,
    "images": {key: image bytes}} (the bytes decide the hold-out, `data_pipelines.sources.held_out`).

    Each shard lists ``per_shard`` URLs: ``failures`` of them failed to download (in the parquet and
    stats only) and ``corrupt`` are in the tar with undecodable image bytes (a real crawl has them).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    keys: list[str] = []
    images: dict[str, bytes] = {}
    total = 0
    for shard in range(shards):
        rows = []
        successes = 0
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as tar:
            for i in range(per_shard):
                key = f"{shard * 10**4 + i:09d}"
                colour = rng.choice(list(COLOURS))
                caption = f"a photo of a {colour} square"
                url = f"http://images.example/{key}.jpg"
                if i < failures:
                    rows.append(
                        {
                            "url": url,
                            "caption": caption,
                            "key": key,
                            "status": "failed_to_download",
                            "error_message": "HTTP Error 404: Not Found",
                            "width": None,
                            "height": None,
                            "original_width": None,
                            "original_height": None,
                            "exif": None,
                            "sha256": None,
                        }
                    )
                    continue
                fmt = formats[i % len(formats)]
                data = _image(colour, size, rng, fmt)
                if i - failures < corrupt:
                    data = data[:40] + key.encode() + b"\x00not an image" * 8  # each its own bytes
                meta = {
                    "url": url,
                    "caption": caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": size,
                    "height": size,
                    "original_width": size * 4,
                    "original_height": size * 4,
                    "exif": "{}",
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                rows.append(meta)
                tar.write({"__key__": key, fmt: data, caption_key: caption, "json": json.dumps(meta).encode()})
                keys.append(key)
                images[key] = data
                successes += 1
        total += successes
        if sidecars:
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
            except ImportError:  # pragma: no cover - pyarrow is a dependency of the project
                pass
            (folder / f"{shard:05d}_stats.json").write_text(
                json.dumps(
                    {
                        "count": per_shard,
                        "successes": successes,
                        "failed_to_download": failures,
                        "failed_to_resize": 0,
                        "duration": 1.0,
                        "start_time": 0.0,
                        "end_time": 1.0,
                        "status_dict": {"success": successes, "HTTP Error 404: Not Found": failures},
                    },
                    indent=4,
                )
            )
    return {"keys": keys, "samples": total, "images": images}
