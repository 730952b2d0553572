#!/usr/bin/env python
"""Image-text throughput: the CLIP training loader against a bare Pillow loop, and
prepare-image-text with 1 and 2 workers.

Makes (once) a folder of ``--count`` photo-sized JPEGs (``--source-size``, smooth random colour
fields with noise, which compress like photographs rather than like flat shapes) with sidecar
captions, then:

  prepare   ``python -m data_pipelines.image.prepare SRC --image-size 256 --workers N`` as a
            subprocess, N = 1 and 2; images/s = samples written / wall seconds
  bare      for every train JPEG of the prepared shards: webdataset read + Image.open + convert
            RGB + resize to --train-size (the baseline: no crop, no tensor, no captions)
  decode    the same read and decode without the resize: Pillow (``bare decode``) and the
            training loader's decoder (``TrainView.decode``: simplejpeg where installed)
  loader_wN image_text_train_loader(num_workers=N) as the trainer uses it: random resized crop +
            flip into a uint8 batch + caption tokenisation (the trainer normalises the uint8
            pixels on its device, in the model); images/s in total and per worker
  float     the same at the largest N with normalize=True: the batch normalised to float32 in
            the loader (in the consuming process when N > 0), as the stream did before

Rows run round-robin ``--repeats`` times; reported are medians and the median of per-repeat
ratios against the baseline of the same repeat.

Then, once, where the time goes, in CPU milliseconds per image (``time.process_time``, one
process): the loader's stages (tar read, decode, crop + resize, batch normalisation, caption
tokenisation) over the train split, and prepare-image-text's per-image stages (read, sha256,
decode in draft mode, pixel digest, centre crop, JPEG encode; the same calls as
``process_image``) over --stage-images sources, with its fixed per-run costs (interpreter start
and imports; training, saving and reloading the caption tokenizer) from a fresh subprocess.

    python benchmarks/bench_image_loader.py --json image.json
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipelines.image.loader import (  # noqa: E402
    ImageTextShards,
    decode_train_sample,
    image_text_train_loader,
    tokenize_captions,
)
from data_pipelines.image.transforms import TrainView, normalize_batch, simplejpeg  # noqa: E402
from data_pipelines.loader import read_samples  # noqa: E402

WORDS = "a photo of red green blue small large dog cat car tree house river mountain city night day".split()


def make_sources(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, (h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:06d}.jpg", quality=90)
        (folder / f"{i:06d}.txt").write_text(" ".join(rng.choice(WORDS, size=8)))


def run_prepare(src: Path, out: Path, workers: int) -> tuple[float, int]:
    cmd = [
        sys.executable,
        "-m",
        "data_pipelines.image.prepare",
        str(src),
        "--output",
        str(out),
        "--image-size",
        "256",
        "--vocab-size",
        "300",
        "--workers",
        str(workers),
        "--no-progress",
        "--overwrite",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return wall, sum(s["samples"] for s in manifest["splits"].values())


def bare(data: ImageTextShards, size: int) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for sample in read_samples(data.shards("train")):
        img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        img.resize((size, size), Image.Resampling.BICUBIC)
        n += 1
    return time.perf_counter() - start, n


def bare_decode(data: ImageTextShards) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for sample in read_samples(data.shards("train")):
        Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        n += 1
    return time.perf_counter() - start, n


def view_decode(data: ImageTextShards, size: int) -> tuple[float, int]:
    view = TrainView(size)
    start, n = time.perf_counter(), 0
    for sample in read_samples(data.shards("train")):
        view.decode(sample["jpg"])
        n += 1
    return time.perf_counter() - start, n


def loader(
    data: ImageTextShards, tokenizer, size: int, workers: int, batch: int, images: int, normalize: bool = False
) -> tuple[float, int]:
    it = image_text_train_loader(
        data, "train", batch, tokenizer, 32, size, seed=0, shuffle_buffer=256, num_workers=workers, normalize=normalize
    )
    next(it)  # worker start-up and buffer fill are not throughput
    start = time.perf_counter()
    n = 0
    for b in itertools.islice(it, max(1, images // batch)):
        n += b["pixel_values"].shape[0]
    return time.perf_counter() - start, n


class Clock:
    """CPU seconds (this process) summed per stage."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.last = time.process_time()

    def lap(self, stage: str) -> None:
        now = time.process_time()
        self.total[stage] = self.total.get(stage, 0.0) + now - self.last
        self.last = now


