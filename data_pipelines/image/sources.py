"""Find image-text inputs and stream candidate samples out of them.

Three layouts are read:

- img2dataset output (`img2dataset`): `NNNNN.tar` shards holding `<key>.jpg`, `<key>.txt` and
  `<key>.json`, each next to `NNNNN.parquet` (one row per URL, failures included) and
  `NNNNN_stats.json`. Only successful downloads are in the tar; the failures are reported
  from the parquet (or, without one, counted from the stats file).
- a table (`table`): parquet, CSV or TSV with an image path column and a caption column;
  relative paths are resolved against the table's folder.
- a folder of images with sidecar captions (`folder`): `a/b.jpg` + `a/b.txt` (+ an optional
  `a/b.json`, as img2dataset's `files` output format writes).

Readers only read: decoding and checking images is the caller's job (in worker processes).
They yield `Item`s (a candidate sample, with its image bytes or the path to read them from)
and `Skip`s (something that cannot become a sample, with a reason), in a stable order.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from data_pipelines import limits
from data_pipelines.text.sources import InputError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TABLE_SUFFIXES: frozenset[str] = frozenset({".parquet", ".csv", ".tsv"})
# Extensions img2dataset can give the image member (its --encode_format).
TAR_IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
FORMATS: tuple[str, ...] = ("img2dataset", "table", "folder")

DEFAULT_IMAGE_FIELDS: tuple[str, ...] = ("image_path", "image", "path", "filepath")
DEFAULT_CAPTION_FIELDS: tuple[str, ...] = ("caption", "text", "title")
DEFAULT_LABEL_FIELD = "label"
DEFAULT_KEY_FIELD = "key"
# Fields of an img2dataset json (or a table row) carried into the output sample's json.
CARRIED_FIELDS: tuple[str, ...] = ("url", "original_width", "original_height")


@dataclass(frozen=True)
class ImageInputSpec:
    path: Path
    format: str


class Item(NamedTuple):
    """A candidate sample. Exactly one of `data` (bytes already read) and `path` is set."""

    source: str  # names the sample in messages: "shards/00000.tar:000000012", "pairs.csv:line 7"
    key: str
    caption: str | None
    data: bytes | None = None
    path: str | None = None
    extra: dict[str, Any] | None = None  # label, url, ...: copied into the output json


class Skip(NamedTuple):
    source: str
    reason: str
    detail: str
    count: int = 1


@dataclass(frozen=True)
class Fields:
    """Column names for tables; None means "detect from the defaults"."""

    image: str | None = None
    caption: str | None = None
    label: str = DEFAULT_LABEL_FIELD


# ---------------------------------------------------------------------------------------------
# Finding inputs


def _has_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _is_img2dataset_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet" and path.with_suffix(".tar").is_file()


def _has_images(root: Path) -> bool:
    for _dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in filenames if not f.startswith(".")):
            return True
    return False


def _classify(path: Path) -> list[ImageInputSpec]:
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
        if any(p.suffix.lower() == ".tar" for p in entries):
            return [ImageInputSpec(path, "img2dataset")]
        # Tables first: a folder holding pairs.csv and images/ means "the table describes them".
        tables = [p for p in entries if p.suffix.lower() in TABLE_SUFFIXES]
        if tables:
            return [ImageInputSpec(p, "table") for p in tables]
        if _has_images(path):
            return [ImageInputSpec(path, "folder")]
        raise InputError(f"input directory {path} holds no .tar shards, tables (.parquet/.csv/.tsv) or images")
    suffix = path.suffix.lower()
    if suffix == ".tar" or _is_img2dataset_parquet(path):
        return [ImageInputSpec(path.with_suffix(".tar"), "img2dataset")]
    if suffix in TABLE_SUFFIXES:
        return [ImageInputSpec(path, "table")]
    raise InputError(
        f"unsupported input file {path}: expected an img2dataset .tar shard, a .parquet/.csv/.tsv table, "
        f"or a directory of either or of images with sidecar .txt captions"
    )


def resolve_image_inputs(patterns: Sequence[str]) -> list[ImageInputSpec]:
    """Expand paths and globs into a de-duplicated, ordered list of inputs; InputError names
    the first missing or unsupported one."""
    found: list[ImageInputSpec] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.exists():
            found.extend(_classify(path))
        elif _has_glob(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise InputError(f"no files match input pattern {pattern}")
            for match in map(Path, matches):
                # A glob like shards/* also matches the parquet and stats files beside each tar.
                if match.is_file() and (match.name.endswith("_stats.json") or _is_img2dataset_parquet(match)):
                    continue
                found.extend(_classify(match))
        else:
            raise InputError(f"input not found: {pattern}")
    unique: dict[Path, ImageInputSpec] = {}
    for spec in found:
        unique.setdefault(spec.path.resolve(), spec)
    return list(unique.values())


# ---------------------------------------------------------------------------------------------
# img2dataset


def _tar_groups(path: Path) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {extension: bytes}) for consecutive tar members sharing a key, the webdataset way:
    the key is the member path up to the first dot of its file name. A member whose size header
    is over --max-member-bytes is passed over unread (its value None)."""
    cap = limits.current().max_member_bytes
    current: str | None = None
    group: dict[str, bytes | None] = {}
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            dirname, base = os.path.split(member.name)
            prefix, _, ext = base.partition(".")
            key = f"{dirname}/{prefix}" if dirname else prefix
            if member.size > cap:
                data: bytes | None = None
            else:
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
            if key != current:
                if current is not None:
                    yield current, group
                current, group = key, {}
            group[ext.lower()] = data
    if current is not None:
        yield current, group


