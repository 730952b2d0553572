"""The README.md an export carries: what the model is, what it was trained on and how far, how well
it did, and the commands that made it and that load it. Built only from the run's own files
(resolved-config.json, the checkpoint's seal, metrics.jsonl, the data's manifest.json); a file
that is gone leaves its section out rather than failing the export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_pipelines.sources.redact import redact
from pretrain.runtime.checkpoint import COMPLETE, RESOLVED, CheckpointRef


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_eval(run_dir: Path, step: int) -> dict | None:
    """The last val line logged at or before ``step`` (the checkpoint's own eval)."""
    last = None
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if m.get("split") == "val" and int(m.get("step", 0)) <= step:
            last = m
    return last


def _data_summary(path: str | None) -> list[str]:
    manifest = _read_json(Path(path) / "manifest.json") if path else None
    if manifest is None:
        return [f"- data: `{path}` (manifest.json not readable now)"] if path else []
    rows = [f"- data: `{path}` ({manifest.get('kind', '?')}, made by {manifest.get('created_by', '?')})"]
    for split, s in manifest.get("splits", {}).items():
        extra = ", ".join(f"{k} {s[k]:,}" for k in ("samples", "tokens", "documents") if isinstance(s.get(k), int))
        rows.append(f"  - {split}: {extra}")
    tok = manifest.get("tokenizer")
    if isinstance(tok, dict):
        rows.append(
            f"  - tokenizer: vocabulary {tok.get('vocab_size')}, "
            f"{'trained on the corpus' if tok.get('trained') else 'from ' + str(tok.get('source'))}"
        )
    return rows


def _metric_rows(ev: dict) -> list[str]:
    skip = {"step", "split", "tokens_seen", "train_loss", "gap"}
    rows = []
    for k, v in ev.items():
        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return rows


def render(
    ref: CheckpointRef, family: str, hf_config: Any, kind: str, command: str, adapter: dict | None = None
) -> str:
    """``kind``: "model" (a whole transformers model), "merged" (adapters folded in) or "adapter";
    ``command``: the export's command line."""
    run_dir = ref.run_dir
    resolved = _read_json(run_dir / RESOLVED) if run_dir else None
    seal = _read_json(ref.path / COMPLETE) or {}
    recipe = (resolved or {}).get("recipe", {})
    arch = (getattr(hf_config, "architectures", None) or [type(hf_config).__name__])[0]
    params = (resolved or {}).get("parameters", {})
    lines = [f"# {recipe.get('name', ref.path.name)} ({family}, {arch})", ""]
    loader = "CLIPModel" if family.startswith("clip") else "AutoModelForCausalLM"
    if kind == "adapter":
        base = (adapter or {}).get("base_model_name_or_path")
        lines += [
            "A LoRA adapter (peft). Load it on its base model:",
            "",
            "```python",
            "from peft import PeftModel",
            f"from transformers import {loader}",
            f"base = {loader}.from_pretrained({base!r})",
            "model = PeftModel.from_pretrained(base, THIS_DIRECTORY)  # .merge_and_unload() for a plain model",
            "```",
            "",
        ]
    else:
        what = "with its LoRA adapters merged into the weights" if kind == "merged" else ""
        lines += [f"A Hugging Face {arch} {what}".rstrip() + f"; `{loader}.from_pretrained(THIS_DIRECTORY)`.", ""]
    if family == "clip-classify":  # pretrain.models.clip_classify
        lines += [
            f"A classifier of {len(getattr(hf_config, 'id2label', {}))} classes (`config.id2label`): the linear "
            "head on the normalised image embedding is `classifier.safetensors` (weight, bias); "
            "`pretrain-eval --model THIS_DIRECTORY --image-folder ROOT` uses it.",
            "",
        ]
    lines += ["## Model", "", f"- family: {family}; model_type: {getattr(hf_config, 'model_type', '?')}"]
    if params:
        lines.append(f"- parameters: {params.get('total', 0):,} ({params.get('trainable', 0):,} trained)")
    model = recipe.get("model", {})
    if model.get("init_from"):
        lines.append(f"- fine-tuned from: `{model['init_from']}`")
    if model.get("lora"):
        lines.append(f"- LoRA: {json.dumps(model['lora'])}")
    lines += ["", "## Training", ""]
    if seal:
        lines.append(
            f"- checkpoint: `{ref.tag}`, step {seal.get('step')}, samples {seal.get('samples', 0):,}, "
            f"tokens {seal.get('tokens', 0):,}"
        )
    if resolved:
        lines.append(
            f"- {resolved.get('world_size')} rank(s), ZeRO-{resolved.get('zero_stage')}, "
            f"{resolved.get('precision')}, global batch {resolved.get('batch', {}).get('global_batch')}"
        )
        lines += _data_summary(redact(resolved.get("data", {}).get("path")))
    ev = _last_eval(run_dir, int(seal.get("step", 0))) if run_dir else None
    if ev:
        lines += [
            "",
            f"## Evaluation (val, step {ev.get('step')})",
            "",
            "| metric | value |",
            "|---|---|",
            *_metric_rows(ev),
        ]
    lines += ["", "## Made by", "", "```bash", command, "```"]
    if recipe:
        lines += [
            "",
            "<details><summary>recipe</summary>",
            "",
            "```json",
            json.dumps(recipe, indent=2),
            "```",
            "",
            "</details>",
        ]
    return "\n".join(lines) + "\n"
