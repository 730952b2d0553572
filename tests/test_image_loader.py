"""The image-text streaming loader over real shards: rank/worker division, equal eval batches
across ranks, caption tokenization, and bad samples skipped and counted without sleeping."""

from __future__ import annotations

import io
import itertools
import json
import logging
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipelines.image.loader import (
    ImageTextShards,
    ImageTextTrainStream,
    image_text_eval_batches,
    image_text_train_loader,
    tokenize_captions,
)
from data_pipelines.image.transforms import CLIP_MEAN, CLIP_STD
from data_pipelines.loader import Slot, epoch_shards
from data_pipelines.manifest import write_manifest
from data_pipelines.text.tokenizer import train_bpe_tokenizer

SIZE, CTX = 16, 12
BAD = "bad"


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer([f"sample number {i}" for i in range(100)], 300)


def solid_jpeg(i: int) -> bytes:
    """Sample i is a solid image whose red channel is 3 i, so batches can be traced back."""
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), (3 * i, 100, 200)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_dataset(
    root: Path, counts: dict[str, list[int]], bad: set[int] = frozenset(), label: bool = True, classes: bool = False
) -> ImageTextShards:
    splits, index = {}, 0
    for split, sizes in counts.items():
        (root / split).mkdir(parents=True)
        shards = []
        for s, n in enumerate(sizes):
            name = f"{split}/shard-{s:06d}.tar"
            with wds.TarWriter(str(root / name)) as w:
                for _ in range(n):
                    meta = {"key": str(index), "label": index % 5} if label else {"key": str(index)}
                    w.write(
                        {
                            "__key__": f"{split}-{index:010d}",
                            "jpg": b"\xff\xd8broken" if index in bad else solid_jpeg(index),
                            "txt": f"sample number {index}",
                            "json": json.dumps(meta),
                        }
                    )
                    index += 1
            shards.append(name)
        splits[split] = {"shards": shards, "shard_samples": sizes, "samples": sum(sizes)}
    manifest = {"kind": "image-text", "version": 1, "image_size": 24, "splits": splits, "tokenizer": None}
    if classes:
        (root / "classes.json").write_text(json.dumps({"classnames": ["a", "b"], "templates": ["{}"], "held_out": []}))
        manifest["classes"] = "classes.json"
    write_manifest(root, manifest)
    return ImageTextShards(root)


def ids_of(pixel_values: torch.Tensor) -> list[int]:
    red = pixel_values[:, 0].mean(dim=(1, 2)) * CLIP_STD[0] + CLIP_MEAN[0]
    return [round(float(r) * 255 / 3) for r in red]


def test_shards_manifest_and_classes(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "a", {"train": [3], "val": [2]}, classes=True)
    assert data.num_samples("val") == 2 and data.shards("train") == [str(tmp_path / "a" / "train/shard-000000.tar")]
    assert data.classes()["classnames"] == ["a", "b"] and data.tokenizer_path() is None
    assert make_dataset(tmp_path / "b", {"train": [1]}).classes() is None
    (tmp_path / "c").mkdir()
    write_manifest(tmp_path / "c", {"kind": "text", "splits": {}})
    with pytest.raises(ValueError, match="expected 'image-text'"):
        ImageTextShards(tmp_path / "c")
    with pytest.raises(ValueError, match="no split 'test'"):
        data.shards("test")


@pytest.mark.parametrize("shard_sizes", [[5, 7, 6, 4, 8, 3], [10, 13, 9]], ids=["shards>=slots", "shards<slots"])
def test_one_epoch_over_ranks_and_workers_covers_every_sample_once(tmp_path: Path, tokenizer, shard_sizes) -> None:
    data = make_dataset(tmp_path, {"train": shard_sizes})
    seen = Counter()
    for rank in range(2):
        for worker in range(2):
            ds = ImageTextTrainStream(
                data, "train", 1, tokenizer, CTX, SIZE, rank, 2, seed=3, shuffle_buffer=0, num_workers=2, augment=False
            )
            slot = Slot(rank, 2, worker, 2)
            ds._slot = lambda slot=slot: slot  # what get_worker_info() gives inside DataLoader worker `worker`
            urls, by_sample = epoch_shards(ds.shards, slot, 0, 3)
            n = sum(shard_sizes[int(u[-10:-4])] for u in urls)
            expected = n if not by_sample else len(range(slot.index, n, 4))
            for batch in itertools.islice(iter(ds), expected):
                seen.update(ids_of(batch["pixel_values"]))
    assert sorted(seen) == list(range(sum(shard_sizes))) and set(seen.values()) == {1}