def loader_stages(data: ImageTextShards, tokenizer, size: int, batch: int) -> dict[str, float]:
    """CPU ms per image of each stage of the training loader's path, run by hand in one process."""
    import random

    view, rng = TrainView(size), random.Random(0)
    clock, n = Clock(), 0
    it = iter(read_samples(data.shards("train")))
    while True:
        clock.last = time.process_time()
        raw = list(itertools.islice(it, batch))
        if not raw:
            break
        clock.lap("tar read (webdataset)")
        items = [decode_train_sample(s, view) for s in raw]
        clock.lap("decode")
        pixels = torch.empty((len(items), 3, size, size), dtype=torch.uint8)
        for row, (image, _) in enumerate(items):
            pixels[row] = view(image, rng)
        clock.lap("crop + resize + flip (uint8)")
        normalize_batch(pixels)
        clock.lap("normalise batch to float32")
        tokenize_captions(tokenizer, [c for _, c in items], 32)
        clock.lap("tokenise captions (per batch)")
        n += len(items)
    return {k: v / n * 1e3 for k, v in clock.total.items()}


def prepare_stages(src: Path, count: int) -> dict[str, float]:
    """CPU ms per image of process_image's stages, the same calls in the same order."""
    import hashlib

    from data_pipelines.image.geometry import center_crop
    from data_pipelines.image.process import ImageOptions, _rgb, process_image

    paths = sorted(src.glob("*.jpg"))[:count]
    opts = ImageOptions(image_size=256)
    clock = Clock()
    for path in paths:
        clock.last = time.process_time()
        data = path.read_bytes()
        clock.lap("read file")
        hashlib.sha256(data).digest()
        clock.lap("sha256 of the bytes")
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (opts.image_size, opts.image_size))
        img.load()
        img.getexif()
        img = _rgb(img)
        clock.lap("decode (draft mode) + exif")
        hashlib.blake2b(img.tobytes(), digest_size=16, person=b"pixels").digest()
        clock.lap("pixel digest (duplicates)")
        out = center_crop(img, opts.image_size)
        clock.lap("centre crop + resize")
        out.save(io.BytesIO(), format="JPEG", quality=opts.jpeg_quality)
        clock.lap("JPEG encode")
    stages = {k: v / len(paths) * 1e3 for k, v in clock.total.items()}
    start = time.process_time()
    for path in paths:
        process_image(None, str(path), opts)
    stages["process_image (all of the above)"] = (time.process_time() - start) / len(paths) * 1e3
    return stages


FIXED = """
import sys, time
sys.path.insert(0, {repo!r})
import data_pipelines.image.prepare  # what `python -m data_pipelines.image.prepare` imports
start = time.process_time()
from pathlib import Path
from data_pipelines import cli
from data_pipelines.text.tokenizer import train_bpe_tokenizer
captions = [p.read_text() for p in sorted(Path({src!r}).glob("*.txt"))]
cli.save_tokenizer_copy(train_bpe_tokenizer(captions, 300), Path({out!r}))
print(start, time.process_time() - start)
"""


