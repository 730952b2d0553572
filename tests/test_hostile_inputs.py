"""Hostile inputs: files outside the input tree (symlinks, table paths), files that are no files
(FIFOs, devices), and inputs built to exhaust memory (huge tar members, lines, pixel counts,
rendered templates). Each is skipped and counted by reason, quickly and with bounded memory."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines import limits
from data_pipelines.image.decode import TooManyPixels, decode_rgb
from data_pipelines.image.process import ImageOptions, process_image
from data_pipelines.image.sources import Fields, ImageInputSpec, iter_items
from data_pipelines.text.sources import ScanReport, iter_documents, resolve_inputs

REPO = Path(__file__).resolve().parent.parent
HUGE = 128 << 20  # a 128 MiB member / line (twice the default caps): ~130 KB gzipped


@pytest.fixture(autouse=True)
def default_limits():
    previous = limits.configure(limits.Limits())
    yield
    limits.configure(previous)


def png(w: int = 40, h: int = 40, seed: int = 0) -> bytes:
    img = Image.frombytes("RGB", (w, h), bytes((i * 7 + seed * 31) % 256 for i in range(w * h * 3)))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png() -> bytes:
    """13,000 x 13,000 one-bit pixels: ~60 KB on disk, 507 MB once decoded to RGB."""
    buffer = io.BytesIO()
    Image.new("1", (13_000, 13_000)).save(buffer, format="PNG")
    return buffer.getvalue()


class Zeros(io.RawIOBase):
    """`size` zero bytes, read in pieces: a huge member without holding it."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def add_member(tar: tarfile.TarFile, name: str, data: bytes | None = None, size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else size
    tar.addfile(info, io.BytesIO(data) if data is not None else io.BufferedReader(Zeros(size)))


def gzipped_tar_with_huge_member(path: Path) -> None:
    with gzip.open(path, "wb", compresslevel=1) as raw, tarfile.open(fileobj=raw, mode="w|") as tar:
        add_member(tar, "000000000.png", size=HUGE)
        add_member(tar, "000000000.txt", b"the huge one")
        add_member(tar, "000000001.png", png())
        add_member(tar, "000000001.txt", b"a small one")


def peak_bytes(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------------------------
# Inputs escaping their tree


def test_text_walker_skips_and_counts_symlinks_and_fifos(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "a.txt").write_text("a document inside the root\n")
    (outside / "secret.txt").write_text("SECRET from outside\n")
    (root / "link.txt").symlink_to(outside / "secret.txt")
    (root / "up").symlink_to(outside)
    os.mkfifo(root / "fifo.txt")
    specs = resolve_inputs([str(root)])
    assert [s.path.name for s in specs] == ["a.txt"]
    report = ScanReport.for_inputs(specs)
    docs = list(iter_documents(specs, "text", 1, report))
    assert docs == ["a document inside the root\n"]
    assert report.by_reason == {"symlink": 2, "not_regular_file": 1}
    # --follow-symlinks reads them (each real folder once), still never the FIFO
    limits.configure(follow_symlinks=True)
    specs = resolve_inputs([str(root)])
    report = ScanReport.for_inputs(specs)
    docs = list(iter_documents(specs, "text", 1, report))
    assert sorted(docs) == ["SECRET from outside\n", "a document inside the root\n"]  # read once
    assert report.by_reason == {"not_regular_file": 1}


def test_two_parent_symlinks_do_not_make_the_image_walk_explode(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "d").mkdir(parents=True)
    (root / "d" / "a.png").write_bytes(png())
    (root / "d" / "a.txt").write_text("a caption")
    (root / "d" / "l1").symlink_to("..")
    (root / "d" / "l2").symlink_to("..")
    spec = ImageInputSpec(root, "folder")
    items = list(iter_items(spec, Fields()))
    assert sorted(getattr(i, "reason", "item") for i in items) == ["item", "symlink", "symlink"]
    limits.configure(follow_symlinks=True)
    items = list(iter_items(spec, Fields()))
    assert [i.key for i in items] == ["d/a"]  # each real folder walked once


def test_image_prepare_skips_outside_sidecars_fifos_and_huge_pngs(tmp_path: Path) -> None:
    root, outside, out = tmp_path / "imgs", tmp_path / "outside", tmp_path / "out"
    root.mkdir(), outside.mkdir()
    for i in range(4):
        (root / f"ok{i}.png").write_bytes(png(seed=i))
        (root / f"ok{i}.txt").write_text(f"caption {i}")
    (outside / "secret.txt").write_text("SECRET CAPTION")
    (root / "leak.png").write_bytes(png(seed=9))
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    (root / "fifo.png").write_bytes(png(seed=10))
    os.mkfifo(root / "fifo.txt")
    (root / "big.png").write_bytes(huge_png())
    (root / "big.txt").write_text("a bomb")
    (root / "loop1").symlink_to(".")
    (root / "loop2").symlink_to(".")
    code = "import sys; from data_pipelines.image.prepare import main; sys.exit(main(sys.argv[1:]))"
    argv = [str(root), "--output", str(out), "--no-progress", "--image-size", "32"]
    argv += ["--val-fraction", "0", "--test-fraction", "0"]
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejected"]["by_reason"] == {
        "symlink": 3,  # leak.txt (its image skipped), loop1, loop2
        "not_regular_file": 1,  # fifo.txt, never opened
        "too_many_pixels": 1,
    }
    assert manifest["splits"]["train"]["samples"] == 4
    shards = b"".join(p.read_bytes() for p in out.rglob("*.tar"))
    assert b"SECRET" not in shards


