"""What an exported Hugging Face directory needs beside its weights, so that `transformers`
(`AutoTokenizer`, `pipeline`) uses it as it is, in transformers 4.x as in 5.x."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_tokenizer(tokenizer: Any, out: Path, model_max_length: int, append_eos: bool = False) -> None:
    """Save ``tokenizer`` with its real length limit (a pipeline then truncates or warns instead of
    indexing past the position table) and, with ``append_eos``, a post-processor that ends every
    text with the eos token (CLIP's text tower pools at the eos: without one, every prompt would
    pool at position 0). The config names ``PreTrainedTokenizerFast``, which both transformers 4.x
    and 5.x load (5.x writes ``TokenizersBackend``, unknown to 4.x)."""
    tokenizer.model_max_length = model_max_length
    if append_eos and not _appends_eos(tokenizer):
        from tokenizers.processors import TemplateProcessing

        eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, eos_id)]
        )
    if append_eos:
        _wrap_pre_tokenizer(tokenizer)
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_max_length"] = model_max_length
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _wrap_pre_tokenizer(tokenizer: Any) -> None:
    """transformers 4.x's CLIPProcessor always loads `CLIPTokenizerFast`, which refuses a backend
    whose pre-tokenizer is not a `Sequence` (OpenAI's layout). A one-element Sequence splits text
    exactly as the bare pre-tokenizer does."""
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    if backend.pre_tokenizer is not None and not isinstance(backend.pre_tokenizer, pre_tokenizers.Sequence):
        backend.pre_tokenizer = pre_tokenizers.Sequence([backend.pre_tokenizer])


def _appends_eos(tokenizer: Any) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[-1] == tokenizer.eos_token_id