def prepare_fixed(src: Path, out: Path) -> dict[str, float]:
    """CPU seconds per prepare run that do not depend on the images: interpreter start plus
    imports, and the caption tokenizer (its transformers imports, training, save and reload)."""
    proc = subprocess.run(
        [sys.executable, "-c", FIXED.format(repo=str(REPO), src=str(src), out=str(out))],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    imports, tokenizer = map(float, proc.stdout.split()[-2:])
    return {"start + imports": imports, "caption tokenizer": tokenizer}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=800, help="source images to make (default 800)")
    p.add_argument(
        "--source-size",
        type=int,
        nargs=2,
        default=(1024, 768),
        metavar=("W", "H"),
        help="source JPEG size (default 1024 768, so draft-mode decoding matters)",
    )
    p.add_argument("--train-size", type=int, default=224, help="model input side (default 224)")
    p.add_argument("--batch", type=int, default=32, help="loader batch size (default 32)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader num_workers rows (default 0 1 2)")
    p.add_argument("--repeats", type=int, default=3, help="round-robin repeats (default 3)")
    p.add_argument("--no-prepare", action="store_true", help="skip the prepare-image-text rows")
    p.add_argument(
        "--stage-images",
        type=int,
        default=200,
        help="source images timed per prepare stage (default 200; 0 skips every stage table)",
    )
    p.add_argument("--work-dir", type=Path, help="keep sources and shards here (reused); default a temp dir")
    p.add_argument("--json", type=Path, help="write every measurement here")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-image-"))
    src, shards = work / "src", work / "shards"
    if not (src / f"{args.count - 1:06d}.jpg").exists():
        make_sources(src, args.count, tuple(args.source_size))
    rows: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        if not args.no_prepare:
            rates = {}
            for w in (1, 2):
                wall, n = run_prepare(src, shards, w)
                rates[w] = n / wall
                rows.setdefault(f"prepare workers={w}", []).append(rates[w])
            ratios.setdefault("prepare workers=2", []).append(rates[2] / rates[1])
            ratios.setdefault("prepare workers=1", []).append(1.0)
        elif not (shards / "manifest.json").exists():
            run_prepare(src, shards, 1)
        data = ImageTextShards(shards)
        tok = AutoTokenizer.from_pretrained(shards / "tokenizer")
        wall, n = bare(data, args.train_size)
        base = n / wall
        rows.setdefault("bare decode+resize", []).append(base)
        ratios.setdefault("bare decode+resize", []).append(1.0)
        for name, fn in (
            ("bare decode (Pillow, no resize)", bare_decode),
            (
                f"loader's decode ({'simplejpeg' if simplejpeg else 'Pillow'})",
                lambda d: view_decode(d, args.train_size),
            ),
        ):
            wall, n = fn(data)
            rows.setdefault(name, []).append(n / wall)
            ratios.setdefault(name, []).append(n / wall / base)
        for w in args.workers:
            wall, n = loader(data, tok, args.train_size, w, args.batch, data.num_samples("train"))
            rate = n / wall
            rows.setdefault(f"loader workers={w}", []).append(rate)
            ratios.setdefault(f"loader workers={w}", []).append(rate / base)
            if w < 2:
                continue
            per = rate / w
            rows.setdefault(f"loader workers={w} per worker", []).append(per)
            ratios.setdefault(f"loader workers={w} per worker", []).append(per / base)
        w = max(args.workers)
        wall, n = loader(data, tok, args.train_size, w, args.batch, data.num_samples("train"), normalize=True)
        rows.setdefault(f"loader workers={w}, float32 out", []).append(n / wall)
        ratios.setdefault(f"loader workers={w}, float32 out", []).append(n / wall / base)
        print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr)

    print(f"{'row':<38}{'images/s':>12}{'vs baseline':>14}")
    for name, values in rows.items():
        print(f"{name:<38}{statistics.median(values):>12,.0f}{statistics.median(ratios[name]):>13.2f}x")
    print("baseline: 'prepare workers=1' for the prepare rows, 'bare decode+resize' for the loader rows")
    stages: dict[str, dict[str, float]] = {}
    if args.stage_images:
        stages["loader, CPU ms per image"] = loader_stages(data, tok, args.train_size, args.batch)
        stages["prepare, CPU ms per image"] = prepare_stages(src, args.stage_images)
        stages["prepare, CPU s per run"] = prepare_fixed(src, work / "tokenizer-timing")
        for title, values in stages.items():
            print(f"\n{title}")
            for name, value in values.items():
                print(f"  {name:<40}{value:>8.3f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "rows": rows,
                    "ratios": ratios,
                    "stages": stages,
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "simplejpeg": getattr(simplejpeg, "__version__", None),
                    "cpus": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