def test_table_rows_naming_devices_or_outside_files_are_skipped(tmp_path: Path) -> None:
    from data_pipelines.image.prepare import main

    table_dir, out = tmp_path / "t", tmp_path / "out"
    table_dir.mkdir()
    (tmp_path / "outside.png").write_bytes(png(seed=3))
    for i in range(3):
        (table_dir / f"{i}.png").write_bytes(png(seed=i))
    rows = ["image_path,caption", *(f"{i}.png,caption {i}" for i in range(3))]
    rows += ["/dev/zero,zeros forever", "../outside.png,from outside", "/dev/stdin,a terminal"]
    (table_dir / "pairs.csv").write_text("\n".join(rows) + "\n")
    argv = [str(table_dir / "pairs.csv"), "--output", str(out), "--no-progress", "--image-size", "32"]
    assert main([*argv, "--val-fraction", "0", "--test-fraction", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    # /dev/zero: a device, never opened; /dev/stdin: a symlink (to /proc/self/fd/0)
    assert manifest["rejected"]["by_reason"] == {"not_regular_file": 1, "outside_root": 1, "symlink": 1}
    assert manifest["splits"]["train"]["samples"] == 3


# ---------------------------------------------------------------------------------------------
# Inputs built to exhaust memory


@pytest.fixture(scope="module")
def huge_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shards = tmp_path_factory.mktemp("shards")
    gzipped_tar_with_huge_member(shards / "00000.tar")
    return shards / "00000.tar"


def test_a_huge_member_of_a_gzipped_tar_is_skipped_unread(huge_tar: Path) -> None:
    shards = huge_tar.parent
    assert (shards / "00000.tar").stat().st_size < 2 << 20
    items, peak = peak_bytes(lambda: list(iter_items(ImageInputSpec(shards, "img2dataset"), Fields())))
    assert [(type(i).__name__, i.reason if hasattr(i, "reason") else i.key) for i in items] == [
        ("Skip", "too_large"),
        ("Item", "000000001"),
    ]
    assert peak < 16 << 20, peak


def test_a_huge_member_of_a_training_shard_is_dropped_and_counted(huge_tar: Path) -> None:
    from data_pipelines.loader import SkipLog
    from data_pipelines.loader.shard_io import read_checked

    shard = huge_tar
    log = SkipLog()
    samples, peak = peak_bytes(lambda: list(read_checked([str(shard)], log, expected={str(shard): 2})))
    assert [s["__key__"] for s in samples] == ["000000001"]
    assert dict(log.counts) == {"too_large": 1}  # not also short_shard
    assert peak < 16 << 20, peak


def test_a_huge_jsonl_gz_line_is_skipped_in_bounded_pieces(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b'{"text": "first"}\n{"text": "')
        chunk = b"a" * (8 << 20)
        for _ in range(HUGE // len(chunk)):
            f.write(chunk)
        f.write(b'"}\n{"text": "last"}\n')
    limits.configure(max_document_bytes=1 << 20)
    specs = resolve_inputs([str(path)])
    report = ScanReport.for_inputs(specs)
    docs, peak = peak_bytes(lambda: list(iter_documents(specs, "text", 1, report)))
    assert docs == ["first", "last"]
    assert report.by_reason == {"line_too_long": 1}
    assert peak < 8 << 20, peak


def test_an_oversized_text_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_bytes(b"x" * 5000)
    (tmp_path / "small.txt").write_text("small")
    limits.configure(max_document_bytes=4096)
    specs = resolve_inputs([str(tmp_path)])
    report = ScanReport.for_inputs(specs)
    assert list(iter_documents(specs, "text", 1, report)) == ["small"]
    assert report.by_reason == {"too_large": 1}


def test_a_13000_px_square_png_is_refused_by_prepare_and_the_loaders() -> None:
    from data_pipelines.image.loader import _try_decode
    from data_pipelines.image.transforms import decode_image
    from data_pipelines.loader import SkipLog

    data = huge_png()
    assert len(data) < 200_000
    result = process_image(data, None, ImageOptions())
    assert result.reason == "too_many_pixels" and "13000x13000" in result.detail
    with pytest.raises(TooManyPixels):
        decode_rgb(data)  # the evaluation decode
    with pytest.raises(TooManyPixels):
        decode_image(data, decoder="pillow")  # the training decode
    log = SkipLog()
    assert _try_decode({"png": data, "txt": b"x", "__key__": "k"}, log) is None
    assert sum(log.counts.values()) == 1
    # the cap is a setting: raised, the same image decodes
    limits.configure(max_image_pixels=13_000 * 13_000)
    assert process_image(png(), None, ImageOptions()).reason is None


def test_prepare_flags_set_the_caps_and_refuse_nonsense(tmp_path: Path) -> None:
    from data_pipelines.image.prepare import main

    code = textwrap.dedent(
        """
        import sys
        from data_pipelines.image.prepare import build_parser
        print(build_parser().format_help())
        """
    )
    help_text = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True).stdout
    for flag in ("--max-member-bytes", "--max-image-pixels", "--max-sidecar-bytes", "--follow-symlinks"):
        assert flag in help_text
    assert main([str(tmp_path), "--output", str(tmp_path / "o"), "--max-image-pixels", "0"]) == 2


def test_an_over_long_rendered_chat_template_is_refused(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from data_pipelines.text.chat import BadConversation, ChatRenderer
    from data_pipelines.text.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(["hello there user assistant"] * 20, 300).save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ 'x' * 300000 }}\n{% endfor %}"
    limits.configure(max_template_chars=100_000)
    renderer = ChatRenderer(tokenizer, template)
    with pytest.raises(BadConversation) as e:
        renderer([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "there"}])
    assert e.value.reason == "chat_template_too_long"


