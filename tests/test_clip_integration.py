"""Synthetic image-text shards -> clip-tiny on 2 CPU ranks (real deepspeed launcher) -> pretrain-eval
-> pretrain-export -> CLIPModel.from_pretrained reproduces the zero-shot accuracy."""

import json
from pathlib import Path

import pytest
import torch

from tests.launch import REPO, deepspeed_cmd, metrics, module_cmd, run

pytestmark = pytest.mark.slow
STEPS = 80


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    run(
        module_cmd(
            "data_pipelines.image.synthetic",
            ["--output", str(out), "--count", "3000", "--image-size", "48", "--no-progress"],
        )
    )
    return out


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    r = json.loads((REPO / "pretrain/recipes/clip-tiny.json").read_text())
    r["training"]["log_every"] = 1
    path = tmp_path_factory.mktemp("recipe") / "clip-test.json"
    path.write_text(json.dumps(r))
    return str(path)


@pytest.fixture(scope="module")
def runs(data, recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    common = ["--config", recipe, "--data", str(data), "--no-progress"]
    run(deepspeed_cmd(2, [*common, "--output-dir", str(root / "z2"), "--max-steps", str(STEPS), "--eval-every", "40"]))
    run(
        deepspeed_cmd(
            2,
            [
                *common,
                "--deepspeed_config",
                "ds_configs/zero3_fp32.json",
                "--output-dir",
                str(root / "z3"),
                "--max-steps",
                "8",
                "--eval-every",
                "0",
            ],
        )
    )
    return root


def test_two_rank_clip_tiny_learns_zero_shot_far_above_chance(runs):
    train, evals = metrics(runs / "z2")
    assert [m["step"] for m in train] == list(range(1, STEPS + 1))
    assert train[-1]["samples"] == STEPS * 64 and train[-1]["throughput_unit"] == "samples/s"
    assert [e["step"] for e in evals] == [40, STEPS]
    last = evals[-1]
    assert last["num_classes"] == 48 and last["zero_shot_samples"] == last["samples"] > 200
    assert last["zero_shot_top1"] > 5 * last["chance_top1"], last
    assert last["zero_shot_top5"] > last["zero_shot_top1"]
    assert last["loss"] < evals[0]["loss"] < train[0]["loss"]
    for k in (1, 5, 10):
        assert 0.0 <= last[f"image_to_text_R@{k}"] <= 1.0 and f"text_to_image_R@{k}" in last
    assert last["image_to_text_R@10"] > 10 / last["retrieval_pairs"] * 3, "retrieval well above chance"
    assert "zero_shot_top1_held_out" in last and last["gap"] == pytest.approx(last["loss"] - last["train_loss"])


def test_zero3_gives_the_losses_of_zero2(runs):
    """ZeRO-3 partitions CLIP's temperature too (registered as an external parameter of the wrapper)."""
    z2, z3 = metrics(runs / "z2")[0][:8], metrics(runs / "z3")[0]
    assert len(z3) == 8
    for a, b in zip(z2, z3):  # warmup is 15 steps: the first 8 LRs do not depend on max_steps
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)


def _eval_json(*args: str) -> dict:
    p = run(module_cmd("pretrain.cli.evaluate", [*args, "--json"]))
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_pretrain_eval_reproduces_the_in_training_eval(runs, data):
    last = metrics(runs / "z2")[1][-1]
    # 2 ranks x 32 rows in training = one process with batches of 64: the same sets of negatives.
    got = _eval_json(
        "--checkpoint",
        str(runs / "z2"),
        "--data",
        str(data),
        "--split",
        "val",
        "--batch-size",
        "64",
        "--max-samples",
        "512",
    )
    assert got["zero_shot_top1"] == last["zero_shot_top1"] and got["num_classes"] == 48
    assert got["loss"] == pytest.approx(last["loss"], rel=1e-4)
    assert got["image_to_text_R@5"] == pytest.approx(last["image_to_text_R@5"])
    test = _eval_json("--checkpoint", str(runs / "z2"), "--data", str(data), "--split", "test")
    assert test["split"] == "test" and test["zero_shot_top1"] > 5 * test["chance_top1"]


