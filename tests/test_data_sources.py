"""Data sources read where they live (data_pipelines.sources): folders of raw img2dataset shards,
globs, brace patterns, pipe: commands, http:// from a real server on loopback and s3:// from a real
S3-compatible server (moto_server) on loopback; sample counts from the files beside the shards;
held-out keys never trained on; empty evaluation splits refused with the reason; no bare NaN in JSON."""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from data_pipelines.image.loader import ImageTextTrainStream, image_text_eval_batches
from data_pipelines.loader import read_samples
from data_pipelines.sources import (
    SourceError,
    SourceSpec,
    count_shards,
    expand_urls,
    held_out,
    open_sources,
    resolve_source,
    shard_location,
)
from data_pipelines.text.tokenizer import train_bpe_tokenizer
from tests.img2dataset_layout import COLOURS, write_img2dataset

CTX, SIZE = 12, 24


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer([f"a photo of a {c} square" for c in COLOURS] * 20, 300)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, dict]:
    """4 shards in img2dataset's layout: 10 URLs each, 2 failed downloads and 1 corrupt image per shard."""
    folder = tmp_path_factory.mktemp("laion") / "laion"
    return folder, write_img2dataset(folder, shards=4, per_shard=10, size=SIZE, formats=("jpg", "png", "webp"))


def _stream(data, tokenizer, split="train", **kw) -> ImageTextTrainStream:
    return ImageTextTrainStream(
        data, split, 4, tokenizer, CTX, SIZE, seed=5, shuffle_buffer=8, augment=False, trace=True, **kw
    )


def _batches(data, tokenizer, n: int) -> list[dict]:
    return list(itertools.islice(iter(_stream(data, tokenizer)), n))


def _same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert [i.rsplit(":", 1)[1] for i in x.meta["ids"]] == [i.rsplit(":", 1)[1] for i in y.meta["ids"]]
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(x["input_ids"], y["input_ids"])


# --------------------------------------------------------------------------------------------- local


def test_folder_glob_brace_and_pipe_name_the_same_shards_and_counts(raw):
    folder, info = raw
    by_folder = resolve_source(SourceSpec(str(folder)))
    assert by_folder.samples == info["samples"] == 4 * 8 and by_folder.counted_from == "_stats.json"
    assert by_folder.name == "laion" and len(by_folder.shards) == 4
    for urls in (
        f"{folder}/*.tar",
        f"{folder}/{{00000..00003}}.tar",
        [f"{folder}/00000.tar", f"{folder}/0000[1-3].tar"],
    ):
        src = resolve_source(SourceSpec(urls))
        assert src.shards == by_folder.shards and src.samples == 32
    piped = resolve_source(SourceSpec(f"pipe:cat {folder}/{{00000..00003}}.tar"))
    assert piped.shards == [f"pipe:cat {s}" for s in by_folder.shards] and piped.samples == 32
    assert shard_location("pipe:aws s3 cp s3://b/x/00007.tar -") == "s3://b/x/00007.tar"


def test_counts_from_parquet_sizes_json_or_the_samples_key_and_a_clear_error_without(raw, tmp_path):
    folder, _ = raw
    only_parquet = tmp_path / "parquet"
    shutil.copytree(folder, only_parquet, ignore=shutil.ignore_patterns("*_stats.json"))
    counts, how = count_shards(expand_urls(str(only_parquet)))
    assert how == "parquet" and sorted(counts.values()) == [8, 8, 8, 8]
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("*.json", "*.parquet"))
    assert resolve_source(SourceSpec(str(bare))).samples is None
    (bare / "sizes.json").write_text(json.dumps({f"{i:05d}.tar": 5 for i in range(4)}))  # OpenCLIP's convention
    src = resolve_source(SourceSpec(str(bare)))
    assert (src.samples, src.counted_from) == (20, "sizes.json")
    (bare / "sizes.json").unlink()
    assert resolve_source(SourceSpec(str(bare), samples=99)).samples == 99
    data = open_sources("image-text", [SourceSpec(str(bare), key="data.sources[0]")], holdout=0.5)
    with pytest.raises(SourceError, match=r"set data\.sources\[0\]\.samples"):
        data.require_samples("train", "an epoch-based schedule")


def test_bad_source_strings_name_the_key_and_the_path(raw, tmp_path):
    folder, _ = raw
    cases = {
        str(tmp_path / "missing"): "does not exist",
        f"{folder}/*.zip": "matches no file",
        str(tmp_path): "no manifest.json",
        "https://example.org/*.tar": "cannot be listed",
    }
    for urls, message in cases.items():
        with pytest.raises(SourceError, match=message) as e:
            expand_urls(urls, "data.sources[3].urls")
        assert "data.sources[3].urls" in str(e.value)
    with pytest.raises(SourceError, match="text sources must be folders written by prepare-text"):
        open_sources("text", [SourceSpec(str(folder))])


