"""Find input files and stream documents out of them, counting every record that is skipped.

Formats: plain text (one document per file), JSON lines / JSON arrays (optionally gzip),
Parquet, and Hugging Face `save_to_disk` directories. Bad records are skipped and counted,
never fatal; missing or unsupported inputs are fatal before any work starts.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from data_pipelines import limits

FORMATS: tuple[str, ...] = ("text", "jsonl", "json", "parquet", "hf_dataset")

# Skipped when walking a directory; an error when named explicitly.
BINARY_SUFFIXES: frozenset[str] = frozenset(
    """
    .pyc .pyo .pyd .so .dll .dylib .exe .o .a .lib .class .jar .whl .egg
    .png .jpg .jpeg .gif .bmp .webp .tif .tiff .ico .heic .avif .psd
    .mp3 .wav .flac .ogg .m4a .mp4 .avi .mov .mkv .webm
    .pdf .doc .docx .xls .xlsx .ppt .pptx .odt
    .gz .tgz .bz2 .xz .zst .lz4 .tar .zip .7z .rar
    .npy .npz .pt .pth .bin .safetensors .ckpt .h5 .hdf5 .pkl .pickle .onnx .msgpack
    .arrow .feather .db .sqlite .woff .woff2 .ttf .otf .eot
    """.split()
)
SKIPPED_DIRS: frozenset[str] = frozenset({"__pycache__"})
HF_DATASET_MARKERS: tuple[tuple[str, ...], ...] = (("dataset_dict.json",), ("dataset_info.json", "state.json"))

BINARY_SNIFF_BYTES = 8192
HF_BATCH_ROWS = 1000
MAX_DETAIL_CHARS = 200


class InputError(ValueError):
    """A missing, unsupported or unusable input; the message names the path."""


@dataclass(frozen=True)
class InputSpec:
    path: Path
    format: str
    bytes: int
    # Entries the walk passed over just before this input (symlinks, FIFOs, devices), as
    # (source, reason, detail): counted by every ScanReport of these inputs.
    walk_skips: tuple[tuple[str, str, str], ...] = field(default=(), compare=False, repr=False)


@dataclass
class InputStats:
    path: str
    format: str
    bytes: int
    documents: int = 0
    skipped: int = 0

    def to_manifest(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "bytes": self.bytes,
            "documents": self.documents,
            "skipped": self.skipped,
        }


@dataclass
class ScanReport:
    """Counts of documents and skipped records, per input and per reason."""

    inputs: list[InputStats]
    max_examples: int = 20
    by_reason: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def for_inputs(cls, specs: Sequence[InputSpec]) -> ScanReport:
        report = cls([InputStats(str(s.path), s.format, s.bytes) for s in specs])
        for spec in specs:  # what the walk passed over is no input's record: counted by reason only
            for source, reason, detail in spec.walk_skips:
                report.by_reason[reason] += 1
                if len(report.examples) < report.max_examples:
                    report.examples.append({"source": source, "reason": reason, "detail": _clip(detail)})
        return report

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.inputs)

    @property
    def skipped_total(self) -> int:
        return sum(self.by_reason.values())

    def skip(self, index: int, source: str, reason: str, detail: str, count: int = 1) -> None:
        self.inputs[index].skipped += count
        self.by_reason[reason] += count
        if len(self.examples) < self.max_examples:
            self.examples.append({"source": source, "reason": reason, "detail": _clip(detail)})

    def to_manifest(self) -> dict[str, Any]:
        return {
            "total": self.skipped_total,
            "by_reason": dict(sorted(self.by_reason.items())),
            "examples": list(self.examples),
        }


def _clip(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Finding inputs


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any(all((path / m).is_file() for m in markers) for markers in HF_DATASET_MARKERS)


def detect_format(path: Path) -> str | None:
    """The reader for a path, or None for a binary or unsupported file."""
    if path.is_dir():
        return "hf_dataset" if is_hf_dataset_dir(path) else None
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith((".json", ".json.gz")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if path.suffix.lower() in BINARY_SUFFIXES:
        return None
    return "text"


def _spec(path: Path, fmt: str, skips: list[tuple[str, str, str]] | None = None) -> InputSpec:
    """The input at `path`, carrying (and emptying) the walk's `skips` gathered before it."""
    if fmt == "hf_dataset":
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    else:
        size = path.stat().st_size
    passed = tuple(skips or ())
    if skips:
        skips.clear()
    return InputSpec(path, fmt, size, passed)


