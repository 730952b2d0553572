"""make-synthetic-image-text: a procedural image-caption set for demos, tests and zero-shot checks.

    make-synthetic-image-text --output data/shapes --count 4000 --image-size 64

Each image is one shape (circle, square, triangle, star, cross or ring) of one colour, small or
large, on the left, right, top, bottom or centre of a plain, noisy or gradient light background,
captioned like "a small red triangle on the left". The class of an image is "<colour> <shape>".
A deterministic ~15% of the classes are held out of train: they appear only in val and test,
so zero-shot accuracy on them measures generalisation to unseen combinations of seen words.

The output has the layout and manifest of prepare-image-text (kind "image-text"), plus a BPE
caption tokenizer trained on the train captions in DIR/tokenizer and DIR/classes.json with
class names, prompt templates and the held-out classes.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import cli
from data_pipelines.image.prepare import (
    CLASSES_NAME,
    KIND,
    MANIFEST_VERSION,
    SplitWriters,
    clear_output,
    format_summary,
)
from data_pipelines.splits import assign_split
from data_pipelines.text.tokenizer import MIN_VOCAB_SIZE, TokenizerError, train_bpe_tokenizer

PROG = "make-synthetic-image-text"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 150, 50),
    "blue": (35, 75, 215),
    "yellow": (235, 195, 0),
    "purple": (125, 45, 170),
    "orange": (240, 125, 15),
    "pink": (235, 105, 175),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
# Shape extent (diameter of its bounding circle) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.24, "large": 0.44}
# Shape centre as fractions of the image side; the margins keep a large shape inside.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
WHERE: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "a picture of a {size} {colour} {shape} {where}",
    "a {colour} {shape}, {size}, {where}",
    "{where}, a {size} {colour} {shape}",
)
# Zero-shot prompts: "{}" is a class name such as "red triangle".
CLASS_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} shape.",
    "a drawing of a {}.",
    "a picture of a {}.",
    "a {}.",
)
PLAIN_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (250, 250, 250),
    (228, 228, 228),
    (246, 238, 220),
    (222, 233, 246),
    (224, 242, 224),
    (245, 228, 236),
)
BACKGROUND_KINDS: tuple[tuple[str, float], ...] = (("plain", 0.6), ("noise", 0.2), ("gradient", 0.2))
HELD_OUT_FRACTION = 0.15
TEXTURES = 16  # precomputed noise and gradient backgrounds, reused (drawing them per image is slow)
SUPERSAMPLE = 2  # shapes are drawn at 2x and reduced: anti-aliased edges for free
JPEG_QUALITY = 95


def classnames() -> list[str]:
    """Class i is colour i // len(SHAPES) with shape i % len(SHAPES)."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def class_index(colour: str, shape: str) -> int:
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def held_out_classes(seed: int) -> list[int]:
    """~15% of the classes, chosen from the seed so that no two share a colour and no shape is
    held out more than twice: every colour and every shape still appears in train."""
    rng = random.Random(f"held-out/{seed}")
    count = round(HELD_OUT_FRACTION * len(COLOURS) * len(SHAPES))
    colours = list(COLOURS)
    shapes = list(SHAPES)
    rng.shuffle(colours)
    rng.shuffle(shapes)
    return sorted(class_index(colours[i], shapes[i % len(shapes)]) for i in range(min(count, len(colours))))


def classes_document(seed: int) -> dict[str, Any]:
    return {
        "classnames": classnames(),
        "templates": list(CLASS_TEMPLATES),
        "held_out": held_out_classes(seed),
        "attributes": {
            "colours": list(COLOURS),
            "shapes": list(SHAPES),
            "sizes": list(SIZES),
            "positions": list(POSITIONS),
        },
        "label_rule": "label = colours.index(colour) * len(shapes) + shapes.index(shape)",
    }


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig(cli.CommandConfig):
    count: int
    image_size: int = 64
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    vocab_size: int = 512
    samples_per_shard: int = 500
    benchmark: Path | None = None

    def problems(self) -> list[str]:
        found: list[str] = []
        if self.count < 1:
            found.append("--count must be >= 1")
        if self.image_size < 16:
            found.append("--image-size must be >= 16")
        if self.vocab_size < MIN_VOCAB_SIZE:
            found.append(f"--vocab-size must be >= {MIN_VOCAB_SIZE}")
        return found + super().problems()