def test_train_batches_shapes_dtypes_and_determinism(tmp_path: Path, tokenizer) -> None:
    data = make_dataset(tmp_path, {"train": [6, 6]})

    def run(seed: int) -> list[dict]:
        return list(
            itertools.islice(
                image_text_train_loader(data, "train", 4, tokenizer, CTX, SIZE, seed=seed, shuffle_buffer=8), 9
            )
        )

    a, b = run(0), run(0)
    batch = a[0]
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"} and set(batch.meta) == {"stats"}
    assert {k: batch.meta["stats"][k] for k in ("slot", "read", "skipped", "batches")} == {
        "slot": 0,
        "read": 4,
        "skipped": {},
        "batches": 1,
    }
    assert batch["pixel_values"].shape == (4, 3, SIZE, SIZE) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, CTX)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x), "same seed, same crops and order"
    order = [i for x in a for i in ids_of(x["pixel_values"])]
    assert len(order) == 36 and set(order) == set(range(12)), "three epochs of 12 samples, no end"
    assert order[:12] != sorted(order[:12])
    assert [i for x in run(1) for i in ids_of(x["pixel_values"])] != order
    # The caption is the sample's own.
    first = a[0]
    for row, i in enumerate(ids_of(first["pixel_values"])):
        ids = first["input_ids"][row][first["attention_mask"][row].bool()].tolist()
        assert tokenizer.decode(ids[:-1]) == f"sample number {i}" and ids[-1] == tokenizer.eos_token_id


def test_dataloader_workers_read_disjoint_shards_deterministically(tmp_path: Path, tokenizer) -> None:
    data = make_dataset(tmp_path, {"train": [4, 4, 4, 4]})

    def run() -> list[int]:
        loader = image_text_train_loader(
            data,
            "train",
            2,
            tokenizer,
            CTX,
            SIZE,
            rank=1,
            world_size=2,
            seed=0,
            shuffle_buffer=0,
            num_workers=2,
            augment=False,
        )
        return [i for b in itertools.islice(loader, 4) for i in ids_of(b["pixel_values"])]

    first = run()
    assert first == run()
    assert len(set(first)) == 8, "rank 1's two workers read rank 1's two shards, 4 samples each"


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_batches_equal_on_every_rank_and_cover_the_split(tmp_path: Path, tokenizer, world_size) -> None:
    data = make_dataset(tmp_path, {"val": [4, 3]})
    counts, covered = set(), []
    for rank in range(world_size):
        batches = list(image_text_eval_batches(data, "val", 2, tokenizer, CTX, SIZE, rank, world_size))
        counts.add(len(batches))
        for b in batches:
            assert set(b) == {"pixel_values", "input_ids", "attention_mask", "weight", "label", "index"}
            assert b["label"].dtype == b["index"].dtype == torch.int64 and b["weight"].dtype == torch.float32
            real = b["weight"] == 1
            assert ids_of(b["pixel_values"][real]) == b["index"][real].tolist()
            assert b["label"][real].tolist() == [i % 5 for i in b["index"][real].tolist()]
            assert (b["index"][~real] == -1).all() and (b["label"][~real] == -1).all()
            assert (b["attention_mask"].sum(dim=1) > 0).all(), "padding rows are real inputs, never all-masked"
            covered += b["index"][real].tolist()
    assert len(counts) == 1, "every rank runs the same number of forward passes"
    assert sorted(covered) == list(range(7))
    limited = list(image_text_eval_batches(data, "val", 8, tokenizer, CTX, SIZE, max_samples=3))
    assert [b["index"].tolist() for b in limited] == [[0, 1, 2]]


def test_labels_absent_are_minus_one(tmp_path: Path, tokenizer) -> None:
    data = make_dataset(tmp_path, {"val": [3]}, label=False)
    (batch,) = image_text_eval_batches(data, "val", 4, tokenizer, CTX, SIZE)
    assert batch["label"].tolist() == [-1, -1, -1] and batch["weight"].tolist() == [1.0, 1.0, 1.0]


