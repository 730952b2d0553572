"""Streaming loaders over prepared image-text shards: the counterpart of `data_pipelines.loader`.

Training streams are `EpochStream`s like the text stream (the same division among ranks and workers,
reshuffling, resume and re-division after a change of world size); they shuffle the raw samples
(compressed JPEG bytes are cheap to hold in the buffer), then decode, augment and tokenize.
Augmentation draws from a generator seeded by (seed, slot, batch), so a stream is reproducible. A
training image is decoded at the smallest DCT scale its crops allow (simplejpeg, Pillow without it;
see `TrainView`), cropped and resized as uint8, and each batch becomes one float tensor in a single
normalisation (written straight into shared memory inside DataLoader workers, so it is not copied
there again on its way to the main process).

A sample that fails to decode is logged (naming its shard and key), counted by reason in a
`SkipLog` and skipped; nothing sleeps (webdataset's `warn_and_continue` sleeps 0.5 s per error).
Training batches carry the counts in `_stats`, as text batches do, so they reach the trainer
from DataLoader worker processes.

Evaluation reads a split once, in order, sample i on rank i % world_size, and gives every rank
the same number of batches; padding rows (and undecodable samples) carry weight 0.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipelines.eval_split import EvalShare
from data_pipelines.image.transforms import Decoded, TrainView, decode_rgb, eval_transform, normalize_batch
from data_pipelines.loader import EpochStream, PreparedShards, SkipLog, Slot, TrainStream, read_checked, stable_seed
from data_pipelines.manifest import inside, manifest_path

logger = logging.getLogger(__name__)

KIND = "image-text"
IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


class ImageTextShards(PreparedShards):
    """A prepared image-text dataset: manifest, shard paths, tokenizer and class list."""

    KIND = KIND
    caption_key = "txt"  # the member prepare-image-text writes captions to

    def __init__(self, root: str | Path):
        super().__init__(root)
        self.image_size: int | None = self.manifest.get("image_size")

    def tokenizer_path(self) -> Path | None:
        """The caption tokenizer saved with the data, or None (the recipe must name one)."""
        info = self.manifest.get("tokenizer")
        return None if not info else inside(self.root, info["path"], manifest_path(self.root), "tokenizer.path")

    def classes(self) -> dict[str, Any] | None:
        """classes.json (class names, prompt templates, held-out classes), or None without one."""
        name = self.manifest.get("classes")
        if not name:
            return None
        path = inside(self.root, name, manifest_path(self.root), "classes")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read class list {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Captions


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its eos token as pad (in place; returned for chaining)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the caption tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _appends_eos(tokenizer: Any) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


def tokenize_captions(
    tokenizer: Any, captions: Sequence[str], context_length: int, appends_eos: bool | None = None
) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask`, long (B, context_length), padded on the right.

    Tokenizers that end every text with eos themselves (CLIP's) are called as
    `tokenizer(captions, padding="max_length", truncation=True, max_length=context_length)`.
    Those that do not (the byte-level BPE our prepare commands train) get eos appended after
    truncating to context_length - 1: CLIP's text tower pools the hidden state at the eos, so
    every caption must have one, even a truncated one. `appends_eos` says which kind the
    tokenizer is (a caller tokenizing many batches finds out once); None: find out now.
    """
    prepare_tokenizer(tokenizer)
    if appends_eos is None:
        appends_eos = _appends_eos(tokenizer)
    if appends_eos:
        enc = tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=context_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
    encoded = tokenizer(
        list(captions), truncation=True, max_length=max(context_length - 1, 1), return_attention_mask=False
    )["input_ids"]
    # Filled in numpy, one tensor per batch (not one per caption).
    ids = np.full((len(encoded), context_length), int(tokenizer.pad_token_id), dtype=np.int64)
    mask = np.zeros((len(encoded), context_length), dtype=np.int64)
    for row, seq in enumerate(encoded):
        seq = (list(seq) + [tokenizer.eos_token_id])[:context_length]
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


# ---------------------------------------------------------------------------------------------
# Samples


