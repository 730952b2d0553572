"""The prepare-text command end to end: real files in, shards a plain webdataset reader accepts."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from data_pipelines.manifest import read_manifest
from data_pipelines.splits import SPLITS
from data_pipelines.text.prepare import main

FAST = ["--no-progress", "--seq-len", "32", "--samples-per-shard", "16"]


def read_split(out: Path, shards: list[str]) -> list[dict]:
    if not shards:
        return []
    dataset = wds.WebDataset([str(out / s) for s in shards], shardshuffle=False).decode()
    return list(dataset)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/shard-*.tar"))}


def test_manifest_matches_what_webdataset_reads(prepared_stdlib: Path, stdlib_files: list[Path]) -> None:
    manifest = read_manifest(prepared_stdlib)
    assert (manifest["kind"], manifest["version"], manifest["created_by"]) == ("text", 1, "prepare-text")
    assert manifest["seq_len"] == 64 and manifest["token_dtype"] == "uint16"
    tok = manifest["tokenizer"]
    assert tok == {
        "path": "tokenizer",
        "vocab_size": 1000,
        "eos_token": "<|endoftext|>",
        "eos_token_id": 0,
        "trained": True,
        "source": None,
    }
    assert [i["path"] for i in manifest["inputs"]] == [str(p) for p in stdlib_files]
    assert all(i["format"] == "text" and i["documents"] == 1 and i["bytes"] > 0 for i in manifest["inputs"])
    assert manifest["skipped"] == {"total": 0, "by_reason": {}, "examples": []}
    splits = manifest["splits"]
    assert set(splits) == set(SPLITS)
    assert sum(s["documents"] for s in splits.values()) == len(stdlib_files)
    for split, info in splits.items():
        samples = read_split(prepared_stdlib, info["shards"])
        assert len(samples) == info["samples"] == sum(info["shard_samples"])
        assert [s["__key__"] for s in samples] == [f"{split}-{i:010d}" for i in range(info["samples"])]
        assert all(s["tokens.npy"].dtype == np.uint16 and s["tokens.npy"].shape == (65,) for s in samples)
        assert info["tokens"] == 65 * info["samples"]
        assert info["shards"] == [f"{split}/shard-{i:06d}.tar" for i in range(len(info["shards"]))]
        assert all(n == 40 for n in info["shard_samples"][:-1])
        assert 0 <= info["dropped_tokens"] < 65
        if info["samples"]:
            stream = np.concatenate([s["tokens.npy"] for s in samples])
            # One eos per document, except for those that fell into the dropped tail.
            assert (stream == 0).sum() <= info["documents"]
    assert splits["train"]["samples"] > 0 and splits["train"]["documents"] >= 15


def test_trained_tokenizer_loads_and_round_trips(prepared_stdlib: Path, stdlib_files: list[Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(prepared_stdlib / "tokenizer"))
    assert len(tokenizer) == 1000 and tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    for text in ["def main(argv=None) -> int:\n    return 0\n", "  ünïcödé ✓ 😀\ttabs\r\n", "<|endoftext|>"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    code = stdlib_files[0].read_text()
    assert len(tokenizer(code, add_special_tokens=False)["input_ids"]) < len(code) / 2  # it learned merges

    train = read_manifest(prepared_stdlib)["splits"]["train"]
    first = read_split(prepared_stdlib, train["shards"][:1])[0]["tokens.npy"]
    text = tokenizer.decode(first.tolist())
    assert any(text.split("<|endoftext|>")[0] in p.read_text() for p in stdlib_files)


def test_local_tokenizer_gives_the_same_shards(prepared_stdlib: Path, stdlib_files: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "again"
    argv = [
        *map(str, stdlib_files),
        "--output",
        str(out),
        "--tokenizer",
        str(prepared_stdlib / "tokenizer"),
        "--seq-len",
        "64",
        "--val-fraction",
        "0.15",
        "--test-fraction",
        "0.15",
        "--samples-per-shard",
        "40",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert shard_bytes(out) == shard_bytes(prepared_stdlib)
    manifest = read_manifest(out)
    assert manifest["tokenizer"]["trained"] is False
    assert manifest["tokenizer"]["source"] == str(prepared_stdlib / "tokenizer")
    assert manifest["splits"] == read_manifest(prepared_stdlib)["splits"]


def test_workers_give_byte_identical_output(
    prepared_stdlib: Path, stdlib_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import data_pipelines.text.prepare as prepare

    # Tiny batches: many more batches than workers, so in-order reassembly is really exercised.
    monkeypatch.setattr(prepare, "BATCH_DOCUMENTS", 3)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        argv = [
            *map(str, stdlib_files),
            "--output",
            str(out),
            "--tokenizer",
            str(prepared_stdlib / "tokenizer"),
            "--workers",
            str(workers),
            "--val-fraction",
            "0.2",
            "--test-fraction",
            "0.2",
            *FAST,
        ]
        assert main(argv) == 0
        outs.append(out)
    one, two = (shard_bytes(o) for o in outs)
    assert len(one) > 3 and {k.split("/")[0] for k in one} == set(SPLITS) and one == two
    assert read_manifest(outs[0])["splits"] == read_manifest(outs[1])["splits"]


def reference_dataset(
    files: list[Path],
    tokenizer_dir: Path,
    out: Path,
    seq_len: int,
    samples_per_shard: int,
    val_fraction: float,
    test_fraction: float,
) -> dict[str, dict]:
    """prepare-text's output the plain way: one document at a time, the Hugging Face call,
    TokenPacker.add and RecordingShardWriter (the pipeline before --workers was made to scale)."""
    from data_pipelines.shards import RecordingShardWriter
    from data_pipelines.splits import assign_split
    from data_pipelines.text.packing import TokenPacker
    from data_pipelines.text.sources import ScanReport, iter_documents, resolve_inputs
    from data_pipelines.text.tokenizer import encode_texts, load_tokenizer, token_dtype

    tokenizer = load_tokenizer(tokenizer_dir)
    specs = resolve_inputs([str(f) for f in files])
    packers = {s: TokenPacker(seq_len, tokenizer.eos_token_id, token_dtype(len(tokenizer))) for s in SPLITS}
    writers = {s: RecordingShardWriter(out / s, samples_per_shard) for s in SPLITS}
    for text in iter_documents(specs, "text", 1, ScanReport.for_inputs(specs)):
        split = assign_split(text.encode("utf-8"), val_fraction, test_fraction, 0)
        for window in packers[split].add(encode_texts(tokenizer, [text])[0]):
            writers[split].write({"__key__": f"{split}-{writers[split].samples:010d}", "tokens.npy": window})
    for split in SPLITS:
        writers[split].close()
        packers[split].finish()
    return {
        s: {
            "shards": [p.relative_to(out).as_posix() for p in writers[s].shards],
            "shard_samples": writers[s].shard_samples,
            "samples": writers[s].samples,
            "tokens": packers[s].tokens_out,
            "documents": packers[s].documents,
            "dropped_tokens": packers[s].dropped_tokens,
        }
        for s in SPLITS
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_output_equals_the_document_by_document_reference(
    prepared_stdlib: Path, stdlib_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    import data_pipelines.text.prepare as prepare

    # Small batches that mix the three splits: many batches per worker, each split's
    # documents picked out of every batch, windows spanning batches and shards.
    monkeypatch.setattr(prepare, "BATCH_DOCUMENTS", 4)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 30_000)
    tok_dir = prepared_stdlib / "tokenizer"
    expected = reference_dataset(stdlib_files, tok_dir, tmp_path / "ref", 32, 7, 0.25, 0.25)
    out = tmp_path / "out"
    assert (
        main(
            [
                *map(str, stdlib_files),
                "--output",
                str(out),
                "--tokenizer",
                str(tok_dir),
                "--workers",
                str(workers),
                "--val-fraction",
                "0.25",
                "--test-fraction",
                "0.25",
                "--seq-len",
                "32",
                "--samples-per-shard",
                "7",
                "--no-progress",
            ]
        )
        == 0
    )
    assert all(expected[s]["documents"] >= 3 and len(expected[s]["shards"]) >= 3 for s in SPLITS)
    assert read_manifest(out)["splits"] == expected
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")


@pytest.mark.parametrize(
    ("samples_per_shard", "dtype", "chunks"),
    [
        (1, np.uint16, [3, 1, 2]),
        (4, np.uint16, [0, 1, 3, 4, 9, 2]),  # an empty write, shard-sized writes, a write over two shards
        (5, np.uint32, [10]),  # ends exactly on a full shard: no empty shard after it
    ],
)
def test_window_writer_writes_what_recording_writer_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, samples_per_shard: int, dtype: type, chunks: list[int]
) -> None:
    from data_pipelines.shards import RecordingShardWriter
    from data_pipelines.text import prepare

    rng = np.random.default_rng(samples_per_shard)
    windows = rng.integers(0, np.iinfo(dtype).max, size=(sum(chunks), 17)).astype(dtype)
    reference = RecordingShardWriter(tmp_path / "ref" / "val", samples_per_shard)
    for n, window in enumerate(windows):
        reference.write({"__key__": f"val-{n:010d}", "tokens.npy": window})
    reference.close()

    def written(root: Path) -> prepare.WindowShardWriter:
        writer = prepare.WindowShardWriter(root / "val", "val", samples_per_shard)
        start = 0
        for size in chunks:
            writer.write(windows[start : start + size])
            start += size
        writer.close()
        return writer

    fast = written(tmp_path / "fast")
    assert fast._layout is not None and fast._fallback is None  # the template path was taken
    monkeypatch.setattr(prepare._MemberLayout, "matching_reference", classmethod(lambda cls, split, window: None))
    slow = written(tmp_path / "slow")
    assert slow._fallback is not None
    for writer, root in ((fast, tmp_path / "fast"), (slow, tmp_path / "slow")):
        assert (writer.samples, writer.shard_samples) == (reference.samples, reference.shard_samples)
        assert [p.relative_to(root) for p in writer.shards] == [
            p.relative_to(tmp_path / "ref") for p in reference.shards
        ]
        assert shard_bytes(root) == shard_bytes(tmp_path / "ref")
    assert not prepare.WindowShardWriter(tmp_path / "none" / "val", "val", 3).directory.exists()


def test_text_encoder_gives_the_hugging_face_ids(
    prepared_stdlib: Path, stdlib_files: list[Path], tmp_path: Path
) -> None:
    import pickle

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from data_pipelines.text.tokenizer import TextEncoder, encode_texts, load_tokenizer

    texts = [p.read_text() for p in stdlib_files[:5]] + [
        "",
        "<|endoftext|>",
        "a<|endoftext|>b <|endoftext|>",
        "  ünïcödé ✓ 😀\ttabs\r\n",
        "Hello hello HELLO x",
    ]
    # A word-level tokenizer saved with truncation, padding and a normalizer: the Hugging Face
    # call turns truncation and padding off, and so must the encoder.
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1, "hello": 2, "x": 3}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.enable_truncation(2)
    backend.enable_padding(length=8)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>").save_pretrained(
        str(tmp_path / "word")
    )
    for tokenizer in (load_tokenizer(prepared_stdlib / "tokenizer"), load_tokenizer(tmp_path / "word")):
        # Built first: the Hugging Face call below turns truncation and padding off in place.
        encoders = (TextEncoder(tokenizer), pickle.loads(pickle.dumps(TextEncoder(tokenizer))))
        assert all(e._backend is not None for e in encoders)  # the direct path to the Rust backend
        expected = encode_texts(tokenizer, texts)
        assert max(len(e) for e in expected) > 8  # neither truncated nor padded
        for encoder in encoders:
            ids, lengths = encoder(texts)
            assert lengths.tolist() == [len(e) for e in expected]
            np.testing.assert_array_equal(ids, np.concatenate(expected))
            ids, lengths = encoder([])
            assert ids.size == 0 and lengths.size == 0

    class Custom(PreTrainedTokenizerFast):  # a class that changes the call may change the ids
        def __call__(self, *args, **kwargs):  # type: ignore[override]
            return super().__call__(*args, **kwargs)

    custom = Custom(
        tokenizer_object=Tokenizer.from_file(str(prepared_stdlib / "tokenizer" / "tokenizer.json")),
        eos_token="<|endoftext|>",
    )
    encoder = TextEncoder(custom)
    assert encoder._backend is None
    ids, lengths = encoder(texts)
    np.testing.assert_array_equal(ids, np.concatenate(encode_texts(custom, texts)))


def test_documents_packed_in_order_with_one_eos_each(prepared_stdlib: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    docs = [f"doc {i} says <|endoftext|> literally" if i % 5 == 0 else f"doc {i} " + "word " * i for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    out = tmp_path / "out"
    tok_dir = prepared_stdlib / "tokenizer"
    assert (
        main(
            [
                str(tmp_path / "d.jsonl"),
                "--output",
                str(out),
                "--tokenizer",
                str(tok_dir),
                "--val-fraction",
                "0",
                "--test-fraction",
                "0",
                *FAST,
            ]
        )
        == 0
    )
    train = read_manifest(out)["splits"]["train"]
    stream = np.concatenate([s["tokens.npy"] for s in read_split(out, train["shards"])])
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    # Every eos in the shards ends a whole document, in input order; the literal text
    # "<|endoftext|>" inside a document is not turned into an eos.
    ends = np.flatnonzero(stream == 0)
    pieces = np.split(stream[: ends[-1]], ends[:-1] + 1) if len(ends) else []
    decoded = [tokenizer.decode(p[p != 0].tolist()) for p in pieces]
    assert decoded == docs[: len(decoded)] and len(decoded) >= 35
    assert train["tokens"] + train["dropped_tokens"] == sum(
        len(tokenizer(d, add_special_tokens=False, split_special_tokens=True)["input_ids"]) + 1 for d in docs
    )


def make_mixed_corpus(root: Path) -> Path:
    import datasets

    datasets.disable_progress_bars()
    corpus = root / "corpus"
    (corpus / "docs").mkdir(parents=True)
    (corpus / "docs" / "readme.md").write_text("# Title\n\nSome markdown text. " * 20)
    (corpus / "docs" / "latin1.txt").write_bytes(b"caf\xe9 " * 10)
    (corpus / "docs" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (corpus / "a.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"text": "json lines document one " * 10}),
                "{oops",
                json.dumps({"title": "no text here"}),
                json.dumps({"text": ["list", "of", "strings"]}),
            ]
        )
        + "\n"
    )
    (corpus / "b.json").write_text(json.dumps([{"text": "array document " * 8}, {"text": 5}]))
    with gzip.open(corpus / "c.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"text": "gzipped document " * 9}) + "\n")
    pq.write_table(
        pa.table({"text": ["parquet row one " * 7, "parquet row two " * 7]}), corpus / "d.parquet", row_group_size=1
    )
    datasets.Dataset.from_dict({"text": ["hf dataset row " * 6, "   "]}).save_to_disk(str(corpus / "hf"))
    return corpus


def test_every_format_in_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = make_mixed_corpus(tmp_path)
    out = tmp_path / "out"
    assert (
        main(
            [
                str(corpus),
                "--output",
                str(out),
                "--vocab-size",
                "300",
                "--val-fraction",
                "0",
                "--test-fraction",
                "0",
                *FAST,
            ]
        )
        == 0
    )
    manifest = read_manifest(out)
    got = {
        Path(i["path"]).relative_to(corpus).as_posix(): (i["format"], i["documents"], i["skipped"])
        for i in manifest["inputs"]
    }
    assert got == {
        "a.jsonl": ("jsonl", 2, 2),
        "b.json": ("json", 1, 1),
        "c.jsonl.gz": ("jsonl", 1, 0),
        "d.parquet": ("parquet", 2, 0),
        "docs/latin1.txt": ("text", 0, 1),
        "docs/readme.md": ("text", 1, 0),
        "hf": ("hf_dataset", 1, 1),
    }
    assert manifest["skipped"]["by_reason"] == {
        "empty": 1,
        "invalid_json": 1,
        "missing_field": 1,
        "not_text": 1,
        "not_utf8": 1,
    }
    assert {e["source"] for e in manifest["skipped"]["examples"]} >= {
        f"{corpus / 'a.jsonl'}:2",
        f"{corpus / 'hf'}:row 1",
    }
    train = manifest["splits"]["train"]
    assert train["documents"] == 8 and manifest["splits"]["val"]["shards"] == [] == manifest["splits"]["test"]["shards"]
    assert not (out / "val").exists() and not (out / "test").exists()
    stream = np.concatenate([s["tokens.npy"] for s in read_split(out, train["shards"])])
    assert train["tokens"] == len(stream) and train["tokens"] + train["dropped_tokens"] > 8 * 10
    summary = capsys.readouterr().out
    assert "train" in summary and "invalid_json=1" in summary


def test_duplicates_never_straddle_splits(tmp_path: Path) -> None:
    docs = [f"document {i}: " + "some words " * (i % 7 + 1) for i in range(60)]
    (tmp_path / "dups.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs * 3) + "\n")
    out = tmp_path / "out"
    assert (
        main(
            [
                str(tmp_path / "dups.jsonl"),
                "--output",
                str(out),
                "--vocab-size",
                "300",
                "--val-fraction",
                "0.3",
                "--test-fraction",
                "0.3",
                *FAST,
            ]
        )
        == 0
    )
    counts = [read_manifest(out)["splits"][s]["documents"] for s in SPLITS]
    assert sum(counts) == 180 and all(c % 3 == 0 and c > 0 for c in counts)


def test_field_missing_everywhere_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x " * 50}) + "\n")
    (tmp_path / "b.txt").write_text("a real document " * 20)
    out = tmp_path / "out"
    assert (
        main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"), "--output", str(out), "--vocab-size", "300", *FAST])
        == 0
    )
    err = capsys.readouterr().err
    # one document: the val and test splits are empty too, which is warned about on its own
    field = [line for line in err.splitlines() if "warning:" in line and "split is empty" not in line]
    assert len(field) == 1 and "a.jsonl" in err and "['body']" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vocab-size", "300", "--tokenizer", "x"], "not allowed with argument"),
        ([], "one of the arguments --tokenizer --vocab-size is required"),
        (["--vocab-size", "100"], "--vocab-size must be >= 257"),
        (["--vocab-size", "300", "--val-fraction", "0.6", "--test-fraction", "0.5"], "must be < 1"),
        (["--tokenizer", "/no/such/tokenizer"], "/no/such/tokenizer: not a directory"),
    ],
)
def test_bad_flags_fail_before_any_work(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    (tmp_path / "a.txt").write_text("text")
    out = tmp_path / "out"
    assert main([str(tmp_path / "a.txt"), "--output", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_and_unsupported_inputs_are_named(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "blob.npy").write_bytes(b"\x93NUMPY")
    for bad, message in [(tmp_path / "missing.jsonl", "input not found"), (tmp_path / "blob.npy", "unsupported")]:
        assert main([str(tmp_path / "a.txt"), str(bad), "--output", str(tmp_path / "out"), "--vocab-size", "300"]) == 2
        err = capsys.readouterr().err
        assert message in err and str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_output_dir_is_protected_unless_overwrite(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.txt").write_text("some text to tokenize " * 30)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    # The input folder holds the output folder: a re-run must not read its own results.
    argv = [str(tmp_path), "--output", str(out), "--vocab-size", "300", *FAST]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err and not (out / "manifest.json").exists()
    assert main([*argv, "--overwrite"]) == 0
    assert main([*argv, "--overwrite", "--seq-len", "8"]) == 0
    manifest = read_manifest(out)
    assert manifest["seq_len"] == 8 and (out / "keep.txt").read_text() == "user file"
    assert [Path(i["path"]).name for i in manifest["inputs"]] == ["a.txt"]


def test_limit_documents_stops_early(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(50)) + "\n")
    out = tmp_path / "out"
    assert (
        main([str(tmp_path / "d.jsonl"), "--output", str(out), "--vocab-size", "300", "--limit-documents", "7", *FAST])
        == 0
    )
    manifest = read_manifest(out)
    assert sum(s["documents"] for s in manifest["splits"].values()) == 7 == manifest["inputs"][0]["documents"]


def test_manifest_io_errors_name_the_path(tmp_path: Path) -> None:
    from data_pipelines.manifest import ManifestError, write_manifest

    with pytest.raises(ManifestError, match=f"no manifest at {tmp_path}"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{truncated")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    write_manifest(tmp_path, {"kind": "text", "n": [1, 2]})
    assert read_manifest(tmp_path / "manifest.json") == {"kind": "text", "n": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary file left behind


def test_tokenizer_without_eos_is_refused(tmp_path: Path, capsys) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "a.txt").write_text("hello hello")
    assert main([str(tmp_path / "a.txt"), "--output", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err
    assert "no eos token" in err and str(tmp_path / "tok") in err


def test_help_documents_every_flag(capsys) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in [
        "--output",
        "--tokenizer",
        "--vocab-size",
        "--seq-len",
        "--text-field",
        "--val-fraction",
        "--test-fraction",
        "--samples-per-shard",
        "--workers",
        "--seed",
        "--min-chars",
        "--limit-documents",
        "--overwrite",
        "--no-progress",
    ]:
        assert flag in text


def test_runs_as_a_module_with_exit_code_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipelines.text.prepare",
            str(tmp_path / "nope.txt"),
            "--output",
            str(tmp_path / "out"),
            "--vocab-size",
            "300",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert "input not found" in result.stderr and "nope.txt" in result.stderr and "Traceback" not in result.stderr