# ---------------------------------------------------------------------------------------------
# Drawing


def _backgrounds(size: int, seed: int) -> dict[str, list[Image.Image]]:
    rng = np.random.default_rng(np.random.SeedSequence([seed & (2**63 - 1), 7]))
    noise, gradient = [], []
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    for _ in range(TEXTURES):
        base = rng.integers(200, 246, size=3)
        pixels = base + rng.normal(0.0, 14.0, size=(size, size, 3))
        noise.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"))
        a, b = rng.integers(195, 256, size=(2, 3))
        line = a[None, :] * (1 - ramp[:, None]) + b[None, :] * ramp[:, None]  # (size, 3)
        grid = np.broadcast_to(line[:, None, :], (size, size, 3))
        if rng.random() < 0.5:
            grid = grid.transpose(1, 0, 2)
        gradient.append(Image.fromarray(np.ascontiguousarray(grid).astype(np.uint8), "RGB"))
    return {"noise": noise, "gradient": gradient}


def _star(cx: float, cy: float, r: float, points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        radius = r if k % 2 == 0 else r * inner
        angle = -math.pi / 2 + k * math.pi / points
        out.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return out


def draw_shape_mask(size: int, shape: str, cx: float, cy: float, r: float) -> Image.Image:
    """An anti-aliased 'L' mask of one shape centred at (cx, cy) with bounding radius r (pixels)."""
    s = SUPERSAMPLE
    mask = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = cx * s, cy * s, r * s
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "square":
        h = r * 0.8
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif shape == "triangle":
        draw.polygon(
            [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)],
            fill=255,
        )
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=255)
    elif shape == "cross":
        w = r * 0.33
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask.reduce(s)


def _choose_background(rng: random.Random) -> str:
    x = rng.random()
    for kind, p in BACKGROUND_KINDS:
        if x < p:
            return kind
        x -= p
    return BACKGROUND_KINDS[-1][0]


def render(
    size: int,
    colour: str,
    shape: str,
    size_name: str,
    position: str,
    background: str,
    rng: random.Random,
    textures: dict[str, list[Image.Image]],
) -> Image.Image:
    if background == "plain":
        img = Image.new("RGB", (size, size), rng.choice(PLAIN_BACKGROUNDS))
    else:
        img = rng.choice(textures[background]).copy()
    fx, fy = POSITIONS[position]
    jitter = 0.04 * size
    cx = fx * size + rng.uniform(-jitter, jitter)
    cy = fy * size + rng.uniform(-jitter, jitter)
    r = SIZES[size_name] * size / 2 * rng.uniform(0.9, 1.1)
    img.paste(COLOURS[colour], None, draw_shape_mask(size, shape, cx, cy, r))
    return img


def caption_for(template: str, colour: str, shape: str, size_name: str, position: str) -> str:
    return template.format(size=size_name, colour=colour, shape=shape, where=WHERE[position])


# ---------------------------------------------------------------------------------------------
# The command


