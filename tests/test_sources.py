"""Finding inputs and reading documents from every supported format, bad records included."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.text.sources import InputError, Rejected, ScanReport, extract_text, iter_documents, resolve_inputs


def read_all(paths: list[Path], field: str = "text", min_chars: int = 1) -> tuple[list[str], ScanReport]:
    specs = resolve_inputs([str(p) for p in paths])
    report = ScanReport.for_inputs(specs)
    warnings: list[str] = []
    docs = list(iter_documents(specs, field, min_chars, report, warnings.append))
    assert warnings == report.warnings
    return docs, report


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- resolve_inputs ---------------------------------------------------------------------------


def test_walk_is_recursive_sorted_and_skips_hidden_binary_and_cache(tmp_path: Path) -> None:
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / ".git").mkdir()
    for rel in [
        "a.txt",
        "b/deeper/c.md",
        "b/x.py",
        "data.jsonl",
        "rows.parquet",
        "notes.unknownext",
        "img.png",
        "mod.pyc",
        "archive.tar.gz",
        ".hidden.txt",
        "__pycache__/m.txt",
        ".git/HEAD",
    ]:
        (tmp_path / rel).write_bytes(b"x")
    specs = resolve_inputs([str(tmp_path)])
    got = [(s.path.relative_to(tmp_path).as_posix(), s.format) for s in specs]
    assert got == [
        ("a.txt", "text"),
        ("data.jsonl", "jsonl"),
        ("notes.unknownext", "text"),
        ("rows.parquet", "parquet"),
        ("b/x.py", "text"),
        ("b/deeper/c.md", "text"),
    ]
    assert all(s.bytes == 1 for s in specs)


def test_globs_and_duplicates(tmp_path: Path) -> None:
    for name in ["one.txt", "two.txt", "three.md"]:
        (tmp_path / name).write_text(name)
    specs = resolve_inputs([str(tmp_path / "*.txt"), str(tmp_path / "one.txt"), str(tmp_path / "t*")])
    assert [s.path.name for s in specs] == ["one.txt", "two.txt", "three.md"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: str(d / "nope.txt"), "input not found: .*nope.txt"),
        (lambda d: str(d / "*.nothing"), "no files match .*nothing"),
        (lambda d: (d / "pic.png").write_bytes(b"\x89PNG") and str(d / "pic.png"), "unsupported input file .*pic.png"),
        (lambda d: (d / "empty").mkdir() or str(d / "empty"), "no usable input files"),
    ],
)
def test_input_errors_name_the_path(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(InputError, match=message):
        resolve_inputs([make(tmp_path)])


# --- extract_text -----------------------------------------------------------------------------


def test_extract_text_shapes() -> None:
    assert extract_text("plain", "text") == "plain"
    assert extract_text({"text": ["a", "b"]}, "text") == "a\nb"
    assert extract_text({"meta": {"body": "deep"}}, "meta.body") == "deep"
    assert extract_text({"meta.body": "flat wins", "meta": {"body": "deep"}}, "meta.body") == "flat wins"
    missing = extract_text({"title": "t", "body": "b"}, "text")
    assert missing == Rejected("missing_field", "no 'text'; record keys: ['body', 'title']")
    nested_missing = extract_text({"meta": {"title": "t"}}, "meta.body")
    assert isinstance(nested_missing, Rejected) and "meta keys: ['title']" in nested_missing.detail
    assert extract_text({"text": 3}, "text") == Rejected("not_text", "'text' is int")
    assert extract_text({"text": None}, "text").reason == "missing_field"
    assert extract_text([1, 2], "text").reason == "not_text"


# --- formats ----------------------------------------------------------------------------------


def test_text_files_one_document_each_with_bad_files_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first document\nline two\n")
    (tmp_path / "b.md").write_text("   \n\t")
    (tmp_path / "c.txt").write_bytes(b"caf\xe9 latin-1")
    (tmp_path / "d.txt").write_bytes(b"abc\x00def")
    (tmp_path / "e.txt").write_bytes("\ufeffwith bom".encode())
    docs, report = read_all([tmp_path])
    assert docs == ["first document\nline two\n", "with bom"]
    assert dict(report.by_reason) == {"empty": 1, "not_utf8": 1, "binary": 1}
    sources = {e["reason"]: e["source"] for e in report.examples}
    assert sources["not_utf8"].endswith("c.txt") and sources["binary"].endswith("d.txt")


def test_jsonl_bad_lines_are_counted_with_sources(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            json.dumps({"text": "good one"}),
            "{not json",
            json.dumps({"body": "wrong field", "id": 1}),
            json.dumps({"text": 42}),
            "",
            json.dumps({"text": "  "}),
            json.dumps("a bare string record"),
            json.dumps({"text": "short"}),
        ],
    )
    with path.open("ab") as handle:
        handle.write(b'{"text": "caf\xe9"}\n')
    docs, report = read_all([path], min_chars=6)
    assert docs == ["good one", "a bare string record"]
    assert dict(report.by_reason) == {"invalid_json": 1, "missing_field": 1, "not_text": 1, "empty": 2, "not_utf8": 1}
    by_reason = {e["reason"]: e for e in report.examples}
    assert by_reason["invalid_json"]["source"] == f"{path}:2"
    assert by_reason["missing_field"]["source"] == f"{path}:3"
    assert "['body', 'id']" in by_reason["missing_field"]["detail"]
    assert by_reason["not_utf8"]["source"] == f"{path}:9"
    assert report.inputs[0].documents == 2 and report.inputs[0].skipped == 6
    assert report.warnings == []


def test_warning_when_field_missing_everywhere(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"content": f"doc {i}", "id": i}) for i in range(3)])
    docs, report = read_all([path])
    assert docs == [] and report.by_reason["missing_field"] == 3
    assert len(report.warnings) == 1
    assert str(path) in report.warnings[0] and "'content', 'id'" in report.warnings[0]


def test_json_array_of_objects_and_of_strings(tmp_path: Path) -> None:
    (tmp_path / "objs.json").write_text(json.dumps([{"text": "alpha"}, {"other": 1}, {"text": "beta"}], indent=2))
    (tmp_path / "strs.json").write_text("  \n" + json.dumps(["gamma", "delta"]))
    (tmp_path / "lines.json").write_text(json.dumps({"text": "epsilon"}) + "\n" + json.dumps({"text": "zeta"}))
    docs, report = read_all([tmp_path / "objs.json", tmp_path / "strs.json", tmp_path / "lines.json"])
    assert docs == ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    assert report.examples[0]["source"] == f"{tmp_path / 'objs.json'}:row 1"
    assert [s.format for s in resolve_inputs([str(tmp_path / "objs.json")])] == ["json"]


def test_gzipped_json_lines_and_array(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps({"text": f"zipped {i}"}) for i in range(3)) + "\n{broken\n")
    with gzip.open(tmp_path / "b.json.gz", "wt", encoding="utf-8") as handle:
        json.dump([{"text": "array in gzip"}], handle)
    (tmp_path / "corrupt.jsonl.gz").write_bytes(b"not gzip at all")
    docs, report = read_all([tmp_path / "a.jsonl.gz", tmp_path / "b.json.gz", tmp_path / "corrupt.jsonl.gz"])
    assert docs == ["zipped 0", "zipped 1", "zipped 2", "array in gzip"]
    assert dict(report.by_reason) == {"invalid_json": 1, "unreadable": 1}
    assert [s.format for s in report.inputs] == ["jsonl", "json", "jsonl"]


def test_nested_dotted_field(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "n.jsonl",
        [
            json.dumps({"meta": {"body": "nested text"}}),
            json.dumps({"meta": {"title": "no body"}}),
            json.dumps({"meta": {"body": ["joined", "lines"]}}),
        ],
    )
    docs, report = read_all([path], field="meta.body")
    assert docs == ["nested text", "joined\nlines"]
    assert report.examples[0]["reason"] == "missing_field" and "meta keys: ['title']" in report.examples[0]["detail"]


def test_parquet_by_row_groups_with_nested_column(tmp_path: Path) -> None:
    table = pa.table(
        {
            "text": [f"row {i}" for i in range(9)] + [None, "", "last"],
            "meta": [{"body": f"body {i}"} for i in range(12)],
        }
    )
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=4)
    assert pq.ParquetFile(path).num_row_groups == 3
    docs, report = read_all([path])
    assert docs == [f"row {i}" for i in range(9)] + ["last"]
    assert dict(report.by_reason) == {"missing_field": 1, "empty": 1}
    assert report.examples[0]["source"] == f"{path}:row 9"
    nested, _ = read_all([path], field="meta.body")
    assert nested == [f"body {i}" for i in range(12)]
    none, missing = read_all([path], field="content")
    assert none == [] and missing.by_reason["missing_field"] == 12
    assert "['meta', 'text']" in missing.warnings[0]


def test_hf_dataset_and_dataset_dict_directories(tmp_path: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    single = datasets.Dataset.from_dict({"text": ["hf one", "hf two", ""], "n": [1, 2, 3]})
    single.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["dd train"]}),
            "validation": datasets.Dataset.from_dict({"text": ["dd val a", "dd val b"]}),
        }
    ).save_to_disk(str(tmp_path / "nested" / "dict"))
    (tmp_path / "plain.txt").write_text("plain file")
    specs = resolve_inputs([str(tmp_path)])
    assert [(s.path.name, s.format) for s in specs] == [
        ("plain.txt", "text"),
        ("dict", "hf_dataset"),
        ("single", "hf_dataset"),
    ]
    assert specs[1].bytes > 0
    docs, report = read_all([tmp_path])
    assert docs == ["plain file", "dd train", "dd val a", "dd val b", "hf one", "hf two"]
    assert report.examples == [{"source": f"{tmp_path / 'single'}:row 2", "reason": "empty", "detail": "0 characters"}]
    assert [s.documents for s in report.inputs] == [1, 3, 2]


def test_examples_are_capped_but_counts_are_not(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ["{bad"] * 50)
    _, report = read_all([path])
    assert report.by_reason["invalid_json"] == 50 and len(report.examples) == 20
    assert report.to_manifest()["total"] == 50