def test_raw_shards_decode_on_the_fly_skipping_and_counting_bad_images(raw, tokenizer):
    """jpg, png and webp members with txt captions train as they are; one corrupt image per shard is
    skipped and counted; no prepare step."""
    folder, info = raw
    data = open_sources("image-text", [SourceSpec(str(folder))], holdout=0.0, eval_specs=[SourceSpec(str(folder))])
    stream = _stream(data, tokenizer)
    seen = set()
    for batch in itertools.islice(iter(stream), 7):  # 28 of the 28 decodable samples of epoch 0
        assert batch["pixel_values"].shape == (4, 3, SIZE, SIZE) and batch["input_ids"].shape == (4, CTX)
        seen.update(i.split(":")[-1] for i in batch.meta["ids"])
    assert len(seen) == 28 and seen < set(info["keys"])
    assert stream.skips.counts == {"undecodable": 4}


def test_caption_key_is_configurable(tmp_path, tokenizer):
    folder = tmp_path / "alt"
    write_img2dataset(folder, shards=1, per_shard=6, size=SIZE, failures=0, corrupt=0, caption_key="caption.txt")
    data = open_sources("image-text", [SourceSpec(str(folder))], holdout=0.0, eval_specs=[SourceSpec(str(folder))])
    stream = _stream(data, tokenizer)
    sample = next(read_samples(data.shards("train")))
    assert stream.decode(sample) is None  # the default "txt": the sample lacks it
    assert stream.skips.counts == {"missing_member": 1} and "no txt member" in stream.skips.examples[0]
    data.caption_key = "caption.txt"
    batch = next(iter(_stream(data, tokenizer)))
    assert tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()][:-1]).startswith("a photo of a")


# --------------------------------------------------------------------------------------------- held out


def test_held_out_keys_are_never_trained_on_and_are_exactly_the_val_split(raw, tokenizer):
    folder, info = raw
    data = open_sources("image-text", [SourceSpec(str(folder))], holdout=0.3)
    assert data.num_samples("val") is None  # known only by reading: the eval reads until the split ends
    with pytest.raises(ValueError, match="no 'test' split"):
        data.shards("test")
    want_val = {k for k in info["keys"] if held_out(info["images"][k], 0.3)}
    assert 0 < len(want_val) < len(info["keys"])
    trained = set()
    for world in (1, 2):  # every rank of two layouts, three epochs each
        for rank in range(world):
            stream = ImageTextTrainStream(
                data, "train", 2, tokenizer, CTX, SIZE, rank, world, seed=1, shuffle_buffer=4, augment=False, trace=True
            )
            for batch in itertools.islice(iter(stream), 3 * 28 // world // 2):
                trained.update(i.split(":")[-1] for i in batch.meta["ids"])
    assert trained == set(info["keys"]) - _corrupt_keys() - want_val  # all the rest, over a few epochs
    rows = []
    for rank in range(2):
        batches = list(image_text_eval_batches(data, "val", 3, tokenizer, CTX, SIZE, rank, 2))
        rows.append(sum(len(b["index"]) for b in batches))
    assert rows[0] == rows[1] == math.ceil(len(want_val) / 2)  # padded to what was read, on both ranks


def _corrupt_keys() -> set[str]:
    return {f"{s * 10**4 + 2:09d}" for s in range(4)}  # write_img2dataset: index failures (2) is corrupt


# --------------------------------------------------------------------------------------------- remote


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_root(raw):
    folder, _ = raw
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_and_pipe_sources_give_the_batches_of_the_local_folder(raw, tokenizer, http_root):
    folder, _ = raw
    local = open_sources("image-text", [SourceSpec(str(folder))], holdout=0.0, eval_specs=[SourceSpec(str(folder))])
    want = _batches(local, tokenizer, 5)
    for urls in (f"{http_root}/{{00000..00003}}.tar", f"pipe:cat {folder}/{{00000..00003}}.tar"):
        data = open_sources("image-text", [SourceSpec(urls)], holdout=0.0, eval_specs=[SourceSpec(str(folder))])
        assert data.sources[0].samples == 32  # the _stats.json files, over HTTP too
        _same_batches(_batches(data, tokenizer, 5), want)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(raw, tmp_path_factory):
    """A real S3-compatible server (moto_server) on 127.0.0.1 with the shards and their stats uploaded."""
    pytest.importorskip("s3fs", reason="s3:// needs the s3 extra (pip install -e '.[test]')")
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="laion")
        folder, _ = raw
        for f in sorted(folder.iterdir()):
            client.upload_file(str(f), "laion", f"shards/{f.name}")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        yield "s3://laion/shards"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_s3_source_through_fsspec_gives_the_batches_of_the_local_folder(raw, tokenizer, s3):
    folder, _ = raw
    local = open_sources("image-text", [SourceSpec(str(folder))], holdout=0.0, eval_specs=[SourceSpec(str(folder))])
    want = _batches(local, tokenizer, 5)
    for urls in (s3, f"{s3}/*.tar", f"{s3}/{{00000..00003}}.tar"):  # a prefix listed, a glob, a brace pattern
        data = open_sources("image-text", [SourceSpec(urls)], holdout=0.0, eval_specs=[SourceSpec(str(folder))])
        src = data.sources[0]
        assert src.shards[0] == "s3://laion/shards/00000.tar" and len(src.shards) == 4
        assert (src.samples, src.counted_from) == (32, "_stats.json")
        _same_batches(_batches(data, tokenizer, 5), want)
    with pytest.raises(SourceError, match="no-such-bucket"):
        expand_urls("s3://no-such-bucket/*.tar")