def _entry_problem(path: Path, follow: bool) -> tuple[str, str] | None:
    try:
        return limits.file_problem(path, follow_symlinks=follow)
    except FileNotFoundError:  # a dangling symlink, or removed since listed
        return "unreadable", f"{path}: no such file"


def _walk(root: Path, skips: list[tuple[str, str, str]], seen: set[Path] | None = None) -> Iterator[InputSpec]:
    """Inputs under a directory in a stable order (a folder's files, then its sub-folders,
    each sorted by name), so runs are reproducible. Regular files only: symlinks (unless
    --follow-symlinks), FIFOs, devices and sockets are passed over into `skips`, never opened.
    Following symlinks, each real directory is walked once (no loops, no exponential walks)."""
    follow = limits.current().follow_symlinks
    seen = set() if seen is None else seen
    real = root.resolve()
    if real in seen:  # a symlink loop, or a second link to a folder already walked
        return
    seen.add(real)
    if is_hf_dataset_dir(root):
        # A dataset directory is one input; its arrow/json files are not documents.
        yield _spec(root, "hf_dataset", skips)
        return
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    dirs: list[Path] = []
    for path in entries:
        if path.is_symlink() and not follow:
            skips.append((str(path), limits.SYMLINK, f"{path} is a symbolic link (pass --follow-symlinks to read it)"))
        elif path.is_dir():
            if path.name not in SKIPPED_DIRS:
                dirs.append(path)
        elif (problem := _entry_problem(path, follow)) is not None:
            skips.append((str(path), *problem))
        elif (fmt := detect_format(path)) is not None:
            yield _spec(path, fmt, skips)
    for path in dirs:
        yield from _walk(path, skips, seen)


def _has_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def resolve_inputs(patterns: Sequence[str]) -> list[InputSpec]:
    """Expand files, directories (recursively) and globs into a de-duplicated, ordered list.

    Raises InputError for a missing path, an unmatched glob, an explicitly named
    unsupported file, or when nothing usable is found at all.
    """
    found: list[InputSpec] = []
    skips: list[tuple[str, str, str]] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.exists():
            if path.is_dir():
                found.extend(_walk(path, skips))
                continue
            if (problem := limits.file_problem(path, follow_symlinks=True)) is not None:
                raise InputError(f"unusable input {pattern}: {problem[1]}")
            fmt = detect_format(path)
            if fmt is None:
                raise InputError(
                    f"unsupported input file {pattern}: binary or unknown format "
                    f"(supported: text files, .jsonl, .json, .jsonl.gz, .json.gz, .parquet, "
                    f"datasets.save_to_disk directories)"
                )
            found.append(_spec(path, fmt))
        elif _has_glob(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise InputError(f"no files match input pattern {pattern}")
            for match in map(Path, matches):
                if match.is_dir():
                    found.extend(_walk(match, skips))
                elif (problem := _entry_problem(match, True)) is not None:
                    skips.append((str(match), *problem))
                elif (fmt := detect_format(match)) is not None:
                    found.append(_spec(match, fmt, skips))
        else:
            raise InputError(f"input not found: {pattern}")
    unique: dict[Path, InputSpec] = {}
    for spec in found:
        unique.setdefault(spec.path.resolve(), spec)
    if not unique:
        passed = f" (passed over: {_reasons(skips)})" if skips else ""
        raise InputError(f"no usable input files found in: {' '.join(patterns)}{passed}")
    specs = list(unique.values())
    if skips:  # passed over after the last input: carried by it
        last = specs[-1]
        specs[-1] = InputSpec(last.path, last.format, last.bytes, last.walk_skips + tuple(skips))
    return specs


def _reasons(skips: Sequence[tuple[str, str, str]]) -> str:
    counts = Counter(reason for _, reason, _ in skips)
    return ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items()))


# ---------------------------------------------------------------------------------------------
# Records -> text


class Rejected(NamedTuple):
    reason: str
    detail: str


def _as_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    return None


def _lookup(record: dict[str, Any], field_path: str) -> object | Rejected:
    # An exact key wins, so a flat key that itself contains a dot still works.
    if field_path in record:
        return record[field_path]
    current: object = record
    walked: list[str] = []
    for part in field_path.split("."):
        if not isinstance(current, dict) or part not in current:
            where = ".".join(walked) or "record"
            keys = sorted(map(str, current)) if isinstance(current, dict) else type(current).__name__
            return Rejected("missing_field", f"no {field_path!r}; {where} keys: {keys}")
        current = current[part]
        walked.append(part)
    return current


