"""CLIP on a labelled image folder: the folder source, zero-shot evaluation, fine-tuning with the
zero-shot-initialised head (task classify) and WiSE-FT, in one process (a gloo world of one with a
real DeepSpeed engine; the tiny CLIP it starts from is pretrained here for a few seconds)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch

from data_pipelines.image.folder import (
    FolderError,
    FolderTrainStream,
    ImageFolder,
    folder_eval_batches,
    read_classnames,
)
from tests.launch import REPO
from tests.launch import world_of_one as launch_world_of_one

# Four classes told apart by colour and shape; folder names are ids, as ImageNet's synsets are.
CLASSES = {
    "n001": ("red", "circle"),
    "n002": ("blue", "square"),
    "n003": ("green", "triangle"),
    "n004": ("yellow", "star"),
}
SIZE = 32


def _draw(colour: str, shape: str, rng: random.Random) -> bytes:
    from data_pipelines.image.synthetic import _backgrounds, render

    textures = _backgrounds(SIZE, 0)
    img = render(
        SIZE,
        colour,
        shape,
        rng.choice(["small", "large"]),
        rng.choice(["left", "right", "center"]),
        "plain",
        rng,
        textures,
    )
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_folder(root: Path, per_class: int, seed: int = 0, split_dirs: bool = False) -> Path:
    rng = random.Random(seed)
    for folder, (colour, shape) in CLASSES.items():
        for i in range(per_class):
            sub = root / ("val" if i % 4 == 0 else "train") / folder if split_dirs else root / folder
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{folder}_{i:04d}.jpg").write_bytes(_draw(colour, shape, rng))
    (root / "classnames.txt").write_text("".join(f"{k} {c} {s}\n" for k, (c, s) in CLASSES.items()))
    return root


# ------------------------------------------------------------------------------------ the folder


def test_folder_classes_splits_and_classname_files(tmp_path):
    root = make_folder(tmp_path / "flat", 12)
    folder = ImageFolder(root, val_fraction=0.25)
    assert folder.folders == sorted(CLASSES) and folder.classnames == [
        "red circle",
        "blue square",
        "green triangle",
        "yellow star",
    ]
    train, val, everything = folder.files("train"), folder.files("val"), folder.files("all")
    assert len(everything) == 48 and not {p for p, _ in train} & {p for p, _ in val} and len(train) + len(val) == 48
    assert 4 <= len(val) <= 20, "about a quarter held out by the hash"
    assert ImageFolder(root, val_fraction=0.25).files("val") == val, "the split is a stable hash"
    assert all(Path(p).parent.name == folder.folders[y] for p, y in everything)

    # the other class-name forms: positional text, JSON list / object / {classnames, templates}
    names = ["a", "b", "c", "d"]
    (tmp_path / "pos.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "list.json").write_text(json.dumps(names))
    (tmp_path / "obj.json").write_text(json.dumps(dict(zip(sorted(CLASSES), names))))
    (tmp_path / "doc.json").write_text(json.dumps({"classnames": names, "templates": ["a {} here."]}))
    for f in ("pos.txt", "list.json", "obj.json"):
        assert read_classnames(tmp_path / f, sorted(CLASSES)) == (names, None), f
    assert read_classnames(tmp_path / "doc.json", sorted(CLASSES)) == (names, ["a {} here."])
    (tmp_path / "short.txt").write_text("a\nb\n")
    with pytest.raises(FolderError, match=r"short.txt: 2 names for 4 class folders"):
        ImageFolder(root, tmp_path / "short.txt")
    (tmp_path / "gap.json").write_text(json.dumps({"n001": "a"}))
    with pytest.raises(FolderError, match=r"gap.json: no name for 3 class folder"):
        ImageFolder(root, tmp_path / "gap.json")

    split = ImageFolder(make_folder(tmp_path / "split", 8, split_dirs=True))
    assert split.split_layout and split.splits == ["train", "val", "all"]
    assert len(split.files("train")) == 24 and len(split.files("val")) == 8
    with pytest.raises(FolderError, match="no split 'test'"):
        split.files("test")


def test_folder_streams_divide_among_ranks_resume_anywhere_and_skip_bad_files(tmp_path):
    root = make_folder(tmp_path / "f", 6)
    (root / "n001" / "broken.jpg").write_bytes(b"not a jpeg")
    folder = ImageFolder(root)
    n = len(folder.files("all"))
    assert n == 25

    def batches(stream, k):
        return [next(stream) for _ in range(k)]

    one = FolderTrainStream(folder, "all", 4, SIZE, seed=3)
    ref = batches(one, 7)  # 28 positions: all of epoch 0 and 3 of epoch 1
    read, skipped = one.counts()
    assert skipped["undecodable"] >= 1 and read + skipped["undecodable"] == 28, "every position decoded or counted"
    two = [FolderTrainStream(folder, "all", 2, SIZE, r, 2, seed=3) for r in range(2)]
    halves = [batches(s, 7) for s in two]
    filled = 0
    for step, whole in enumerate(ref):  # rank r reads the r-th half of each global batch, with the same crops
        assert len(whole["labels"]) == 4 and all(len(h[step]["labels"]) == 2 for h in halves), "batches keep size"
        positions = whole.meta["positions"]
        if len(set(positions)) < 4:  # the broken image's place: a decodable row of its own batch repeated
            filled += 1
            assert set(halves[0][step].meta["positions"]) | set(halves[1][step].meta["positions"]) == set(positions)
            continue
        for key in ("pixel_values", "labels"):
            assert torch.equal(torch.cat([halves[0][step][key], halves[1][step][key]]), whole[key]), (step, key)
    assert filled >= 1
    # resumed on another world size and micro-batch, the stream goes on at the same global position
    state = two[1].state_dict()
    assert state["position"] == 28
    resumed = FolderTrainStream(folder, "all", 4, SIZE, seed=3, num_workers=2)  # DataLoader workers: the same batches
    resumed.load_state_dict(state)
    for a, b in zip(batches(resumed, 3), batches(one, 3)):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])

    evals = [list(folder_eval_batches(folder, "all", 5, SIZE, rank=r, world_size=2)) for r in range(2)]
    assert [len(e) for e in evals] == [3, 3], "every rank runs the same number of batches"
    rows = [i for e in evals for b in e for i, w in zip(b["index"].tolist(), b["weight"].tolist()) if w > 0]
    broken = [i for i, (p, _) in enumerate(folder.files("all")) if p.endswith("broken.jpg")]
    assert sorted(rows) == [i for i in range(n) if i not in broken], "each image once, the broken one weighted 0"


# ------------------------------------------------------------------------ a pretrained tiny CLIP


def pretrain_tiny_clip(out: Path, steps: int = 60, batch: int = 32) -> Path:
    """clip-tiny's sizes, contrastively trained for a few seconds on captioned drawings of every
    colour and shape, large and centred (the folder's are also small and off-centre: its zero-shot
    accuracy there is above chance and far from perfect), saved as pretrain-export writes one."""
    from data_pipelines.image.loader import tokenize_captions
    from data_pipelines.image.synthetic import COLOURS, SHAPES, _backgrounds, render
    from data_pipelines.image.transforms import to_tensor_normalized
    from data_pipelines.text.tokenizer import train_bpe_tokenizer
    from pretrain.models import clip
    from pretrain.run.config import load_recipe

    rng = random.Random(1)
    textures = _backgrounds(SIZE, 1)
    pairs = []
    for _ in range(384):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        img = render(SIZE, colour, shape, "large", "center", "plain", rng, textures)
        pairs.append((to_tensor_normalized(img), f"a {colour} {shape}"))
    tokenizer = train_bpe_tokenizer([c for _, c in pairs] * 4, 300)
    recipe, _ = load_recipe("clip-tiny")
    config = clip.hf_config(
        recipe.model, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    )
    torch.manual_seed(0)
    model = clip.build_model(recipe.model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    context = clip.context_length(config)
    for _ in range(steps):
        chosen = rng.sample(pairs, batch)
        enc = tokenize_captions(tokenizer, [c for _, c in chosen], context)
        loss = model(pixel_values=torch.stack([p for p, _ in chosen]), **enc)
        opt.zero_grad()
        loss.backward()
        opt.step()
    hf = clip.to_hf(model)
    hf.save_pretrained(out)
    clip.save_hf_assets(hf, tokenizer, out)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch's threads spin against the other xdist worker on a 2-core machine (2 s per tiny step
    instead of 15 ms): one thread, as the launcher tests give each rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world_of_one():
    with launch_world_of_one():
        yield


def _eval(*argv: str) -> dict:
    from contextlib import redirect_stdout

    from pretrain.cli.evaluate import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*argv, "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.mark.slow
def test_zero_shot_then_fine_tuned_head_beats_it_and_wise_ft_interpolates(world_of_one, tmp_path):
    from pretrain.cli.export import export
    from pretrain.models.clip_classify import ClassifierCLIP
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    base = pretrain_tiny_clip(tmp_path / "base")
    root = make_folder(tmp_path / "folder", 40)

    # before: the pretrained CLIP as it is, zero-shot with prompt templates (the folder's names via classnames.txt)
    before = _eval("--model", str(base), "--image-folder", str(root), "--val-fraction", "0.2")
    assert before["classifier"] == "zero-shot" and before["num_classes"] == 4 and before["samples"] >= 10
    assert before["top1"] < 0.9, "room for fine-tuning to show"

    recipe = json.loads((REPO / "pretrain/recipes/clip-tiny-classify.json").read_text())
    recipe["training"].update(max_steps=30, log_every=5)
    recipe["data"]["val_fraction"] = 0.2
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    # transformers' zero.Init cannot broadcast CLIPModel's 0-dim logit_scale: partitioned after building
    recipe["model"]["zero3_init"] = False
    recipe["training"]["warmup_steps"] = 0
    (tmp_path / "r3.json").write_text(json.dumps(recipe))

    def make_trainer(name: str, *more: str, config: str = "r.json") -> Trainer:
        args = build_parser().parse_args(
            [
                "--config",
                str(tmp_path / config),
                "--data",
                str(root),
                "--init-from",
                str(base),
                "--output-dir",
                str(tmp_path / name),
                "--no-progress",
                *more,
            ]
        )
        t = Trainer(*prepare(args), "auto", progress=False)
        t.setup()
        return t

    # under ZeRO-3 too the head starts as the zero-shot classifier, and trains
    zero3 = make_trainer(
        "zero3", "--deepspeed_config", str(REPO / "ds_configs/zero3_fp32.json"), "--max-steps", "4", config="r3.json"
    )
    start = zero3.evaluate()
    assert start["top1"] == before["top1"] and start["loss"] == pytest.approx(before["loss"], rel=1e-4)
    assert zero3.fit()["loss"] < start["loss"] - 0.01
    del zero3

    trainer = make_trainer("run")
    run_dir = trainer.run_dir
    head = trainer.engine.module.head.weight.detach().clone()
    trained = {n for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
    assert "head.weight" in trained and not any(n.startswith("clip.text_model") for n in trained)
    final = trainer.fit()
    assert final["top1"] > before["top1"] + 0.2 and final["samples"] == before["samples"], (before, final)
    assert not torch.equal(head, trainer.engine.module.head.weight.detach())

    # after, and WiSE-FT in one command: alpha 0 is the zero-shot classifier, alpha 1 the fine-tuned one
    after = _eval("--checkpoint", str(run_dir), "--image-folder", str(root), "--wise-ft", "0,0.5,1")
    assert after["classifier"] == "head" and after["top1"] == final["top1"]
    assert after["before"]["top1"] == before["top1"] and after["before"]["loss"] == pytest.approx(
        before["loss"], rel=1e-4
    )
    assert after["after"]["top1"] == after["top1"]
    assert [r["alpha"] for r in after["wise_ft"]] == [0.0, 0.5, 1.0]

    # the WiSE-FT export: a CLIPModel plus its head, evaluated as the sweep's alpha 0.5
    out = export(str(run_dir), str(tmp_path / "wise"), wise_ft=0.5)
    assert (out / "classifier.safetensors").is_file() and "--wise-ft 0.5" in (out / "README.md").read_text()
    exported = _eval("--model", str(out), "--image-folder", str(root), "--val-fraction", "0.2")
    assert exported["classifier"] == "head" and exported["top1"] == after["wise_ft"][1]["top1"]
    from transformers import CLIPModel

    from pretrain.run.build import load_model

    wise, zs = CLIPModel.from_pretrained(out), CLIPModel.from_pretrained(base)
    ft = load_model(str(run_dir)).model.clip
    w = "visual_projection.weight"
    assert torch.allclose(wise.state_dict()[w], (zs.state_dict()[w] + ft.state_dict()[w]) / 2, atol=1e-6)
    assert not torch.allclose(zs.state_dict()[w], ft.state_dict()[w], atol=1e-4), "the image tower was fine-tuned"
    assert torch.equal(wise.state_dict()["text_projection.weight"], zs.state_dict()["text_projection.weight"])

    # the other objective: both towers, contrastive against a class-name caption per image; a plain CLIP results
    recipe["classify_objective"] = "captions"
    (tmp_path / "rc.json").write_text(json.dumps(recipe))
    captions = make_trainer("captions", "--max-steps", "30", config="rc.json")
    assert not isinstance(captions.engine.module, ClassifierCLIP)
    assert captions.evaluate()["top1"] == before["top1"], "before a step: the zero-shot classifier"
    assert captions.fit()["top1"] > before["top1"] + 0.2
    swept = _eval("--checkpoint", str(captions.run_dir), "--image-folder", str(root), "--wise-ft", "0.5")
    assert swept["classifier"] == "zero-shot" and swept["before"]["top1"] == before["top1"]
    assert swept["after"]["top1"] == swept["top1"] > before["top1"]


def test_a_classify_recipe_without_init_from_or_with_a_bad_folder_is_refused_before_training(tmp_path):
    from pretrain.run.config import RecipeError
    from pretrain.train import build_parser, prepare

    root = make_folder(tmp_path / "folder", 2)
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    recipe = json.loads((REPO / "pretrain/recipes/clip-tiny-classify.json").read_text())
    recipe["data"]["classnames"] = str(tmp_path / "three.txt")
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    with pytest.raises(RecipeError) as e:
        prepare(
            build_parser().parse_args(
                ["--config", str(tmp_path / "r.json"), "--data", str(root), "--output-dir", str(tmp_path / "run")]
            )
        )
    text = str(e.value)
    assert "model.init_from: task classify fine-tunes a pretrained CLIP" in text
    assert "three.txt: 3 names for 4 class folders" in text and not (tmp_path / "run").exists()
    with pytest.raises(RecipeError, match="image folder .*nowhere: not a directory"):
        prepare(
            build_parser().parse_args(
                [
                    "--config",
                    "clip-tiny-classify",
                    "--data",
                    str(tmp_path / "nowhere"),
                    "--init-from",
                    str(tmp_path),
                    "--output-dir",
                    str(tmp_path / "run"),
                ]
            )
        )


def test_a_classifier_batch_without_one_decodable_image_stops_the_stream_naming_the_rank(tmp_path):
    """Issue 23 (smaller): an all-undecodable batch was an empty tensor; now an error. A batch with
    some undecodable images keeps its size, its decodable rows repeated in their place."""
    root = make_folder(tmp_path / "f", 2)
    first = sorted(p for p in root.iterdir() if p.is_dir())[0]
    for i in range(40):
        (first / f"broken{i:02d}.jpg").write_bytes(b"not a jpeg")
    stream = FolderTrainStream(ImageFolder(root), "all", 1, SIZE, seed=3)
    with pytest.raises(FolderError, match="rank 0: no image of a whole batch could be decoded"):
        for _ in range(50):
            assert len(next(stream)["labels"]) == 1
