"""A labelled image folder (ImageNet's layout) as a data source: classes, splits, batches.

    ROOT/<class>/*.jpg                        one folder per class; val is a stable hash of each file
    ROOT/{train,val[,test]}/<class>/*.jpg     the splits as given (ImageNet's own layout)
    ROOT/classnames.{txt,json}                optional: readable names (and prompt templates)

Labels are the class folders' positions in sorted order (the torchvision / ImageNet convention,
so ``classnames.txt`` files written for ImageNet's sorted synsets apply as they are). The
class-name file may be given elsewhere (``--classnames``, ``data.classnames``); its forms:

* text, one name per line in sorted-folder order (OpenAI's ``classnames.txt`` for ImageNet), or
  ``FOLDER NAME`` per line (ImageNet's ``LOC_synset_mapping.txt``);
* JSON: a list (sorted-folder order), an object ``{folder: name}``, or an object
  ``{"classnames": list or object, "templates": [...]}`` (the form of ``make-synthetic-image-text``'s
  classes.json), whose templates replace `DEFAULT_TEMPLATES` for zero-shot prompts.

Without one, a folder's name with underscores as spaces is its class name.

The training stream reads one global sequence: epoch e is a permutation of the train files drawn
from (seed, e), epochs concatenated; each optimizer step takes the next micro x world positions,
rank r the r-th run of micro. Its position is one number (global samples consumed), so a run
resumes exactly, on any number of ranks and with any micro-batch or worker count, without
replaying anything. Augmentation draws from a generator seeded by (seed, position).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from data_pipelines.batch import Batch
from data_pipelines.eval_split import eval_subset
from data_pipelines.image.transforms import TrainView, normalize_batch
from data_pipelines.loader import SkipLog, stable_seed
from data_pipelines.splits import split_hash

logger = logging.getLogger(__name__)

KIND = "image-folder"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLIT_DIRS = ("train", "val", "test")
CLASSNAME_FILES = ("classnames.json", "classnames.txt")
# OpenAI's selection of 7 of its 80 ImageNet prompts (the CLIP repository's prompt-engineering notebook).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


class FolderError(ValueError):
    """A labelled folder or class-name file that cannot be used; the message names the path."""


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def read_classnames(path: str | Path, folders: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """(a readable name per folder, in ``folders``' order; prompt templates or None) from a
    class-name file of one of the forms in the module docstring."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FolderError(f"class-name file {path}: cannot be read ({e})") from None
    templates = None
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise FolderError(f"class-name file {path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if isinstance(doc, dict) and "classnames" in doc:
            templates = doc.get("templates")
            if templates is not None and (
                not isinstance(templates, list)
                or not templates
                or not all(isinstance(t, str) and "{}" in t for t in templates)
            ):
                raise FolderError(f"class-name file {path}: 'templates' must be a non-empty list of strings with {{}}")
            doc = doc["classnames"]
        if isinstance(doc, dict):
            names = _mapped(path, doc, folders)
        elif isinstance(doc, list) and all(isinstance(n, str) for n in doc):
            names = _positional(path, doc, folders)
        else:
            raise FolderError(
                f"class-name file {path}: expected a list of names, an object folder -> name, or "
                '{"classnames": ..., "templates": [...]}'
            )
        return names, templates
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    known = set(folders)
    if lines and all(line.split(maxsplit=1)[0] in known and len(line.split(maxsplit=1)) == 2 for _, line in lines):
        return _mapped(path, dict(line.split(maxsplit=1) for _, line in lines), folders), None
    return _positional(path, [line for _, line in lines], folders), None


def _mapped(path: Path, mapping: dict, folders: Sequence[str]) -> list[str]:
    missing = [f for f in folders if f not in mapping]
    if missing:
        raise FolderError(f"class-name file {path}: no name for {len(missing)} class folder(s), e.g. {missing[:3]}")
    bad = [k for k in folders if not isinstance(mapping[k], str) or not mapping[k].strip()]
    if bad:
        raise FolderError(f"class-name file {path}: the name of {bad[0]!r} is not a non-empty string")
    return [mapping[f].strip() for f in folders]


def _positional(path: Path, names: list[str], folders: Sequence[str]) -> list[str]:
    if len(names) != len(folders):
        raise FolderError(
            f"class-name file {path}: {len(names)} names for {len(folders)} class folders (one name "
            "per class folder in sorted order, or 'FOLDER NAME' lines)"
        )
    return [n.strip() for n in names]


class ImageFolder:
    """The classes and the files of each split of a labelled image folder.

    ``val_fraction`` of the files of a folder without split subfolders go to val by a stable hash
    of their path relative to the root (``class/file``), so adding files never moves others.
    """

    KIND = KIND
    chat = False
    seq_len: int | None = None
    fetch = None  # local files
    sources = None

    def __init__(
        self, root: str | Path, classnames: str | Path | None = None, val_fraction: float = 0.1, seed: int = 0
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FolderError(f"image folder {self.root}: not a directory")
        self.val_fraction, self.seed = val_fraction, seed
        split_dirs = [d for d in SPLIT_DIRS if (self.root / d).is_dir()]
        # ROOT/train/<class>/... is the split layout unless "train" is itself a class of images
        self.split_layout = bool(split_dirs) and not any(
            _is_image(p) for d in split_dirs for p in (self.root / d).iterdir()
        )
        tops = [self.root / d for d in split_dirs] if self.split_layout else [self.root]
        self.folders = sorted({d.name for top in tops for d in _class_dirs(top)})
        if not self.folders:
            raise FolderError(
                f"image folder {self.root}: no class folders (expected ROOT/<class>/*.jpg or ROOT/train/<class>/*.jpg)"
            )
        if classnames is None:
            classnames = next((self.root / n for n in CLASSNAME_FILES if (self.root / n).is_file()), None)
        self.classnames_file = Path(classnames) if classnames is not None else None
        if self.classnames_file is not None:
            self.classnames, templates = read_classnames(self.classnames_file, self.folders)
        else:
            self.classnames, templates = [f.replace("_", " ") for f in self.folders], None
        self.templates = list(templates or DEFAULT_TEMPLATES)
        self._files: dict[str, list[tuple[str, int]]] = {}

    @property
    def splits(self) -> list[str]:
        if self.split_layout:
            return [d for d in SPLIT_DIRS if (self.root / d).is_dir()] + ["all"]
        return ["train", "val", "all"]

    def classes(self) -> dict[str, Any]:
        """Class names and prompt templates, in the form of a prepared dataset's classes.json."""
        return {"classnames": list(self.classnames), "templates": list(self.templates)}

    def files(self, split: str) -> list[tuple[str, int]]:
        """(path, label) of every image of a split ("all": every split), in a fixed order."""
        if split not in self.splits:
            raise FolderError(f"image folder {self.root}: no split {split!r} (have {self.splits})")
        if split not in self._files:
            self._files[split] = self._scan(split)
        return self._files[split]

    def num_samples(self, split: str) -> int:
        return len(self.files(split))

    def origin(self, split: str) -> str:
        return f"the {split!r} images of {self.root}"

    def to_json(self) -> None:
        return None

    def _scan(self, split: str) -> list[tuple[str, int]]:
        label = {f: i for i, f in enumerate(self.folders)}
        if self.split_layout:
            tops = (
                [self.root / d for d in SPLIT_DIRS if (self.root / d).is_dir()]
                if split == "all"
                else [self.root / split]
            )
        else:
            tops = [self.root]
        out = []
        for top in tops:
            for d in _class_dirs(top):
                for p in sorted(p for p in d.rglob("*") if _is_image(p)):
                    if not self.split_layout and split != "all":
                        held = split_hash(p.relative_to(self.root).as_posix().encode(), self.seed) < self.val_fraction
                        if held != (split == "val"):
                            continue
                    out.append((str(p), label[d.name]))
        return out


# ---------------------------------------------------------------------------------------------
# Decoding


class _Images(torch.utils.data.Dataset):
    """Item ``(position, index)`` -> (uint8 crop or None, label, position): the file at ``index``
    viewed with the generator of global ``position`` (None when it cannot be decoded, logged)."""

    def __init__(self, files: list[tuple[str, int]], view: TrainView, seed: int, skips: SkipLog):
        self.files, self.view, self.seed, self.skips = files, view, seed, skips
        self.read = 0  # decoded by this process (each DataLoader worker counts its own)

    def __getitem__(self, item: tuple[int, int]):
        position, index = item
        path, label = self.files[index]
        try:
            with open(path, "rb") as f:
                pixels = self.view(
                    self.view.decode(f.read()), random.Random(stable_seed(self.seed, "augment", position))
                )
        except Exception as exc:  # noqa: BLE001 - a bad file is bad data, never a reason to stop
            self.skips.add("undecodable", f"{path}: {type(exc).__name__}: {exc}")
            return None, label, position
        self.read += 1
        return pixels, label, position

    def __len__(self) -> int:
        return len(self.files)


def _collate(items: list, images: _Images) -> Batch:
    good = [(p, y, pos) for p, y, pos in items if p is not None]
    pixels = torch.stack([p for p, _, _ in good]) if good else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    info = torch.utils.data.get_worker_info()
    # counters travel with the batch: DataLoader workers are other processes
    return Batch(
        {"pixel_values": pixels, "labels": torch.tensor([y for _, y, _ in good], dtype=torch.long)},
        {
            "positions": [pos for _, _, pos in good],
            "stats": {
                "slot": info.id if info is not None else 0,
                "read": images.read,
                "skipped": dict(images.skips.counts),
            },
        },
    )


@dataclass
class _Order:
    """The global sequence: position -> file index (epoch = position // n, permuted by (seed, epoch))."""

    n: int
    seed: int

    def __post_init__(self):
        self._epoch, self._perm = -1, []

    def __call__(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            self._perm = list(range(self.n))
            random.Random(stable_seed(self.seed, "epoch", epoch)).shuffle(self._perm)
            self._epoch = epoch
        return self._perm[position % self.n]


class ClassCaptions:
    """A caption per image from its class: a prompt template drawn by (seed, position) filled
    with the class name, tokenized (``input_ids``, ``attention_mask``) for CLIP's text tower."""

    def __init__(self, classes: dict[str, Any], tokenizer: Any, context_length: int, seed: int = 0):
        self.names, self.templates = classes["classnames"], classes["templates"]
        self.tokenizer, self.context_length, self.seed = tokenizer, context_length, seed

    def __call__(self, labels: Sequence[int], positions: Sequence[int]) -> dict[str, torch.Tensor]:
        from data_pipelines.image.loader import tokenize_captions

        texts = [
            self.templates[random.Random(stable_seed(self.seed, "caption", p)).randrange(len(self.templates))].format(
                self.names[y]
            )
            for y, p in zip(labels, positions)
        ]
        return tokenize_captions(self.tokenizer, texts, self.context_length)


class FolderTrainStream:
    """One rank's endless training batches ``{"pixel_values", "labels"}`` from a folder's split,
    with the interface of `data_pipelines.loader.TrainStream` (``state_dict``, ``load_state_dict``
    before the first batch, ``counts``, ``micro_batches``). An undecodable file is logged, counted
    and replaced by a decodable row of its batch, repeated, so every batch keeps ``batch_size`` rows
    (a contrastive loss gathers equal rows from every rank, and a classifier's batch does not
    shrink); a batch with no decodable image stops the stream, naming the rank. With ``captions``
    (`ClassCaptions`) batches also carry each image's class caption."""

    def __init__(
        self,
        folder: ImageFolder,
        split: str,
        batch_size: int,
        image_size: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        flip: bool = True,
        captions: ClassCaptions | None = None,
    ):
        self.files = folder.files(split)
        if not self.files:
            raise FolderError(f"image folder {folder.root}: split {split!r} has no images")
        self.batch_size, self.rank, self.world_size, self.num_workers = batch_size, rank, world_size, num_workers
        self.seed, self.captions = seed, captions
        self.skips = SkipLog(f"rank {rank}: ")
        self.images = _Images(self.files, TrainView(image_size, augment=augment, flip=flip), seed, self.skips)
        self.offset = 0  # global position at which this layout's segment started
        self.micro_batches = 0
        self._slots: dict[int, dict] = {}
        self.source, self.handed_out = folder.root.name, 0
        self._it: Iterator[dict] | None = None

    def coverage(self) -> list[str]:
        """Nothing to say at start: the folder's files are divided by position, not by shard."""
        return []

    def layout(self) -> dict[str, int]:
        return {"world": self.world_size, "workers": self.num_workers, "micro": self.batch_size}

    def position(self) -> int:
        """Global samples consumed by every rank together."""
        return self.offset + self.micro_batches * self.batch_size * self.world_size

    def state_dict(self) -> dict:
        return {
            **self.layout(),
            "micro_batches": self.micro_batches,
            "offset": self.offset,
            "position": self.position(),
        }

    def load_state_dict(self, state: dict) -> None:
        if self._it is not None:
            raise RuntimeError("FolderTrainStream.load_state_dict: the stream has already started")
        if "position" not in state:
            raise ValueError("the saved data position is not a labelled-folder stream's (no 'position')")
        self.offset, self.micro_batches = int(state["position"]), 0

    def counts(self) -> tuple[int, dict[str, int]]:
        """(images decoded, skipped images by reason) of this rank, over its DataLoader workers."""
        read, skipped = 0, Counter()
        for stats in self._slots.values():
            read += stats["read"]
            skipped.update(stats["skipped"])
        return read, dict(skipped)

    def samples_by_source(self) -> dict[str, int]:
        """Images this rank handed out, under the folder's name (one source)."""
        return {self.source: self.handed_out}

    def _batches(self) -> Iterator[list[tuple[int, int]]]:
        order, step = _Order(len(self.files), self.seed), self.batch_size * self.world_size
        start = self.offset + self.rank * self.batch_size
        while True:
            yield [(p, order(p)) for p in range(start, start + self.batch_size)]
            start += step

    def _start(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return (_collate([self.images[i] for i in positions], self.images) for positions in self._batches())
        return iter(
            torch.utils.data.DataLoader(
                self.images,
                batch_sampler=self._batches(),
                num_workers=self.num_workers,
                prefetch_factor=4,
                collate_fn=partial(_collate, images=self.images),
            )
        )

    def __iter__(self) -> FolderTrainStream:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        positions = batch.meta["positions"]
        n = len(positions)
        if n == 0:
            raise FolderError(
                f"rank {self.rank}: no image of a whole batch could be decoded (first: {self.skips.examples[:1]})"
            )
        if n < self.batch_size:  # keep batch_size rows: decodable rows repeated in place of the others
            fill = [i % n for i in range(self.batch_size)]
            batch["pixel_values"], batch["labels"] = batch["pixel_values"][fill], batch["labels"][fill]
            positions = [positions[i] for i in fill]
            batch.meta["positions"] = positions
        if self.captions is not None:
            batch.update(self.captions(batch["labels"].tolist(), positions))
        batch["pixel_values"] = normalize_batch(batch["pixel_values"])
        self.micro_batches += 1
        self.handed_out += len(batch["labels"])
        self._slots[batch.meta["stats"]["slot"]] = batch.meta["stats"]
        return batch


def folder_eval_batches(
    folder: ImageFolder,
    split: str,
    batch_size: int,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
    stats: dict[str, int] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The split's images (a fixed subset of ``max_samples`` spread over it, `eval_subset`), image i on rank
    i % world_size, centre-cropped: batches of ``pixel_values``, ``labels``, ``weight`` (0 for
    padding and undecodable rows) and ``index``. Every rank yields the same number of batches of
    the same sizes, as ZeRO-3's collective forwards need; padding repeats a decodable image."""
    files = eval_subset(folder.files(split), max_samples)  # spread over the split, not its first classes
    if not files:
        raise FolderError(f"image folder {folder.root}: split {split!r} has no images")
    skips = SkipLog(f"eval {split}: ")
    images = _Images(files, TrainView(image_size, augment=False), 0, skips)
    mine = list(range(rank, len(files), world_size))
    per_rank = -(-len(files) // world_size)
    template = None
    for start in range(0, per_rank, batch_size):
        rows = []
        for j in range(start, min(start + batch_size, per_rank)):
            i = mine[j] if j < len(mine) else -1
            pixels, label = (None, -1) if i < 0 else images[(i, i)][:2]
            if template is None and pixels is None:
                template = _first_decodable(images)
            template = template if template is not None else pixels
            rows.append((pixels, label, i))
        batch_pixels = torch.stack([p if p is not None else template for p, _, _ in rows])
        yield {
            "pixel_values": normalize_batch(batch_pixels),
            "labels": torch.tensor([y for _, y, _ in rows], dtype=torch.long),
            "weight": torch.tensor([float(p is not None) for p, _, _ in rows]),
            "index": torch.tensor([i if p is not None else -1 for p, _, i in rows], dtype=torch.long),
        }
    if stats is not None:
        for reason, count in skips.counts.items():
            stats[reason] = stats.get(reason, 0) + count


def _first_decodable(images: _Images) -> torch.Tensor:
    quiet = _Images(images.files, images.view, 0, SkipLog())
    for i in range(len(quiet)):
        pixels = quiet[(i, i)][0]
        if pixels is not None:
            return pixels
    raise FolderError(f"no image of {len(images.files)} could be decoded (first: {images.files[0][0]})")