def _parse_json(data: bytes | None) -> dict[str, Any]:
    if not data:
        return {}
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _extra(meta: dict[str, Any], label_field: str) -> dict[str, Any]:
    extra = {k: meta[k] for k in CARRIED_FIELDS if meta.get(k) is not None}
    label = meta.get(label_field)
    if label is not None and label != "":
        # CSV cells are strings: "3" is the class index 3.
        extra["label"] = int(label) if isinstance(label, str) and label.strip().lstrip("-").isdigit() else label
    return extra


def _read_status(parquet: Path) -> list[tuple[str, str, str]] | None:
    """(key, status, error_message) of every row of an img2dataset parquet, or None without one."""
    if not parquet.is_file():
        return None
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(parquet)
        columns = [c for c in ("key", "status", "error_message") if c in schema.names]
        if "key" not in columns or "status" not in columns:
            raise InputError(
                f"{parquet}: not an img2dataset parquet (needs 'key' and 'status' columns, has {schema.names})"
            )
        rows = [
            row
            for batch in pq.ParquetFile(parquet).iter_batches(batch_size=4096, columns=columns)
            for row in batch.to_pylist()
        ]
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {parquet}: {exc}") from None
    return [(str(r["key"]), str(r["status"]), str(r.get("error_message") or "")) for r in rows]


def _read_stats(path: Path) -> dict[str, Any] | None:
    if not path.exists() and not path.is_symlink():
        return None
    try:
        stats = json.loads(limits.read_regular(path, limits.current().max_sidecar_bytes).decode("utf-8"))
    except (OSError, ValueError) as exc:  # TooLarge, UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InputError(f"cannot read {path}: {exc}") from None
    return stats if isinstance(stats, dict) else None


def img2dataset_shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.tar")) if path.is_dir() else [path]