def test_export_loads_in_transformers_and_reproduces_zero_shot(runs, data, tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    from data_pipelines.image.loader import ImageTextShards, image_text_eval_batches, tokenize_captions

    out = tmp_path / "export"
    run(module_cmd("pretrain.cli.export", ["--checkpoint", str(runs / "z2"), "--output", str(out)]))
    model = CLIPModel.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    shards = ImageTextShards(data)
    classes = shards.classes()
    size, ctx = model.config.vision_config.image_size, model.config.text_config.max_position_embeddings
    with torch.no_grad():
        # Plain transformers calls; only the image and caption preprocessing is the toolkit's.
        heads = []
        for name in classes["classnames"]:
            enc = tokenize_captions(tok, [t.format(name) for t in classes["templates"]], ctx)
            emb = model.get_text_features(**enc).pooler_output
            heads.append(torch.nn.functional.normalize(torch.nn.functional.normalize(emb, dim=-1).mean(0), dim=-1))
        heads = torch.stack(heads)
        right = total = 0
        for batch in image_text_eval_batches(shards, "val", 64, tok, ctx, size, max_samples=512):
            img = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
            pred = (torch.nn.functional.normalize(img, dim=-1) @ heads.T).argmax(dim=1)
            keep = batch["weight"] > 0
            right += int((pred[keep] == batch["label"][keep]).sum())
            total += int(keep.sum())
    toolkit = metrics(runs / "z2")[1][-1]
    assert total == toolkit["zero_shot_samples"]
    assert right / total == pytest.approx(toolkit["zero_shot_top1"], abs=1.5 / total)
    exported = _eval_json("--checkpoint", str(out), "--data", str(data), "--batch-size", "64", "--max-samples", "512")
    assert exported["format"] == "hf" and exported["zero_shot_top1"] == toolkit["zero_shot_top1"]


def test_locked_image_tuning_from_an_exported_clip(runs, data, recipe, tmp_path):
    """--init-from a Hugging Face CLIP directory with model.freeze ["vision"]: the image tower stays
    bit-identical, the text tower trains, and the caption tokenizer is the checkpoint's own."""
    from safetensors.torch import load_file

    base = tmp_path / "base"
    run(module_cmd("pretrain.cli.export", ["--checkpoint", str(runs / "z2"), "--output", str(base)]))
    r = json.loads(Path(recipe).read_text())
    r["model"]["freeze"] = ["vision"]
    lit = tmp_path / "lit.json"
    lit.write_text(json.dumps(r))
    out = tmp_path / "run"
    p = run(
        module_cmd(
            "pretrain.train",
            [
                "--config",
                str(lit),
                "--data",
                str(data),
                "--init-from",
                str(base),
                "--output-dir",
                str(out),
                "--max-steps",
                "4",
                "--eval-every",
                "0",
                "--no-progress",
            ],
        )
    )
    assert "froze" in p.stdout
    run(module_cmd("pretrain.cli.export", ["--checkpoint", str(out), "--output", str(tmp_path / "tuned")]))
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "tuned" / "model.safetensors")
    vision = [k for k in before if k.startswith(("vision_model.", "visual_projection."))]
    text = [k for k in before if k.startswith(("text_model.", "text_projection."))]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in text)


def test_a_freeze_pattern_that_matches_nothing_is_refused_before_training(data, recipe, tmp_path):
    r = json.loads(Path(recipe).read_text())
    r["model"]["freeze"] = ["vison_model"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(r))
    p = run(
        module_cmd(
            "pretrain.train",
            ["--config", str(bad), "--data", str(data), "--output-dir", str(tmp_path / "out"), "--no-progress"],
        ),
        check=False,
    )
    assert p.returncode == 2 and "vison_model" in p.stderr and "match no parameter" in p.stderr
    assert not (tmp_path / "out").exists()


def test_a_two_rank_clip_run_resumes_on_one_rank(runs, data, recipe, tmp_path):
    """Universal checkpoint of a CLIP model (its temperature included), data re-divided."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(runs / "z2", run_dir)
    p = run(
        module_cmd(
            "pretrain.train",
            [
                "--config",
                recipe,
                "--data",
                str(data),
                "--output-dir",
                str(run_dir),
                "--max-steps",
                str(STEPS + 4),
                "--eval-every",
                "0",
                "--no-progress",
            ],
        )
    )
    assert "(2 -> 1 ranks)" in p.stdout
    train, evals = metrics(run_dir)
    assert [m["step"] for m in train] == list(range(1, STEPS + 5))
    before = metrics(runs / "z2")[1][-1]
    assert evals[-1]["zero_shot_top1"] > 0.7 * before["zero_shot_top1"], "the trained weights came across"
    assert all(abs(m["loss"] - train[STEPS - 1]["loss"]) < 1.0 for m in train[STEPS:]), "no jump: not a fresh start"


def test_the_export_works_in_the_zero_shot_image_classification_pipeline(runs, data, tmp_path):
    """transformers.pipeline on the export as it is (image processor, eos-terminated captions) agrees
    with pretrain-eval's zero-shot accuracy with the same single prompt template, within 1 point."""
    import shutil

    from transformers import pipeline

    from data_pipelines.eval_split import subset_indices
    from data_pipelines.image.loader import ImageTextShards, decode_sample, sample_label
    from data_pipelines.loader import read_samples

    out = tmp_path / "hf"
    run(module_cmd("pretrain.cli.export", ["--checkpoint", str(runs / "z2"), "--output", str(out)]))
    assert (out / "preprocessor_config.json").is_file()
    shards = ImageTextShards(data)
    classes = shards.classes()
    template, n = classes["templates"][0], 256
    # the samples pretrain-eval --max-samples n scores: a fixed subset spread over the split
    chosen = set(subset_indices(shards.num_samples("val"), n) or range(n))
    images, labels = [], []
    for i, sample in enumerate(read_samples(shards.shards("val"))):
        if i in chosen:
            images.append(decode_sample(sample)[0])
            labels.append(sample_label(sample))
    classify = pipeline("zero-shot-image-classification", model=str(out), device="cpu")
    predictions = classify(images, candidate_labels=classes["classnames"], hypothesis_template=template, batch_size=32)
    names = classes["classnames"]
    pipeline_top1 = sum(p[0]["label"] == names[y] for p, y in zip(predictions, labels)) / n

    one_template = tmp_path / "data"  # the same data, pretrain-eval told the pipeline's single prompt
    shutil.copytree(data, one_template)
    (one_template / shards.manifest["classes"]).write_text(json.dumps({**classes, "templates": [template]}))
    ours = _eval_json("--checkpoint", str(out), "--data", str(one_template), "--max-samples", str(n))
    assert ours["zero_shot_samples"] == n
    assert ours["zero_shot_top1"] > 5 * ours["chance_top1"], "the export has learnt something to agree on"
    assert abs(pipeline_top1 - ours["zero_shot_top1"]) <= 0.01, (pipeline_top1, ours["zero_shot_top1"])
