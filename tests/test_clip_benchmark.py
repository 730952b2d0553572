"""pretrain-eval --benchmark DIR on clip_benchmark's WebDataset layout: the metrics against a case
computed by hand, the layout make-synthetic-image-text writes, and equality with pretrain-eval's own
zero-shot and retrieval numbers on the same samples (the clip_benchmark package itself pulls
torchvision and open_clip_torch, which this project does not install)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.launch import REPO, module_cmd, run


def test_zero_shot_metrics_by_hand():
    from pretrain.evals.clip_bench import zero_shot_metrics

    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # class 0: top-1
            [0.2, 0.5, 0.7],  # class 1: second (a top-3 hit)
            [0.3, 0.3, 0.1],  # class 1: tied with class 0, and a tie is a miss
            [0.1, 0.2, 0.8],  # class 2: top-1
        ]
    )
    m = zero_shot_metrics(logits, torch.tensor([0, 1, 1, 2]))
    assert m["acc1"] == pytest.approx(2 / 4)
    assert m["acc5"] == pytest.approx(4 / 4), "k is capped at the 3 classes"
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 1) / 3), "class 1 recalls 0 of its 2"


def test_retrieval_metrics_by_hand_in_each_direction():
    from pretrain.evals.clip_bench import retrieval_metrics

    sims = torch.tensor([[1.0, 2.0, 2.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # sims[i, j]: image i, caption j
    m = retrieval_metrics(torch.eye(3), sims.T.contiguous(), ks=(1, 5))
    # image -> text (text retrieval): image 0's caption ranks third, the others first
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3) and m["text_retrieval_recall@5"] == 1.0
    # text -> image (image retrieval): captions 1 and 2 find image 0 above their own
    assert m["image_retrieval_recall@1"] == pytest.approx(1 / 3) and m["image_retrieval_recall@5"] == 1.0


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench")
    # the README's command
    run(
        module_cmd(
            "data_pipelines.image.synthetic",
            [
                "--output",
                str(root / "syn"),
                "--count",
                "300",
                "--image-size",
                "32",
                "--benchmark",
                str(root / "bench"),
                "--no-progress",
            ],
        )
    )
    return root / "syn", root / "bench"


def test_make_synthetic_writes_the_test_split_in_clip_benchmark_layout(synthetic):
    import tarfile

    from data_pipelines.image.benchmark_layout import read_layout

    syn, bench = synthetic
    classes = json.loads((syn / "classes.json").read_text())
    names, templates, samples = read_layout(bench)
    assert names == classes["classnames"] and templates == classes["templates"]
    assert "{c}" in (bench / "zeroshot_classification_templates.txt").read_text()
    got = [(key, label, caption) for key, _, label, caption in samples]
    want = []
    for shard in sorted((syn / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name in sorted(n for n in files if n.endswith(".json")):
            key = name[: -len(".json")]
            want.append((key, json.loads(files[name])["label"], files[f"{key}.txt"].decode()))
    assert got == want and len(got) > 20


@pytest.mark.slow
def test_benchmark_equals_pretrain_evals_own_zero_shot_and_retrieval(synthetic, tmp_path, capsys):
    from pretrain.cli.evaluate import evaluate, main

    syn, bench = synthetic
    out = tmp_path / "clip"
    run(
        [
            *module_cmd("pretrain.train", []),
            "--config",
            "clip-tiny",
            "--data",
            str(syn),
            "--output-dir",
            str(out),
            "--max-steps",
            "20",
            "--eval-every",
            "0",
            "--no-progress",
        ],
        env={"HF_HUB_OFFLINE": "1"},
    )
    own = evaluate(str(out), str(syn), "test")
    # the README's command (main() of the console script, in this process)
    assert main(["--checkpoint", str(out), "--benchmark", str(bench), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    zs, ret = got["zeroshot_classification"], got["zeroshot_retrieval"]
    assert zs["samples"] == own["zero_shot_samples"]
    assert zs["acc1"] == pytest.approx(own["zero_shot_top1"], abs=1e-9)
    assert zs["acc5"] == pytest.approx(own["zero_shot_top5"], abs=1e-9)
    for k in (1, 5, 10):
        assert ret[f"text_retrieval_recall@{k}"] == pytest.approx(own[f"image_to_text_R@{k}"], abs=1e-9)
        assert ret[f"image_retrieval_recall@{k}"] == pytest.approx(own[f"text_to_image_R@{k}"], abs=1e-9)
    assert 0 <= zs["mean_per_class_recall"] <= 1
    assert main(["--checkpoint", str(out), "--benchmark", str(REPO / "tests")]) == 2
    assert "not a clip_benchmark set" in capsys.readouterr().err