# --------------------------------------------------------------------------------------------- recipes, runs, JSON


def test_recipe_sources_are_typed_and_misspellings_named():
    from pretrain.run.config import RecipeError, parse_recipe

    r = parse_recipe(
        {
            "data": {
                "sources": [
                    {"urls": "/d/{0..3}.tar", "name": "web", "weight": 0.8},
                    {"urls": ["/c/a.tar"], "weight": 0.2, "samples": 10},
                ],
                "holdout_fraction": 0.05,
                "caption_key": "caption",
            }
        }
    )
    assert [s.weight for s in r.data.sources] == [0.8, 0.2] and r.data.sources[1].samples == 10
    with pytest.raises(RecipeError) as e:
        parse_recipe({"data": {"path": "/x", "sources": [{"url": "/d", "weight": -1}], "holdout_fraction": 1.5}})
    text = str(e.value)
    for needle in (
        "data.sources.0.url: unknown key (did you mean 'urls'?)",
        "data.sources.0.weight",
        "data.holdout_fraction",
    ):
        assert needle in text, text


def _train(argv: list[str], capsys) -> tuple[int, str]:
    from pretrain.train import main

    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.fixture
def isolated_env(monkeypatch):
    # main() makes a one-process world in os.environ; keep it out of the other tests.
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)


def test_empty_val_split_is_refused_at_train_start_with_the_reason(
    raw, tmp_path, capsys, prepared_stdlib, isolated_env
):
    folder, _ = raw
    rc, err = _train(["--config", "clip-tiny", "--data", str(folder), "--output-dir", str(tmp_path / "r")], capsys)
    assert rc == 2 and "data.holdout_fraction: 0.01 of the raw sources' 32 samples is 0.32 samples" in err, err
    empty = tmp_path / "stdlib-no-val"
    shutil.copytree(prepared_stdlib, empty)
    manifest = json.loads((empty / "manifest.json").read_text())
    manifest["splits"]["val"].update(samples=0, shards=[], shard_samples=[])
    (empty / "manifest.json").write_text(json.dumps(manifest))
    rc, err = _train(["--config", "gpt-tiny", "--data", str(empty), "--output-dir", str(tmp_path / "g")], capsys)
    assert rc == 2 and "'val' split is empty (prepared with --val-fraction 0.15" in err, err
    rc, err = _train(
        ["--config", "clip-tiny", "--data", "pipe:cat /nonexistent/{0..3}.tar", "--output-dir", str(tmp_path / "p")],
        capsys,
    )
    # a pipe: string is a source (no "manifest.json not found"); what is missing is the caption tokenizer
    assert rc == 2 and "manifest.json" not in err and "data.tokenizer: not set" in err, err
    rc, err = _train(
        ["--config", "clip-tiny", "--data", "/nonexistent/{0..3}.tar", "--output-dir", str(tmp_path / "m")], capsys
    )
    assert rc == 2 and "data.path: /nonexistent/0.tar does not exist" in err, err
    assert not any((tmp_path / d).exists() for d in "grpm")