def extract_text(record: object, field_path: str) -> str | Rejected:
    """The text of one record: the record itself if it is a string (or list of strings),
    else the value at `field_path` (dotted for nested fields)."""
    if not isinstance(record, dict):
        text = _as_text(record)
        return text if text is not None else Rejected("not_text", f"record is {type(record).__name__}")
    value = _lookup(record, field_path)
    if isinstance(value, Rejected):
        return value
    if value is None:
        # Columnar stores (parquet, datasets) fill absent keys with null: treat it as missing.
        return Rejected("missing_field", f"{field_path!r} is null")
    text = _as_text(value)
    return text if text is not None else Rejected("not_text", f"{field_path!r} is {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Readers: each yields _Record (a parsed record) or _Skip (something that is not one).


class _Record(NamedTuple):
    source: str
    value: object


class _Skip(NamedTuple):
    source: str
    reason: str
    detail: str
    count: int = 1


_Item = _Record | _Skip


def _read_text_file(path: Path, _field: str) -> Iterator[_Item]:
    try:
        data = limits.read_regular(path, limits.current().max_document_bytes)
    except limits.TooLarge as exc:  # over --max-document-bytes, or no longer a regular file
        yield _Skip(str(path), exc.reason, str(exc))
        return
    except OSError as exc:  # permissions, a file removed mid-run
        yield _Skip(str(path), "unreadable", str(exc))
        return
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        yield _Skip(str(path), "binary", f"NUL byte in the first {BINARY_SNIFF_BYTES} bytes")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield _Skip(str(path), "not_utf8", f"invalid UTF-8 at byte {exc.start}")
        return
    yield _Record(str(path), text.removeprefix("\ufeff"))


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _bounded_lines(handle: Any, limit: int) -> Iterator[bytes | None]:
    """The lines of a binary handle, None for one over `limit` bytes (never held whole)."""
    while True:
        line, too_long = limits.readline_capped(handle, limit)
        if too_long:
            yield None
        elif not line:
            return
        else:
            yield line


def _parse_json_lines(path: Path, lines: Iterator[bytes | None]) -> Iterator[_Item]:
    limit = limits.current().max_document_bytes
    for lineno, raw in enumerate(lines, start=1):
        source = f"{path}:{lineno}"
        if raw is None:
            yield _Skip(source, limits.LINE_TOO_LONG, f"line over {limit:,} bytes (--max-document-bytes)")
            continue
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _Skip(source, "not_utf8", f"invalid UTF-8 at byte {exc.start} of the line")
            continue
        try:
            yield _Record(source, json.loads(line.removeprefix("\ufeff")))
        except json.JSONDecodeError as exc:
            yield _Skip(source, "invalid_json", str(exc))


def _read_json_lines(path: Path, _field: str) -> Iterator[_Item]:
    try:
        with _open_binary(path) as handle:
            yield from _parse_json_lines(path, _bounded_lines(handle, limits.current().max_document_bytes))
    except (OSError, EOFError) as exc:  # corrupt gzip, truncated file
        yield _Skip(str(path), "unreadable", str(exc))


def _first_significant_byte(path: Path) -> bytes:
    with _open_binary(path) as handle:
        while chunk := handle.read(4096):
            stripped = chunk.lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
            if stripped:
                return stripped[:1]
    return b""


def _read_json(path: Path, field_path: str) -> Iterator[_Item]:
    """A .json file is either one JSON array (of objects or strings) or JSON lines."""
    try:
        if _first_significant_byte(path) != b"[":
            yield from _read_json_lines(path, field_path)
            return
        # A single array cannot be streamed with the standard library; it is read whole, up to
        # --max-document-bytes (decompressed).
        limit = limits.current().max_document_bytes
        with _open_binary(path) as handle:
            raw = handle.read(limit + 1)
        if len(raw) > limit:
            yield _Skip(str(path), limits.TOO_LARGE, f"JSON array over {limit:,} bytes (--max-document-bytes)")
            return
    except (OSError, EOFError) as exc:
        yield _Skip(str(path), "unreadable", str(exc))
        return
    try:
        records = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as exc:
        yield _Skip(str(path), "not_utf8", f"invalid UTF-8 at byte {exc.start}")
        return
    except json.JSONDecodeError as exc:
        yield _Skip(str(path), "invalid_json", str(exc))
        return
    for row, record in enumerate(records):
        yield _Record(f"{path}:row {row}", record)


def _column_for(field_path: str, columns: Sequence[str]) -> str | None:
    if field_path in columns:
        return field_path
    head = field_path.split(".", 1)[0]
    return head if head in columns else None


def _missing_column(source: str, field_path: str, columns: Sequence[str], rows: int) -> _Skip:
    return _Skip(source, "missing_field", f"no {field_path!r}; columns: {sorted(columns)}", rows)


def _read_parquet(path: Path, field_path: str) -> Iterator[_Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        yield _Skip(str(path), "unreadable", str(exc))
        return
    columns = parquet.schema_arrow.names
    column = _column_for(field_path, columns)
    if column is None:
        yield _missing_column(str(path), field_path, columns, parquet.metadata.num_rows)
        return
    row = 0
    # One column, a few rows at a time. pyarrow still decodes a whole data page (and may buffer a
    # column chunk) of that column: a page of huge cells costs its size once.
    try:
        for batch in parquet.iter_batches(batch_size=limits.PARQUET_BATCH_ROWS, columns=[column]):
            for value in batch.column(0).to_pylist():
                yield _Record(f"{path}:row {row}", {column: value})
                row += 1
    except (OSError, pa.ArrowException) as exc:
        yield _Skip(f"{path}:row {row}", "unreadable", str(exc))


def _read_hf_dataset(path: Path, field_path: str) -> Iterator[_Item]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        yield _Skip(str(path), "unreadable", str(exc))
        return
    parts = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, dataset in parts:
        label = f"{path}[{split}]" if split is not None else str(path)
        column = _column_for(field_path, dataset.column_names)
        if column is None:
            yield _missing_column(label, field_path, dataset.column_names, dataset.num_rows)
            continue
        row = 0
        for batch in dataset.select_columns([column]).iter(batch_size=HF_BATCH_ROWS):
            for value in batch[column]:
                yield _Record(f"{label}:row {row}", {column: value})
                row += 1


_READERS: dict[str, Callable[[Path, str], Iterator[_Item]]] = {
    "text": _read_text_file,
    "jsonl": _read_json_lines,
    "json": _read_json,
    "parquet": _read_parquet,
    "hf_dataset": _read_hf_dataset,
}


def read_records(spec: InputSpec, field_path: str) -> Iterator[_Item]:
    """The raw records of one input, for readers of whole records (chat data): each has
    ``source`` and either ``value`` (the parsed record; parquet and datasets inputs give
    ``{field_path: value}``) or ``reason``, ``detail`` and ``count`` (what could not be read)."""
    return _READERS[spec.format](spec.path, field_path)


# ---------------------------------------------------------------------------------------------
# Documents


def iter_documents(
    specs: Sequence[InputSpec],
    text_field: str,
    min_chars: int,
    report: ScanReport,
    warn: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Yield the text of every usable document, in input order, recording skips in `report`."""
    for index, spec in enumerate(specs):
        stats = report.inputs[index]
        records = 0
        missing = 0
        missing_detail = ""
        for item in _READERS[spec.format](spec.path, text_field):
            if isinstance(item, _Skip):
                report.skip(index, item.source, item.reason, item.detail, item.count)
                if item.reason == "missing_field":
                    records += item.count
                    missing += item.count
                    missing_detail = item.detail
                continue
            records += 1
            text = extract_text(item.value, text_field)
            if isinstance(text, Rejected):
                report.skip(index, item.source, text.reason, text.detail)
                if text.reason == "missing_field":
                    missing += 1
                    missing_detail = missing_detail or text.detail
                continue
            if len(text) > limits.current().max_document_bytes:
                report.skip(index, item.source, limits.TOO_LARGE, f"{len(text):,} characters (--max-document-bytes)")
                continue
            if not text.strip() or len(text) < min_chars:
                report.skip(index, item.source, "empty", f"{len(text)} characters")
                continue
            stats.documents += 1
            yield text
        if records and missing == records:
            message = (
                f"text field {text_field!r} is missing from every record of {spec.path} "
                f"({missing_detail}); pass --text-field to choose another"
            )
            report.warnings.append(message)
            if warn is not None:
                warn(message)