def _image_member(sample: dict, caption_key: str = "txt") -> bytes:
    """The sample's image bytes; KeyError without an image or a caption member."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise KeyError(f"no image member (has {sorted(k for k in sample if not k.startswith('__'))})")
    if caption_key not in sample:
        raise KeyError(f"no {caption_key} member (the caption; data.caption_key names it)")
    return sample[key]


def decode_sample(sample: dict, caption_key: str = "txt") -> tuple[Any, str]:
    """(upright 8-bit RGB image, caption) of a raw sample, decoded as prepare-image-text and the
    training view decode (`decode_rgb`: EXIF orientation, 16-bit scaled, transparency on white);
    raises on a missing member or corrupt data."""
    return decode_rgb(_image_member(sample, caption_key)), sample[caption_key].decode("utf-8")


def decode_train_sample(sample: dict, view: TrainView, caption_key: str = "txt") -> tuple[Decoded, str]:
    """(`Decoded` pixels at the scale `view` needs, caption) of a raw sample; raises as decode_sample."""
    return view.decode(_image_member(sample, caption_key)), sample[caption_key].decode("utf-8")


def sample_label(sample: dict) -> int:
    """The integer class label in the sample's json, or -1."""
    try:
        label = json.loads(sample["json"]).get("label") if "json" in sample else None
    except (ValueError, AttributeError):
        return -1
    return label if isinstance(label, int) and not isinstance(label, bool) else -1


def _try_decode(
    sample: dict, log: SkipLog, decode: Callable[[dict], tuple[Any, str]] = decode_sample
) -> tuple[Any, str] | None:
    try:
        return decode(sample)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is bad data, never a reason to stop
        reason = "missing_member" if isinstance(exc, KeyError) else "undecodable"
        log.add(reason, f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}: {type(exc).__name__}: {exc}")
        return None


class ImageTextTrainStream(EpochStream):
    """Endless batches of ``{"pixel_values", "input_ids", "attention_mask"}`` for one rank.

    Rank/worker division, per-epoch reshuffling, resume and re-division after a change of world
    size are `EpochStream`'s; the shuffle buffer holds the compressed samples and decoding comes
    after it. With `augment` a random resized crop (and, unless `flip` is False, a random
    horizontal flip: turn it off when captions say "left" or "right"), otherwise a centre crop,
    drawn from a generator seeded by (seed, slot, batch). `skips` counts skipped samples
    ("undecodable", "missing_member") and shard problems ("bad_shard", "short_shard").

    Images are decoded by `TrainView` (`decoder`: "auto", "simplejpeg" or "pillow") at the
    smallest DCT scale every possible crop allows, cropped and resized as uint8; a batch is
    normalised to float32 in one pass, and captions are tokenized once per batch. With
    ``normalize=False`` batches keep their uint8 pixels and the consumer normalises them
    (`normalize_batch`): the trainer does it on the accelerator, as timm's PrefetchLoader does,
    which is 4x less to copy there and takes that work off the loader's cores.
    """

    DECODE_EARLY = False

    def __init__(
        self,
        data: ImageTextShards,
        split: str,
        batch_size: int,
        tokenizer: Any,
        context_length: int,
        image_size: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        augment: bool = True,
        flip: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        decoder: str = "auto",
        normalize: bool = True,
        **options,
    ):
        super().__init__(data, split, batch_size, rank, world_size, **options)
        self.normalize = normalize
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.context_length, self.image_size = context_length, image_size
        self.augment, self.flip, self.crop_scale, self.decoder = augment, flip, crop_scale, decoder
        self.view = TrainView(image_size, augment=augment, flip=flip, scale=crop_scale, decoder=decoder)
        self.appends_eos = _appends_eos(self.tokenizer)

    def decode(self, sample: dict) -> tuple[Decoded, str] | None:
        return _try_decode(sample, self.skips, self._decode_one)

    def _decode_one(self, sample: dict) -> tuple[Decoded, str]:
        return decode_train_sample(sample, self.view, self.data.caption_key)

    def slot_state(self, slot: Slot, batch: int) -> random.Random:
        # One generator per (slot, batch): a resumed stream draws the same crops without replaying.
        return random.Random(stable_seed(self.seed, "augment", slot.index, batch))

    def collate(self, items: list[tuple[Decoded, str]], augment_rng: random.Random) -> dict[str, torch.Tensor]:
        size = self.image_size
        pixels = _batch_tensor((len(items), 3, size, size), torch.uint8)
        for row, (image, _) in enumerate(items):  # the generator's draws, in the old order: crop, flip
            pixels[row] = self.view(image, augment_rng)
        # In a DataLoader worker the batch travels as uint8 (4x less shared memory to allocate and
        # fault in, which cost a worker about as much as making the batch) and `finish` normalises
        # it in the consuming process.
        if self.normalize and torch.utils.data.get_worker_info() is None:
            pixels = normalize_batch(pixels)
        return {
            "pixel_values": pixels,
            **tokenize_captions(
                self.tokenizer, [caption for _, caption in items], self.context_length, self.appends_eos
            ),
        }

    def finish(self, batch: dict) -> dict:
        if self.normalize and batch["pixel_values"].dtype == torch.uint8:
            batch["pixel_values"] = normalize_batch(batch["pixel_values"])
        return batch

    def replica(self, batch_size, rank, world_size, num_workers, history) -> ImageTextTrainStream:
        return ImageTextTrainStream(
            self.data,
            self.split,
            batch_size,
            self.tokenizer,
            self.context_length,
            self.image_size,
            rank,
            world_size,
            augment=self.augment,
            flip=self.flip,
            crop_scale=self.crop_scale,
            decoder=self.decoder,
            normalize=self.normalize,
            seed=self.seed,
            shuffle_buffer=self.buffer,
            num_workers=num_workers,
            history=history,
            sources=self.sources,
        )