def test_the_simplejpeg_path_checks_pixels_from_the_jpeg_header() -> None:
    import io

    from PIL import Image

    from data_pipelines.image.transforms import decode_image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, format="JPEG")
    before = limits.current()
    try:
        limits.configure(max_image_pixels=64 * 48 - 1)
        for decoder in ("simplejpeg", "auto"):
            with pytest.raises(TooManyPixels):
                decode_image(buf.getvalue(), decoder=decoder)
        limits.configure(max_image_pixels=64 * 48)
        assert decode_image(buf.getvalue(), decoder="simplejpeg") is not None
    finally:
        limits.configure(before)


def test_a_sizes_json_over_the_sidecar_cap_is_not_read(tmp_path: Path) -> None:
    """OpenCLIP's sizes.json is read by every rank: past --max-sidecar-bytes it is left unread (the
    count is then unknown, or taken from elsewhere), never read whole."""
    from data_pipelines.sources import SourceSpec, resolve_source
    from tests.img2dataset_layout import write_img2dataset

    write_img2dataset(tmp_path, shards=1, per_shard=4, size=16, sidecars=False)
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 3, "padding": "x" * 4000}))
    assert resolve_source(SourceSpec(str(tmp_path))).samples == 3
    limits.configure(max_sidecar_bytes=1000)
    assert resolve_source(SourceSpec(str(tmp_path))).samples != 3