def test_bad_samples_are_skipped_counted_and_named_without_sleeping(
    tmp_path: Path, tokenizer, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_dataset(tmp_path, {"train": [5, 5], "val": [5]}, bad={2, 10})

    def no_sleep(seconds: float) -> None:
        raise AssertionError(f"slept {seconds}s on bad data")

    monkeypatch.setattr(time, "sleep", no_sleep)
    ds = ImageTextTrainStream(data, "train", 1, tokenizer, CTX, SIZE, shuffle_buffer=0, augment=False)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.loader"):
        got = [ids_of(b["pixel_values"])[0] for b in itertools.islice(iter(ds), 16)]
    assert sorted(got[:8]) == [0, 1, 3, 4, 5, 6, 7, 8], "one epoch: every sample but the bad one"
    assert ds.skips.counts["undecodable"] == 2
    assert "train-0000000002" in caplog.text and "train/shard-000000.tar" in caplog.text

    stats: dict[str, int] = {}
    per_rank = []
    for rank in range(2):
        batches = list(image_text_eval_batches(data, "val", 2, tokenizer, CTX, SIZE, rank, 2, stats=stats))
        per_rank.append(len(batches))
        weights = torch.cat([b["weight"] for b in batches])
        index = torch.cat([b["index"] for b in batches])
        if rank == 0:  # split positions 0 (sample 10, bad), 2 and 4 (samples 12 and 14)
            assert index.tolist() == [-1, 2, 4] and weights.tolist() == [0.0, 1.0, 1.0]
            pixels = torch.cat([b["pixel_values"] for b in batches])
            # The bad row holds the padding template: the split's first good sample.
            assert ids_of(pixels) == [11, 12, 14]
    assert per_rank[0] == per_rank[1] and stats["undecodable"] == 1


def test_unreadable_split_fails_instead_of_spinning(tmp_path: Path, tokenizer) -> None:
    data = make_dataset(tmp_path, {"train": [2]}, bad={0, 1})
    ds = ImageTextTrainStream(data, "train", 1, tokenizer, CTX, SIZE, shuffle_buffer=0)
    (tmp_path / "train" / "shard-000000.tar").write_bytes(b"not a tar")
    with pytest.raises(RuntimeError, match="no samples"):
        next(iter(ds))
    assert ds.skips.counts["bad_shard"] >= 1


def test_tokenize_captions_appends_eos_pads_and_truncates(tokenizer) -> None:
    tokenizer.pad_token = None
    out = tokenize_captions(tokenizer, ["sample number 1", "sample " * 40], 8)
    assert tokenizer.pad_token == tokenizer.eos_token, "eos doubles as pad"
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == mask.dtype == torch.int64
    n = int(mask[0].sum())
    assert tokenizer.decode(ids[0, : n - 1]) == "sample number 1" and ids[0, n - 1] == tokenizer.eos_token_id
    assert (ids[0, n:] == tokenizer.pad_token_id).all() and (mask[0, n:] == 0).all()
    assert mask[1].all() and ids[1, -1] == tokenizer.eos_token_id, "a truncated caption still ends in eos"


def test_tokenizer_that_adds_eos_itself_is_called_plainly() -> None:
    """CLIP's tokenizer ends every text with eos itself; it must not get a second one."""
    from tokenizers.processors import TemplateProcessing

    tok = train_bpe_tokenizer([f"sample number {i}" for i in range(50)], 300)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)]
    )
    out = tokenize_captions(tok, ["sample number 7", "sample " * 40], 10)
    ids, mask = out["input_ids"], out["attention_mask"]
    n = int(mask[0].sum())
    assert (ids[0, : n - 1] != tok.eos_token_id).all() and ids[0, n - 1] == tok.eos_token_id
    assert tok.decode(ids[0, : n - 1]) == "sample number 7"
    assert mask[1].all() and ids[1, -1] == tok.eos_token_id and (ids[1, :-1] != tok.eos_token_id).all()