def _batch_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor for a batch; in shared memory inside a DataLoader worker, as
    default_collate does, so sending it to the main process does not copy it into shared
    memory first (19 MB per 32 x 3 x 224 x 224 float32 batch)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    try:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        storage = torch.UntypedStorage._new_shared(nbytes)  # what default_collate uses (private API)
        return torch.tensor([], dtype=dtype).set_(storage, 0, tuple(shape))
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - another torch: copied when sent
        return torch.empty(tuple(shape), dtype=dtype)


def image_text_train_loader(
    data: ImageTextShards,
    split: str,
    batch_size: int,
    tokenizer: Any,
    context_length: int,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    num_workers: int = 0,
    **options,
) -> TrainStream:
    """An endless, stateful iterator of training batches (DataLoader worker processes when
    num_workers > 0); ``options`` are ImageTextTrainStream's (seed, augment, flip, history, ...)."""
    ds = ImageTextTrainStream(
        data,
        split,
        batch_size,
        tokenizer,
        context_length,
        image_size,
        rank,
        world_size,
        num_workers=num_workers,
        **options,
    )
    return TrainStream(ds, num_workers)


def image_text_eval_batches(
    data: ImageTextShards,
    split: str,
    batch_size: int,
    tokenizer: Any,
    context_length: int,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
    stats: dict[str, int] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The split's first ``max_samples`` samples, sample i on rank i % world_size, in order,
    centre-cropped, as batches of ``pixel_values``, ``input_ids``, ``attention_mask``,
    ``weight`` (float; 0 for padding and undecodable rows), ``label`` (long; -1 when the sample
    has none) and ``index`` (long; the sample's position in the split, -1 for padding).

    Every rank yields ceil(n / world_size) rows in the same number of batches, as ZeRO-3's
    collective forward passes need. Padding rows repeat the split's first decodable sample, so
    they are ordinary inputs (a blank caption could give an all-masked row, and NaN x 0 is NaN).
    An undecodable sample keeps its place as such a row, so every rank agrees on which sample is i.
    Pass a dict as `stats` to receive the counts of skipped samples by reason.
    """
    prepare_tokenizer(tokenizer)
    bad = SkipLog(f"eval {split}: ")
    Row = tuple[torch.Tensor, str, int, int]  # pixels, caption, label, index
    share: EvalShare[dict, Row] = EvalShare(data.num_samples(split), max_samples, rank, world_size, batch_size)

    caption_key = data.caption_key

    def row(i: int, sample: dict, mine: bool) -> Row | None:
        decoded = (
            _try_decode(sample, bad, lambda s: decode_sample(s, caption_key))
            if mine
            else _quiet_decode(sample, caption_key)
        )
        if decoded is None:
            return None
        return eval_transform(decoded[0], image_size), decoded[1], sample_label(sample), i

    def collate(rows: list[Row | None], template: Row) -> dict[str, torch.Tensor]:
        pixels, captions, _, _ = zip(*(template if r is None else r for r in rows))
        return {
            "pixel_values": torch.stack(pixels),
            **tokenize_captions(tokenizer, captions, context_length),
            "weight": torch.tensor([0.0 if r is None else 1.0 for r in rows], dtype=torch.float32),
            "label": torch.tensor([-1 if r is None else r[2] for r in rows], dtype=torch.long),
            "index": torch.tensor([-1 if r is None else r[3] for r in rows], dtype=torch.long),
        }

    samples = read_checked(data.shards(split), bad, data.shard_samples(split), data.keep(split), data.fetch)
    for rows, template in share.read(samples, row):
        yield collate(rows, template)
    if stats is not None:
        for reason, count in bad.counts.items():
            stats[reason] = stats.get(reason, 0) + count
    if share.seen and share.template is None:
        raise ValueError(f"{data.root}: split {split!r} has no decodable sample among its first {share.seen}")
    for rows, template in share.rest():
        yield collate(rows, template)


def _quiet_decode(sample: dict, caption_key: str = "txt") -> tuple[Any, str] | None:
    """Decode another rank's sample for the padding template; its owner reports failures."""
    try:
        return decode_sample(sample, caption_key)
    except Exception:  # noqa: BLE001
        return None
