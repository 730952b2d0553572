"""clip_benchmark's WebDataset layout for zero-shot classification and retrieval sets:

    DIR/test/0.tar, 1.tar, ...   per sample KEY.jpg (or .png / .webp), KEY.cls (the class index, text)
                                 and, for retrieval, KEY.txt (the caption)
    DIR/classnames.txt           one class name per line, line i is class i
    DIR/zeroshot_classification_templates.txt   one prompt per line, {c} where the class name goes

(LAION's clip_benchmark reads these sets with ``--dataset wds/NAME --dataset_root DIR``.)
`write_layout` turns a split of a prepared image-text set into it; `read_layout` reads one back.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _samples(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of a WebDataset tar, in the tar's order (members of a key are adjacent)."""
    key, members = None, {}
    with tarfile.open(tar_path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = Path(info.name).name
            base, _, ext = name.partition(".")
            if base != key and key is not None:
                yield key, members
                members = {}
            key = base
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def write_layout(
    prepared: Path, split: str, out: Path, classnames: list[str], templates: list[str], per_shard: int = 500
) -> int:
    """The labelled samples of ``prepared/split`` (a prepare-image-text / make-synthetic-image-text
    output: jpg, txt and json with "label" per sample) as a clip_benchmark set in ``out``, in the
    split's order. Templates with "{}" are written with clip_benchmark's "{c}". Returns the samples written."""
    import json

    (out / "test").mkdir(parents=True, exist_ok=True)
    (out / CLASSNAMES).write_text("".join(f"{c}\n" for c in classnames))
    (out / TEMPLATES).write_text("".join(t.replace("{}", "{c}") + "\n" for t in templates))
    written, tar = 0, None
    try:
        for shard in sorted((prepared / split).glob("*.tar")):
            for key, members in _samples(shard):
                label = json.loads(members.get("json", b"{}")).get("label")
                image = next((ext for ext in IMAGE_EXTS if ext in members), None)
                if not isinstance(label, int) or image is None:
                    continue
                if written % per_shard == 0:
                    if tar is not None:
                        tar.close()
                    tar = tarfile.open(out / "test" / f"{written // per_shard}.tar", "w")
                parts = {image: members[image], "cls": str(label).encode()}
                if "txt" in members:
                    parts["txt"] = members["txt"]
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 0  # a fixed mtime: the same set gives the same bytes
                    tar.addfile(info, io.BytesIO(data))
                written += 1
    finally:
        if tar is not None:
            tar.close()
    return written


def read_layout(root: Path) -> tuple[list[str], list[str], Iterator[tuple[str, bytes, int, str | None]]]:
    """(class names, templates with "{}", samples (key, image bytes, class, caption or None) in shard order)."""
    root = Path(root)
    missing = [n for n in (CLASSNAMES, TEMPLATES) if not (root / n).is_file()]
    shards = sorted((root / "test").glob("*.tar"), key=lambda p: (len(p.name), p.name))  # 2.tar before 10.tar
    if missing or not shards:
        raise FileNotFoundError(
            f"{root}: not a clip_benchmark set (needs test/*.tar, {CLASSNAMES}, {TEMPLATES}); missing: "
            + ", ".join(missing + ([] if shards else ["test/*.tar"]))
        )
    classnames = [line.strip() for line in (root / CLASSNAMES).read_text().splitlines() if line.strip()]
    templates = [line.strip().replace("{c}", "{}") for line in (root / TEMPLATES).read_text().splitlines()]

    def samples() -> Iterator[tuple[str, bytes, int, str | None]]:
        for shard in shards:
            for key, members in _samples(shard):
                image = next((members[e] for e in IMAGE_EXTS if e in members), None)
                if image is None or "cls" not in members:
                    raise ValueError(f"{shard}: sample {key} lacks an image or a cls member")
                caption = members["txt"].decode("utf-8") if "txt" in members else None
                yield key, image, int(members["cls"].decode().strip()), caption

    return classnames, [t for t in templates if t], samples()