def test_a_world_size_change_re_divides_the_epoch_for_image_text_too(tmp_path: Path, tokenizer) -> None:
    """2 ranks x 2 workers -> 1 rank -> 3 ranks, with a bad image among the samples: every good
    sample once per epoch, the bad one never."""
    data = make_dataset(tmp_path, {"train": [5, 7, 6, 4, 8, 3]}, bad={9})
    n = 33 - 1

    def pull(loader, k):
        return [i for b in itertools.islice(loader, k) for i in b.meta["ids"]]

    common = dict(seed=2, shuffle_buffer=4, trace=True)
    seen = []
    for rank in range(2):
        seen += pull(
            image_text_train_loader(data, "train", 3, tokenizer, CTX, SIZE, rank, 2, num_workers=2, **common), 3
        )
    history = [{"world": 2, "workers": 2, "micro": 3, "micro_batches": 3}]
    seen += pull(image_text_train_loader(data, "train", 4, tokenizer, CTX, SIZE, 0, 1, history=history, **common), 5)
    history.append({"world": 1, "workers": 0, "micro": 4, "micro_batches": 5})
    for rank in range(3):
        seen += pull(
            image_text_train_loader(data, "train", 2, tokenizer, CTX, SIZE, rank, 3, history=history, **common), 14
        )
    assert Counter(seen).most_common(1)[0][1] == 1, "no sample twice in one epoch"
    assert not any(s.endswith("train-0000000009") for s in seen), "the undecodable sample never comes out"
    for epoch in (0, 1):
        assert len({s for s in seen if s.startswith(f"{epoch}:")}) == n, f"epoch {epoch} incomplete"