def test_prepare_warns_about_an_empty_val_split(tmp_path, stdlib_files, capsys):
    from data_pipelines.text.prepare import main

    argv = [
        str(stdlib_files[0]),
        "--output",
        str(tmp_path / "one"),
        "--vocab-size",
        "300",
        "--seq-len",
        "32",
        "--val-fraction",
        "0.01",
        "--test-fraction",
        "0",
        "--no-progress",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: the val split is empty: --val-fraction 0.01 of" in err, err


def test_json_writers_never_write_a_bare_nan(tmp_path):
    from pretrain.runtime.metrics import MetricsLogger, dumps, read_metrics

    assert (
        dumps({"loss": float("nan"), "nested": {"gap": float("inf")}, "xs": [1.0, float("-inf")]})
        == '{"loss": null, "nested": {"gap": null}, "xs": [1.0, null]}'
    )
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log({"step": 1, "split": "val", "loss": float("nan"), "skipped": {"x": float("nan")}})
    log.close()
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    assert read_metrics(tmp_path)[0]["skipped"] == {"x": None}


def test_an_evaluation_that_finds_no_sample_says_why_instead_of_nan(raw, tokenizer, tmp_path):
    """Counts unknown at train start (no stats files) and a hold-out that catches no key: the eval
    reports 0 samples without failing, and the trainer's line carries loss null and the reason."""
    from pretrain.models import EvalRequest, RunData, clip
    from pretrain.run.config import ModelConfig, VisionConfig
    from pretrain.run.data import empty_split_note
    from pretrain.runtime.metrics import dumps
    from pretrain.runtime.trainer import describe_eval

    folder, _ = raw
    data = open_sources("image-text", [SourceSpec(str(folder))], holdout=1e-9)
    tok = tmp_path / "tok"
    tokenizer.save_pretrained(str(tok))
    cfg = ModelConfig(
        arch="clip",
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=CTX,
        projection_dim=16,
        vision=VisionConfig(image_size=SIZE, patch_size=8, hidden_size=32, num_layers=1, num_heads=2),
    )
    config = clip.hf_config(cfg, len(tokenizer), tokenizer.eos_token_id)
    model = clip.model_from_config(config).eval()
    result = clip.evaluate(model, RunData(data, tok, config), EvalRequest("val", 4))
    assert result["samples"] == 0 and math.isnan(result["loss"]) and "retrieval_pairs" not in result
    note = empty_split_note(data, "val")
    assert "held out by data.holdout_fraction=1e-09" in note and "data.eval_sources" in note
    line = {"step": 3, "split": "val", **result, "loss": None, "gap": None, "note": note}
    assert "NaN" not in dumps(line) and describe_eval(line) == f"val: {note}"


def test_a_byte_identical_copy_under_another_key_is_held_out_with_the_original():
    """Hold-out by content (issue 22 item 7): a crawl's duplicate images under other keys and other
    metadata never straddle train and val."""
    from data_pipelines.sources import KeyFilter, sample_content

    keep_train = KeyFilter(frozenset({"u"}), 0.5, want=False)
    for i in range(40):
        picture = f"picture {i}".encode()
        copies = [
            {
                "__key__": f"{i:05d}",
                "__url__": "u",
                "jpg": picture,
                "txt": b"a cat",
                "json": f'{{"key": {i}}}'.encode(),
            },
            {"__key__": f"{i + 1000:05d}", "__url__": "u", "jpg": picture, "txt": b"another caption"},
        ]
        assert len({keep_train(c) for c in copies}) == 1, f"copy {i} straddles the split"
    assert sample_content({"__key__": "k", "txt": "the text"}) == b"the text"
    # a fraction is still held out, decided by the content alone
    decided = [keep_train({"__key__": "k", "__url__": "u", "jpg": f"p{i}".encode()}) for i in range(400)]
    assert 150 < sum(decided) < 250


def test_a_half_undecodable_source_keeps_its_share_of_the_mixture(tmp_path, tokenizer):
    """Issue 23 item 3: weights 1:1, half of source A's images undecodable: each drawn sample slot stays
    with its source until one of its samples decodes, so A still gives half the samples (it gave 1/3)."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_img2dataset(a, shards=2, per_shard=40, size=SIZE, failures=0, corrupt=20)
    write_img2dataset(b, shards=2, per_shard=40, size=SIZE, failures=0, corrupt=0)
    data = open_sources("image-text", [SourceSpec(str(a), name="a"), SourceSpec(str(b), name="b")], holdout=0.0)
    stream = ImageTextTrainStream(data, "train", 16, tokenizer, CTX, SIZE, seed=5, shuffle_buffer=8, augment=False)
    for batch in itertools.islice(iter(stream), 625):  # 10,000 samples: the 2% bound is 4 standard deviations
        stats = batch.meta["stats"]
    assert sum(stats["by_source"].values()) == 10_000
    assert abs(stats["by_source"]["a"] / 10_000 - 0.5) < 0.02, stats["by_source"]
    assert stats["skipped"].get("undecodable", 0) > 0, "the undecodable samples are skipped and counted"