def generate(config: SyntheticConfig, out: TextIO | None = None, err: TextIO | None = None) -> dict[str, Any]:
    """Write the synthetic dataset described by `config`; return the manifest written."""
    console = cli.start_run(PROG, config, out, err)
    clear_output(config.output, config.overwrite)

    classes = classes_document(config.seed)
    held_out = set(classes["held_out"])
    names = classnames()
    train_classes = [i for i in range(len(names)) if i not in held_out]
    textures = _backgrounds(config.image_size, config.seed)
    rng = random.Random(config.seed)
    writers = SplitWriters(config.output, config.samples_per_shard)
    train_captions: list[str] = []
    size = config.image_size
    try:
        for i in console.bar(range(config.count), unit="img", desc="drawing"):
            split = assign_split(f"synthetic-{i}".encode(), config.val_fraction, config.test_fraction, config.seed)
            # Held-out classes never reach train; val and test draw from every class.
            label = rng.choice(train_classes) if split == "train" else rng.randrange(len(names))
            colour, shape = names[label].split(" ")
            size_name = rng.choice(list(SIZES))
            position = rng.choice(list(POSITIONS))
            background = _choose_background(rng)
            caption = caption_for(rng.choice(CAPTION_TEMPLATES), colour, shape, size_name, position)
            img = render(size, colour, shape, size_name, position, background, rng, textures)
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=JPEG_QUALITY)
            meta = {
                "key": f"{i:08d}",
                "source": "synthetic",
                "width": size,
                "height": size,
                "resized_width": size,
                "resized_height": size,
                "label": label,
                "colour": colour,
                "shape": shape,
                "size": size_name,
                "position": position,
                "background": background,
                "held_out": label in held_out,
            }
            writers.write(split, buffer.getvalue(), caption, meta)
            if split == "train":
                train_captions.append(caption)
    finally:
        writers.close()
    if not train_captions:
        raise cli.UsageError(f"--count {config.count} left no train samples to train the caption tokenizer on")

    tokenizer = cli.save_tokenizer_copy(train_bpe_tokenizer(train_captions, config.vocab_size), config.output)
    (config.output / CLASSES_NAME).write_text(json.dumps(classes, indent=2) + "\n", encoding="utf-8")
    manifest = {
        "kind": KIND,
        "version": MANIFEST_VERSION,
        "created_by": PROG,
        "image_size": size,
        "resize_mode": "no",
        "jpeg_quality": JPEG_QUALITY,
        **config.split_manifest(),
        "count": config.count,
        "inputs": [],
        "splits": writers.to_manifest(),
        "rejected": {"total": 0, "by_reason": {}, "examples": []},
        "tokenizer": cli.tokenizer_manifest(tokenizer, None),
        "classes": CLASSES_NAME,
    }
    if config.benchmark is not None:
        # the test split (val when there is none) as a clip_benchmark set: pretrain-eval --benchmark reads it
        from data_pipelines.image.benchmark_layout import write_layout

        split = "test" if writers.writers["test"].samples else "val"
        n = write_layout(config.output, split, config.benchmark, classes["classnames"], classes["templates"])
        manifest["benchmark"] = {"path": str(config.benchmark), "split": split, "samples": n}
    return console.finish(config.output, manifest, format_summary)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.command_parser(
        PROG,
        "Draw a procedural image-caption set (coloured shapes) in prepared-shard form, "
        "with class names for zero-shot evaluation and some colour-shape classes held out "
        "of train.",
    )
    cli.add_output_flag(parser)
    parser.add_argument("--count", required=True, type=int, metavar="N", help="number of images")
    parser.add_argument("--image-size", type=int, metavar="PX", default=64, help="image side in pixels")
    parser.add_argument(
        "--seed",
        type=int,
        metavar="N",
        default=0,
        help="seed of everything: drawings, captions, splits and held-out classes",
    )
    cli.add_fraction_flags(parser, 0.1, "fraction of images in {split}")
    parser.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        default=512,
        help="size of the BPE caption tokenizer trained on the train captions",
    )
    cli.add_shard_flag(parser, 500)
    parser.add_argument(
        "--benchmark",
        type=Path,
        metavar="DIR",
        default=None,
        help="also write the test split (val without one) in clip_benchmark's WebDataset layout to DIR "
        "(test/*.tar with jpg, cls and txt per sample, classnames.txt, zeroshot_classification_templates.txt), "
        "for pretrain-eval --benchmark DIR and clip_benchmark's --dataset wds/...",
    )
    cli.add_overwrite_flags(parser, "replace the dataset in a non-empty --output", "hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.run_main(PROG, build_parser(), argv, SyntheticConfig, generate, (TokenizerError,))


if __name__ == "__main__":
    sys.exit(main())