def gradient(i: int, w: int = 80, h: int = 64) -> Image.Image:
    """Red = x, green = y, blue = 3 i: a crop's pixels say where it came from and which sample."""
    x = torch.linspace(0, 255, w).round().to(torch.uint8)
    y = torch.linspace(0, 255, h).round().to(torch.uint8)
    arr = torch.zeros((h, w, 3), dtype=torch.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = x[None, :], y[:, None], 3 * i
    return Image.fromarray(arr.numpy(), "RGB")


def make_gradient_dataset(
    root: Path, n: int, png: set[int], truncated: set[int], size: tuple[int, int] = (80, 64)
) -> tuple[ImageTextShards, dict]:
    """One shard of gradient images: JPEGs, PNGs at `png`, truncated JPEGs at `truncated`."""
    (root / "train").mkdir(parents=True)
    raw = {}
    with wds.TarWriter(str(root / "train/shard-000000.tar")) as w:
        for i in range(n):
            buffer = io.BytesIO()
            gradient(i, *size).save(buffer, format="PNG" if i in png else "JPEG", quality=95)
            data = buffer.getvalue()[:300] if i in truncated else buffer.getvalue()
            key = f"train-{i:010d}"
            raw[key] = data
            w.write({"__key__": key, "png" if i in png else "jpg": data, "txt": f"sample number {i}"})
    write_manifest(
        root,
        {
            "kind": "image-text",
            "version": 1,
            "image_size": 80,
            "tokenizer": None,
            "splits": {"train": {"shards": ["train/shard-000000.tar"], "shard_samples": [n], "samples": n}},
        },
    )
    return ImageTextShards(root), raw


def test_train_stream_takes_the_crops_the_pillow_transform_takes(tmp_path: Path, tokenizer) -> None:
    """The fast path (reduced decode, box drawn in full-image coordinates, torch resize, batch
    normalisation) against the Pillow transform of the full-size decode, drawing from the same
    (seed, slot, batch) generator in the same order; a PNG sample decodes, a truncated JPEG is skipped.
    200 x 160 JPEGs to 24 px decode at 1/4 scale."""
    import random

    from data_pipelines.image.transforms import decode_rgb, train_transform
    from data_pipelines.loader import stable_seed as _seed

    data, raw = make_gradient_dataset(tmp_path, 10, png={3}, truncated={6}, size=(200, 160))
    ds = ImageTextTrainStream(data, "train", 3, tokenizer, CTX, 24, seed=5, shuffle_buffer=0, trace=True)
    assert ds.view.decode(raw["train-0000000000"]).pixels.shape == (40, 50, 3)
    batches = list(itertools.islice(iter(ds), 6))  # two epochs of the 9 good samples
    keys = []
    for n, batch in enumerate(batches):
        rng = random.Random(_seed(5, "augment", 0, n))  # a generator per (slot, batch)
        for row, ident in enumerate(batch.meta["ids"]):
            key = ident.rsplit(":", 1)[1]
            keys.append(key)
            expected = train_transform(decode_rgb(raw[key]), 24, rng)
            levels = (batch["pixel_values"][row] - expected).abs() * torch.tensor(CLIP_STD).view(3, 1, 1) * 255
            # JPEG chroma at 1/4 scale costs a level or two; a misplaced box would cost tens.
            assert levels.mean() < 3 and levels.max() < 16, (key, levels.mean(), levels.max())
    assert sorted(set(keys)) == sorted(k for i, k in enumerate(raw) if i != 6) and len(keys) == 18
    assert ds.skips.counts["undecodable"] == 2, "the truncated JPEG, once per epoch"


def test_simplejpeg_and_pillow_decoders_give_the_same_stream(tmp_path: Path, tokenizer) -> None:
    pytest.importorskip("simplejpeg")
    data, _ = make_gradient_dataset(tmp_path, 8, png={2}, truncated=set())

    def run(decoder: str) -> list[dict]:
        return list(
            itertools.islice(
                image_text_train_loader(
                    data, "train", 4, tokenizer, CTX, 32, seed=1, shuffle_buffer=4, decoder=decoder
                ),
                4,
            )
        )

    fast, slow, again = run("auto"), run("pillow"), run("auto")
    for a, b, c in zip(fast, slow, again):
        assert a["pixel_values"].shape == b["pixel_values"].shape == (4, 3, 32, 32)
        assert torch.equal(a["input_ids"], b["input_ids"]), "same samples in the same order"
        assert torch.allclose(a["pixel_values"], b["pixel_values"], atol=0.05), "the same libjpeg output"
        assert all(torch.equal(a[k], c[k]) for k in a), "deterministic from the seed"


def test_a_dataloader_worker_builds_the_same_batches_as_the_main_process(tmp_path: Path, tokenizer) -> None:
    """One worker reads what the process itself would; its batches come through shared memory."""
    data, _ = make_gradient_dataset(tmp_path, 8, png=set(), truncated=set())

    def run(workers: int) -> list[dict]:
        return list(
            itertools.islice(
                image_text_train_loader(
                    data, "train", 4, tokenizer, CTX, 32, seed=2, shuffle_buffer=4, num_workers=workers
                ),
                4,
            )
        )

    for a, b in zip(run(0), run(1)):
        assert a["pixel_values"].dtype == b["pixel_values"].dtype == torch.float32
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_uint8_stream_normalised_on_the_device_gives_the_same_pixels_and_clip_loss(tmp_path: Path, tokenizer) -> None:
    """normalize=False (what the trainer asks for): batches keep uint8 pixels, in a worker too,
    and `normalize_batch` of them (what the CLIP model does on its device) is exactly the float
    stream's batch; the model's loss on either is the same."""
    from transformers import CLIPConfig, CLIPModel

    from data_pipelines.image.transforms import normalize_batch
    from pretrain.models.clip import ContrastiveCLIP

    data, _ = make_gradient_dataset(tmp_path, 8, png=set(), truncated=set())

    def run(workers: int, normalize: bool) -> list[dict]:
        return list(
            itertools.islice(
                image_text_train_loader(
                    data,
                    "train",
                    4,
                    tokenizer,
                    CTX,
                    32,
                    seed=3,
                    shuffle_buffer=4,
                    num_workers=workers,
                    normalize=normalize,
                ),
                3,
            )
        )

    floats = run(0, True)
    for workers in (0, 1):
        for a, b in zip(floats, run(workers, False)):
            assert b["pixel_values"].dtype == torch.uint8 and b["pixel_values"].shape == (4, 3, 32, 32)
            assert torch.equal(normalize_batch(b["pixel_values"]), a["pixel_values"])
            assert torch.equal(a["input_ids"], b["input_ids"])
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": tokenizer.vocab_size + 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": CTX,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    model = ContrastiveCLIP(CLIPModel(config)).eval()
    uint8 = run(0, False)[0]
    with torch.no_grad():
        losses = [
            model(pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            for b in (floats[0], uint8)
        ]
    assert torch.equal(losses[0], losses[1])
