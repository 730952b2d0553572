"""pretrain-ckpt: look after a run's checkpoints from the shell.

    pretrain-ckpt verify RUN_DIR            # every sealed checkpoint of a run (or of its checkpoints/ folder)
    pretrain-ckpt verify RUN_DIR/checkpoints/step_00000100
    pretrain-ckpt verify RUN_DIR --json

``verify`` reads every file a checkpoint's seal (toolkit.json) lists and compares its size and
SHA-256 with the seal's, the check `--resume auto` makes before it loads one. Nothing is unpickled.
Exit status 0 when every checkpoint checked is intact (one sealed by an older version, without
checksums, is reported as such and counts as loadable), 1 when any is not, naming each bad file,
2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.runtime.ckpt_verify import NO_CHECKSUMS, SEAL, Verdict, verify_tag

TAG_PREFIX = "step_"


def _checkpoints_dir(path: Path) -> Path | None:
    for folder in (path / "checkpoints", path):
        if (folder / "latest").is_file() or any(p.name.startswith(TAG_PREFIX) for p in folder.glob(f"{TAG_PREFIX}*")):
            return folder
    return None


def _latest(folder: Path) -> str | None:
    f = folder / "latest"
    return f.read_text().strip() if f.is_file() else None


def _record(v: Verdict, latest: bool) -> dict:
    status = "ok" if v.verified else "unverified" if v.ok else "failed"
    return {
        "tag": v.tag.name,
        "path": str(v.tag),
        "latest": latest,
        "status": status,
        "files": v.files,
        "bytes": v.size,
        "problems": v.problems,
        "note": v.note,
    }


def verify(path: Path) -> tuple[list[dict], list[str]]:
    """Records for every checkpoint under ``path`` (a run, its checkpoints/ folder or one tag), and lines on
    tag folders that are not checkpoints (no seal: an interrupted or failed save, ignored by --resume)."""
    if (path / SEAL).is_file() or path.name.startswith(TAG_PREFIX):
        return [_record(verify_tag(path), _latest(path.parent) == path.name)], []
    folder = _checkpoints_dir(path)
    if folder is None:
        raise FileNotFoundError(f"{path}: no checkpoints here (not a run directory, checkpoints folder or tag)")
    latest = _latest(folder)
    records, unsealed = [], []
    for tag in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)):
        if not (tag / SEAL).is_file():
            unsealed.append(f"{tag.name}: not sealed (an interrupted or failed save): not a checkpoint, never loaded")
            continue
        records.append(_record(verify_tag(tag), tag.name == latest))
    if latest and not any(r["tag"] == latest for r in records):
        unsealed.append(f"latest names {latest!r}, not a sealed checkpoint: --resume auto takes the newest sealed one")
    return records, unsealed


def _line(r: dict) -> str:
    mark = " (latest)" if r["latest"] else ""
    if r["status"] == "ok":
        return f"ok      {r['tag']}{mark}: {r['files']} files, {r['bytes'] / 1e6:,.1f} MB, checksums match"
    if r["status"] == "unverified":
        return f"ok?     {r['tag']}{mark}: {NO_CHECKSUMS}: loadable, not verifiable"
    return f"FAILED  {r['tag']}{mark}:\n" + "\n".join(f"          {p}" for p in r["problems"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain-ckpt",
        description="Check a run's DeepSpeed checkpoints against the checksums in their seals (toolkit.json).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser(
        "verify",
        help="verify every sealed checkpoint of a run, or one checkpoint",
        description="Read every file a checkpoint's seal lists and compare its size and SHA-256 with the seal "
        "(nothing is unpickled). Exit 0: every checkpoint checked is intact (or sealed by an older version without "
        "checksums, which is said); 1: a file is missing, truncated or corrupted (each is named); 2: usage error.",
    )
    v.add_argument(
        "path",
        type=Path,
        help="a run directory, its checkpoints/ folder (every sealed checkpoint; the one `latest` names is marked), "
        "or one checkpoint (checkpoints/step_NNNNNNNN)",
    )
    v.add_argument("--json", action="store_true", help="print one JSON object (checkpoints, unsealed, ok) instead")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        records, unsealed = verify(args.path)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = all(r["status"] != "failed" for r in records) and bool(records)
    if args.json:
        print(json.dumps({"path": str(args.path), "checkpoints": records, "unsealed": unsealed, "ok": ok}, indent=2))
    else:
        for r in records:
            print(_line(r))
        for line in unsealed:
            print(f"note    {line}")
        if not records:
            print(f"{args.path}: no sealed checkpoint")
        else:
            bad = sum(r["status"] == "failed" for r in records)
            print(f"{len(records)} checkpoint(s) checked, {bad} failed" if bad else f"{len(records)} checkpoint(s) ok")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