def _iter_img2dataset_shard(tar_path: Path, fields: Fields) -> Iterator[Item | Skip]:
    in_tar: set[str] = set()
    try:
        for tar_key, group in _tar_groups(tar_path):
            source = f"{tar_path}:{tar_key}"
            oversized = sorted(ext for ext, data in group.items() if data is None)
            if oversized:
                cap = limits.current().max_member_bytes
                yield Skip(source, limits.TOO_LARGE, f"members {oversized} over {cap:,} bytes (--max-member-bytes)")
                continue
            meta = _parse_json(group.get("json"))
            key = str(meta.get("key") or tar_key)
            in_tar.add(key)
            image_ext = next((e for e in TAR_IMAGE_EXTS if e in group), None)
            if image_ext is None:
                yield Skip(source, "missing_image", f"no image member (has {sorted(group)})")
                continue
            if (txt := group.get("txt")) is not None:
                try:
                    caption: str | None = txt.decode("utf-8")
                except UnicodeDecodeError as exc:  # kept, it would train on U+FFFD in place of the text
                    yield Skip(source, "caption_not_utf8", f"caption is not UTF-8 ({exc})")
                    continue
            else:
                caption = meta.get("caption") if isinstance(meta.get("caption"), str) else None
            yield Item(source, key, caption, data=group[image_ext], extra=_extra(meta, fields.label))
    except (tarfile.TarError, OSError, EOFError) as exc:
        # A truncated download: keep what was read, report the rest of the shard as lost.
        yield Skip(str(tar_path), "corrupt_shard", f"{type(exc).__name__}: {exc}")

    status = _read_status(tar_path.with_suffix(".parquet"))
    if status is not None:
        for key, state, message in status:
            if state != "success":
                yield Skip(f"{tar_path.with_suffix('.parquet')}:{key}", "failed_download", f"{state}: {message}")
            elif key not in in_tar:
                yield Skip(
                    f"{tar_path}:{key}", "missing_image", "listed as a success in the parquet but not in the tar"
                )
        return
    stats = _read_stats(tar_path.with_name(f"{tar_path.stem}_stats.json"))
    if stats is not None:
        failed = int(stats.get("count", 0)) - int(stats.get("successes", 0))
        if failed > 0:
            errors = stats.get("status_dict") or {}
            yield Skip(
                f"{tar_path.with_name(f'{tar_path.stem}_stats.json')}",
                "failed_download",
                f"{failed} failed per the stats file: {errors}",
                count=failed,
            )


def _iter_img2dataset(spec: ImageInputSpec, fields: Fields) -> Iterator[Item | Skip]:
    named = not spec.path.is_dir()  # a shard named on the command line may be a symlink
    for tar_path in img2dataset_shards(spec.path):
        try:
            problem = limits.file_problem(tar_path, follow_symlinks=True if named else None)
        except FileNotFoundError:
            problem = ("corrupt_shard", f"{tar_path}: no such file")
        if problem is not None:  # a FIFO or device is never opened: tarfile would wait on it
            yield Skip(str(tar_path), *problem)
            continue
        yield from _iter_img2dataset_shard(tar_path, fields)


# ---------------------------------------------------------------------------------------------
# Tables


def _pick(
    columns: Sequence[str], explicit: str | None, defaults: Sequence[str], what: str, flag: str, path: Path
) -> str:
    if explicit is not None:
        if explicit not in columns:
            raise InputError(f"{path}: no {what} column {explicit!r} ({flag}); columns: {list(columns)}")
        return explicit
    for name in defaults:
        if name in columns:
            return name
    raise InputError(
        f"{path}: no {what} column; looked for {list(defaults)}, found {list(columns)}; name it with {flag}"
    )


