"""The recipe's data section -> the data object a family's loaders read, checked before any rank starts.

``data.path`` naming a prepared folder opens it as before (`family.open_data`). Anything else (a
raw folder, a pattern, a URL, or ``data.sources`` / ``data.eval_sources``) goes through
`data_pipelines.sources`. Either way an evaluation split that would be empty is refused here,
with the reason, rather than logging ``val loss nan`` hours later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pretrain.run.config import DataConfig, Recipe, SourceConfig

KIND = {"gpt": "text", "clip": "image-text"}
MAKER = {"gpt": "prepare-text", "clip": "prepare-image-text or make-synthetic-image-text"}


def _specs(configs: list[SourceConfig], key: str):
    from data_pipelines.sources import SourceSpec

    return [
        SourceSpec(
            urls=c.urls if isinstance(c.urls, str) else tuple(c.urls),
            name=c.name,
            weight=c.weight,
            samples=c.samples,
            tokens=c.tokens,
            key=f"{key}[{i}]",
        )
        for i, c in enumerate(configs)
    ]


def uses_sources(d: DataConfig) -> bool:
    """Whether the data goes through data_pipelines.sources rather than one prepared folder."""
    from data_pipelines.sources import is_prepared

    return bool(
        d.sources
        or d.eval_sources
        or d.holdout_fraction
        or (d.path and not is_prepared(d.path) and _looks_like_source(d.path))
    )


def _looks_like_source(path: str) -> bool:
    """A pattern, a URL or an existing raw folder; a plain missing folder keeps the old message."""
    return (
        any(c in path for c in "{*?[")
        or "://" in path
        or path.startswith("pipe:")
        or Path(path).is_dir()
        or Path(path).is_file()
    )


def open_data(recipe: Recipe, family) -> tuple[Any, list[str], list[str]]:
    """(data object or None, problems naming their keys, notes for the log)."""
    from data_pipelines.sources import FetchPolicy, SourceError, one_source_string, open_sources

    d = recipe.data
    problems: list[str] = []
    notes: list[str] = []
    if recipe.task == "classify":
        data, problems = _open_image_folder(d, family)
        if not recipe.model.init_from:
            problems.append(
                "model.init_from: task classify fine-tunes a pretrained CLIP (its zero-shot head comes "
                "from the text tower); pass --init-from DIR, a local Hugging Face CLIP directory"
            )
        return data, problems, notes
    maker = MAKER[recipe.family]
    if not d.path and not d.sources:
        return (
            None,
            [
                f"data.path: not set; pass --data (a directory written by {maker}, a folder of raw shards, a "
                "pattern or a URL) or set data.sources"
            ],
            notes,
        )
    if not uses_sources(d):
        if not (Path(d.path) / "manifest.json").is_file():
            return None, [f"data.path: {d.path}/manifest.json not found; run {maker} first"], notes
        try:
            data = family.open_data(d.path)
        except (ValueError, KeyError) as e:
            return None, [f"data.path: {e}"], notes
        problems.extend(_empty_prepared_val(data, d.eval_split, "data.path"))
        data.fetch = FetchPolicy.of(d)
        return data, problems, notes
    specs = _specs(d.sources, "data.sources") if d.sources else one_source_string(d.path)
    try:
        data = open_sources(
            KIND[recipe.family],
            specs,
            _specs(d.eval_sources, "data.eval_sources"),
            d.holdout_fraction,
            train_split=d.train_split,
            eval_split=d.eval_split,
        )
    except SourceError as e:
        return None, str(e).splitlines(), notes
    data.caption_key = d.caption_key
    data.fetch = FetchPolicy.of(d)  # retries, backoff and stall timeout of every shard fetch
    problems.extend(_check_eval_split(data, d, notes, recipe.eval.max_samples))
    for src in data.sources:
        counted = (
            f"{src.samples:,} samples ({src.counted_from})"
            if src.samples is not None
            else f"sample count unknown (set {src.key}.samples if a schedule needs it)"
        )
        notes.append(f"data: source {src.name!r}: {len(src.shards)} shard(s), {counted}, weight {src.weight:g}")
    return data, problems, notes


def _open_image_folder(d: DataConfig, family) -> tuple[Any, list[str]]:
    """Task classify: data.path is a labelled image folder (data_pipelines.image.folder), not shards."""
    from data_pipelines.image.folder import FolderError

    if not d.path or d.sources:
        return None, ["data.path: task classify reads a labelled image folder (ROOT/<class>/*.jpg); pass --data ROOT"]
    try:
        return family.open_data(d.path, d), []
    except FolderError as e:
        return None, [f"data.path: {e}"]


def _empty_prepared_val(data, split: str, key: str) -> list[str]:
    info = data.manifest.get("splits", {}).get(split)
    if info is not None and not info.get("samples"):
        fraction = data.manifest.get(f"{split}_fraction")
        return [
            f"{key}: {data.root}'s {split!r} split is empty (prepared with --{split}-fraction {fraction}, too small "
            "for this corpus), so there is nothing to evaluate on; prepare again with a larger fraction, or name "
            "held-out data in data.eval_sources"
        ]
    return []


def _check_eval_split(data, d: DataConfig, notes: list[str], max_samples: int | None) -> list[str]:
    """An evaluation split that exists and, where its size can be known now, is not empty."""
    split = d.eval_split
    problems = []
    for src in data.eval_sources or [s for s in data.split_sources(split) if s.prepared is not None]:
        if src.samples == 0:
            problems.append(
                f"{src.key}: the {split!r} split of {src.prepared or src.name} is empty; nothing to evaluate on"
            )
    raw = [s for s in data.sources if s.prepared is None]
    if not data.shards(split):
        problems.append(
            f"data: nothing to evaluate on: the train sources have no {split!r} split of their own; set "
            "data.eval_sources, or data.holdout_fraction above 0 to hold out raw samples by key"
        )
    elif raw and data.holdout > 0 and not data.eval_sources:
        known = [s.samples for s in raw]
        if all(n is not None for n in known):
            expected = data.holdout * sum(known)
            if expected < 1:
                problems.append(
                    f"data.holdout_fraction: {data.holdout} of the raw sources' {sum(known):,} samples "
                    f"is {expected:.2f} samples, so the {split!r} split would be empty; raise it or set "
                    "data.eval_sources"
                )
        how = (
            "(the default; set data.holdout_fraction to change it, or data.eval_sources)"
            if d.holdout_fraction is None
            else ""
        )
        notes.append(
            f"data: {data.holdout:g} of the raw train sources' samples held out for {split} by a hash of "
            f"the sample's content, never trained on {how}".rstrip()
        )
        if max_samples is None:
            notes.append(
                f"data: each evaluation reads the raw train sources to their end to find the {split} keys; "
                "set eval.max_samples to stop once it has that many"
            )
    return problems


def empty_split_note(data, split: str) -> str:
    """Why an evaluation found no samples, in words, for the eval line that reports it."""
    origin = data.origin(split)
    return (
        f"the {split} split gave no samples to evaluate ({origin}); loss is null, not a number; hold out more "
        "(data.holdout_fraction) or name data.eval_sources"
    )


def open_eval_data(family, data_arg: str, checkpoint: str | None = None):
    """pretrain-eval's --data: a prepared folder as before, or one source string. For raw shards the
    val split is the held-out keys of the run that made ``checkpoint`` (its data.holdout_fraction
    and data.caption_key in resolved-config.json), so the evaluation never scores trained samples."""
    import json

    from data_pipelines.sources import AUTO_HOLDOUT, SourceError, is_prepared, one_source_string, open_sources
    from pretrain.runtime.checkpoint import RESOLVED, resolve_checkpoint

    if is_prepared(data_arg) or not _looks_like_source(data_arg):
        return family.open_data(data_arg)
    holdout, caption_key = None, "txt"
    ref = resolve_checkpoint(checkpoint) if checkpoint else None
    resolved = ref.run_dir / RESOLVED if ref is not None and ref.run_dir is not None else None
    if resolved is not None and resolved.is_file():
        run = json.loads(resolved.read_text())
        holdout = run.get("data", {}).get("holdout_fraction")
        caption_key = run.get("recipe", {}).get("data", {}).get("caption_key", "txt")
    try:
        data = open_sources(
            KIND[family.name], one_source_string(data_arg), holdout=AUTO_HOLDOUT if holdout is None else holdout
        )
    except SourceError as e:
        raise ValueError(str(e)) from None
    data.caption_key = caption_key
    return data
