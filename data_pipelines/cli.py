"""What the data commands (prepare-text, prepare-image-text, make-synthetic-image-text) share:
the usage error, the help format, the checks of the flags they have in common, the rules for
the output directory, and main()'s error handling (exit 2 with one line, no traceback)."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from data_pipelines.manifest import MANIFEST_NAME
from data_pipelines.splits import SPLITS, validate_fractions


class UsageError(Exception):
    """A bad flag combination or output directory; reported without a traceback, exit 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults only where there is one worth showing (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def common_problems(*, val_fraction: float, test_fraction: float, samples_per_shard: int, seed: int, output: Path,
                    workers: int | None = None) -> list[str]:
    """Problems with the flags every data command has, named as the user typed them."""
    found: list[str] = []
    try:
        validate_fractions(val_fraction, test_fraction)
    except ValueError as exc:
        found.append(str(exc).replace("val_fraction", "--val-fraction").replace("test_fraction", "--test-fraction"))
    if samples_per_shard < 1:
        found.append("--samples-per-shard must be >= 1")
    if workers is not None and workers < 1:
        found.append("--workers must be >= 1")
    if not -(2**63) <= seed < 2**63:
        found.append("--seed must fit in a signed 64-bit integer")
    if output.exists() and not output.is_dir():
        found.append(f"--output {output} exists and is not a directory")
    return found


def prepare_output_dir(output: Path, overwrite: bool, owned: Iterable[str] = ()) -> None:
    """Create the output directory, refusing to mix a new dataset into an old one. With
    overwrite, the manifest goes first (an interrupted overwrite must not look complete), then
    the split folders and the other names the dataset ``owned``."""
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise UsageError(f"output directory {output} is not empty; pass --overwrite to replace its dataset")
        (output / MANIFEST_NAME).unlink(missing_ok=True)
        for name in (*owned, *SPLITS):
            path = output / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    output.mkdir(parents=True, exist_ok=True)


def run_main(prog: str, parser: argparse.ArgumentParser, argv: list[str] | None,
             start: Callable[[argparse.Namespace], Any], errors: tuple[type[BaseException], ...]) -> int:
    """Parse, run, and turn the command's own errors into one line on stderr and exit 2."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    try:
        start(args)
    except (UsageError, *errors) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0