def _table_rows(path: Path) -> tuple[list[str], Iterator[tuple[str, dict[str, Any]]]]:
    """The column names and (row name, row) pairs of a table."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {path}: {exc}") from None
        names = list(pf.schema_arrow.names)

        def parquet_rows() -> Iterator[tuple[str, dict[str, Any]]]:
            i = 0
            for batch in pf.iter_batches(batch_size=limits.PARQUET_BATCH_ROWS):
                for row in batch.to_pylist():
                    yield f"row {i}", row
                    i += 1

        return names, parquet_rows()

    delimiter = "\t" if suffix == ".tsv" else ","
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
        reader = csv.DictReader(handle, delimiter=delimiter)
        names = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None

    def csv_rows() -> Iterator[tuple[str, dict[str, Any]]]:
        with handle:
            try:
                for row in reader:
                    yield f"line {reader.line_num}", row
            except (UnicodeDecodeError, csv.Error) as exc:
                raise InputError(f"{path}:line {reader.line_num}: {exc}") from None

    return names, csv_rows()


def check_table(path: Path, fields: Fields) -> tuple[str, str]:
    """The (image, caption) columns a table will be read with; InputError if it has none."""
    names, rows = _table_rows(path)
    if hasattr(rows, "close"):
        rows.close()
    return (
        _pick(names, fields.image, DEFAULT_IMAGE_FIELDS, "image path", "--image-field", path),
        _pick(names, fields.caption, DEFAULT_CAPTION_FIELDS, "caption", "--caption-field", path),
    )


def _iter_table(spec: ImageInputSpec, fields: Fields) -> Iterator[Item | Skip]:
    path = spec.path
    names, rows = _table_rows(path)
    image_col = _pick(names, fields.image, DEFAULT_IMAGE_FIELDS, "image path", "--image-field", path)
    caption_col = _pick(names, fields.caption, DEFAULT_CAPTION_FIELDS, "caption", "--caption-field", path)
    base = path.parent
    for where, row in rows:
        source = f"{path}:{where}"
        value = row.get(image_col)
        if value is None or str(value).strip() == "":
            yield Skip(source, "missing_image", f"empty {image_col!r}")
            continue
        image_path = Path(str(value).strip())
        full = image_path if image_path.is_absolute() else base / image_path
        try:  # a regular file inside the table's folder (unless --follow-symlinks), never opened here
            problem = limits.file_problem(full, root=base)
        except FileNotFoundError:
            problem = None  # the worker reports it as missing_image
        if problem is not None:
            yield Skip(source, *problem)
            continue
        caption = row.get(caption_col)
        key = row.get(DEFAULT_KEY_FIELD) if DEFAULT_KEY_FIELD in names else None
        yield Item(
            source,
            str(key if key not in (None, "") else image_path.as_posix()),
            None if caption is None else str(caption),
            path=str(full),
            extra=_extra(row, fields.label),
        )


# ---------------------------------------------------------------------------------------------
# Folders with sidecar captions


def _walk_images(root: Path, seen: set[Path] | None = None) -> Iterator[Path | Skip]:
    """Images under a folder in a stable order: a folder's files, then its sub-folders, by name.
    Regular files only: symlinks (unless --follow-symlinks), FIFOs and devices are skipped and
    counted; following symlinks, each real directory is walked once (no loops, no blow-up)."""
    follow = limits.current().follow_symlinks
    seen = set() if seen is None else seen
    real = root.resolve()
    if real in seen:
        return
    seen.add(real)
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    dirs: list[Path] = []
    for path in entries:
        if path.is_symlink() and not follow:
            if path.suffix.lower() in IMAGE_SUFFIXES or path.is_dir():
                yield Skip(str(path), limits.SYMLINK, f"{path} is a symbolic link (pass --follow-symlinks)")
        elif path.is_dir():
            dirs.append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            try:
                problem = limits.file_problem(path, follow_symlinks=follow)
            except FileNotFoundError:
                problem = ("missing_image", f"{path}: no such file")
            yield path if problem is None else Skip(str(path), *problem)
    for path in dirs:
        yield from _walk_images(path, seen)


def _read_sidecar(path: Path, root: Path) -> bytes | None:
    """A sidecar's bytes (None without one); `TooLarge` for one that must not be read."""
    try:
        return limits.read_regular(path, limits.current().max_sidecar_bytes, root)
    except FileNotFoundError:
        return None


def _iter_folder(spec: ImageInputSpec, fields: Fields) -> Iterator[Item | Skip]:
    for image in _walk_images(spec.path):
        if isinstance(image, Skip):
            yield image
            continue
        key = image.relative_to(spec.path).with_suffix("").as_posix()
        sidecar = image.with_suffix(".txt")
        meta_path = image.with_suffix(".json")
        try:
            raw = _read_sidecar(sidecar, spec.path)
            meta_raw = _read_sidecar(meta_path, spec.path)
        except limits.TooLarge as exc:
            yield Skip(str(image), exc.reason, f"sidecar: {exc}")
            continue
        except OSError as exc:
            yield Skip(str(image), "missing_caption", f"cannot read {sidecar}: {exc}")
            continue
        if raw is None:
            yield Skip(str(image), "missing_caption", f"no sidecar caption {sidecar.name}")
            continue
        try:
            caption = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as read_text did
        except UnicodeDecodeError as exc:
            yield Skip(str(image), "caption_not_utf8", f"{sidecar.name} is not UTF-8 ({exc})")
            continue
        meta = _parse_json(meta_raw)
        yield Item(str(image), key, caption, path=str(image), extra=_extra(meta, fields.label))


READERS = {"img2dataset": _iter_img2dataset, "table": _iter_table, "folder": _iter_folder}


def iter_items(spec: ImageInputSpec, fields: Fields) -> Iterator[Item | Skip]:
    """Candidate samples and skipped records of one input, in a stable order."""
    return READERS[spec.format](spec, fields)
