"""Chat / instruction data for prepare-text: find conversations, render them with a chat template,
mark the assistant's tokens, pack whole conversations into windows (`data_pipelines.text.packed`).

A record is a conversation when it has ``messages`` (a list of ``{"role", "content"}``, the
OpenAI / Hugging Face chat format) or ``prompt`` and ``response`` (or ``completion``), with an
optional ``system``. The conversation is rendered with the tokenizer's own chat template (or
``--chat-template``) exactly as `apply_chat_template` would, and tokenized as one text. The
assistant's part of each turn is found by rendering the conversation up to the turn with the
generation prompt (what comes before the answer) and up to the end of the turn: the characters
in between, the end-of-turn markup included, are the answer; tokens overlapping them get mask 1.
This works with any template that renders a conversation's beginning the same whether or not
more turns follow, which chat templates do so that generation continues a rendered prompt.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from data_pipelines.text.sources import InputSpec, ScanReport, read_records

MESSAGES_FIELD = "messages"
PROMPT_FIELDS = ("prompt",)
RESPONSE_FIELDS = ("response", "completion")
ROLES_TRAINED = ("assistant",)
# Inputs whose records can be conversations; plain text files cannot.
CHAT_INPUT_FORMATS = ("jsonl", "json", "parquet", "hf_dataset")


class ChatError(ValueError):
    """Chat data that cannot be prepared as asked (no template, mixed inputs); names the culprit."""


class BadConversation(ValueError):
    """One record that is not a usable conversation; ``reason`` is its skip counter."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Records -> messages


def looks_like_chat(record: object) -> bool:
    if not isinstance(record, dict):
        return False
    if isinstance(record.get(MESSAGES_FIELD), list):
        return True
    return any(k in record for k in PROMPT_FIELDS) and any(k in record for k in RESPONSE_FIELDS)


def chat_messages(record: object) -> list[dict[str, str]]:
    """The conversation of a record as a list of {"role", "content"}; BadConversation if none."""
    if not isinstance(record, dict):
        raise BadConversation("not_chat", f"record is {type(record).__name__}, not an object")
    if MESSAGES_FIELD in record:
        raw = record[MESSAGES_FIELD]
        if not isinstance(raw, list) or not raw:
            raise BadConversation("bad_messages", f"{MESSAGES_FIELD!r} is {type(raw).__name__}, not a non-empty list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BadConversation(
                    "bad_messages", f"{MESSAGES_FIELD}[{i}] is not {{'role': str, 'content': str}}: {str(m)[:80]}"
                )
            messages.append({"role": m["role"], "content": m["content"]})
    else:
        prompt = next((record[k] for k in PROMPT_FIELDS if k in record), None)
        response = next((record[k] for k in RESPONSE_FIELDS if k in record), None)
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise BadConversation(
                "not_chat",
                f"no {MESSAGES_FIELD!r} list and no string prompt/response; keys: {sorted(map(str, record))}",
            )
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if isinstance(record.get("system"), str):
            messages.insert(0, {"role": "system", "content": record["system"]})
    if not any(m["role"] in ROLES_TRAINED and m["content"].strip() for m in messages):
        raise BadConversation("no_assistant", "no non-empty assistant message: nothing to train on")
    return messages


def canonical(messages: list[dict[str, str]]) -> bytes:
    """The bytes a conversation's split is decided by (its content, not its formatting)."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Detection


def _first_record(spec: InputSpec) -> object | None:
    for item in read_records(spec, MESSAGES_FIELD):
        if hasattr(item, "value"):
            return item.value
    return None


def _columns(spec: InputSpec) -> list[str]:
    if spec.format == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(spec.path).schema_arrow.names)
    import datasets

    loaded = datasets.load_from_disk(str(spec.path))
    parts = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    return sorted({c for part in parts for c in part.column_names})


def is_chat_input(spec: InputSpec) -> bool:
    """Whether an input holds conversations, judged by its first record (JSON) or its columns."""
    if spec.format not in CHAT_INPUT_FORMATS:
        return False
    if spec.format in ("parquet", "hf_dataset"):
        try:
            return MESSAGES_FIELD in _columns(spec)
        except Exception:  # noqa: BLE001 - an unreadable input is reported by the reader later
            return False
    return looks_like_chat(_first_record(spec))


def detect_format(specs: Sequence[InputSpec], requested: str) -> str:
    """ "chat" or "text" for --format auto (every input must agree); checks a forced "chat"."""
    if requested == "text":
        return "text"
    chat = {spec.path: is_chat_input(spec) for spec in specs}
    if requested == "chat":
        wrong = [str(s.path) for s in specs if s.format not in CHAT_INPUT_FORMATS]
        if wrong:
            raise ChatError(f"--format chat reads JSON/JSONL/parquet/datasets records; not: {', '.join(wrong[:5])}")
        return "chat"
    if all(chat.values()):
        return "chat"
    if any(chat.values()):
        yes = [str(p) for p, c in chat.items() if c][:3]
        no = [str(p) for p, c in chat.items() if not c][:3]
        raise ChatError(
            f"inputs mix chat records ({', '.join(yes)}) and plain text ({', '.join(no)}); "
            "prepare them separately or pass --format"
        )
    return "text"


def _records(specs: Sequence[InputSpec], report: ScanReport) -> Iterator[tuple[int, str, Any]]:
    """(input index, source, messages or _Failed) of every record that could be read."""
    for index, spec in enumerate(specs):
        for item in read_records(spec, MESSAGES_FIELD):
            if not hasattr(item, "value"):  # a skip: unreadable line, bad JSON...
                report.skip(index, item.source, item.reason, item.detail, item.count)
                continue
            try:
                yield index, item.source, chat_messages(item.value)
            except BadConversation as e:
                yield index, item.source, _Failed(e.reason, str(e))


def iter_conversations(
    specs: Sequence[InputSpec],
    report: ScanReport,
    limit: int | None = None,
    renderer: ChatRenderer | None = None,
    workers: int = 1,
) -> Iterator[tuple[list[dict[str, str]], Any]]:
    """(messages, renderer(messages) or None) of every usable record, in input order; records that
    are no conversation, or that the template cannot render, are skipped and counted. With
    ``workers`` > 1 the rendering runs in that many processes; the output is the same."""
    records = _records(specs, report)
    if renderer is None:
        results: Iterator = ((i, src, m, None) for i, src, m in records)
    elif workers <= 1:
        results = ((i, src, m, _render(renderer, m)) for i, src, m in records)
    else:
        results = _render_in_workers(records, renderer, workers)
    yielded = 0
    for index, source, messages, rendered in results:
        if limit is not None and yielded >= limit:
            return
        failed = messages if isinstance(messages, _Failed) else rendered
        if isinstance(failed, _Failed):
            report.skip(index, source, failed.reason, failed.detail)
            continue
        report.inputs[index].documents += 1
        yielded += 1
        yield messages, rendered


class _Failed(NamedTuple):
    """A BadConversation as it travels back from a worker (the exception itself does not pickle)."""

    reason: str
    detail: str


def _render(renderer: ChatRenderer, messages: Any) -> Any:
    if isinstance(messages, _Failed):
        return None
    try:
        return renderer(messages)
    except BadConversation as e:
        return _Failed(e.reason, str(e))


_worker_renderer: ChatRenderer | None = None
RENDER_BATCH = 256


def _init_worker(renderer: ChatRenderer) -> None:
    global _worker_renderer
    _worker_renderer = renderer


def _render_batch(batch: list[Any]) -> list[Any]:
    assert _worker_renderer is not None, "worker was not initialised"
    return [_render(_worker_renderer, m) for m in batch]


def _render_in_workers(
    records: Iterator[tuple[int, str, Any]], renderer: ChatRenderer, workers: int
) -> Iterator[tuple[int, str, Any, Any]]:
    """Batches of records rendered in a pool, yielded in input order; at most 4 batches per
    worker in flight (Pool.imap would read the whole input ahead)."""
    import multiprocessing

    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # forked children must not use the Rust thread pool
    try:
        with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(renderer,)) as pool:
            pending: deque = deque()

            def ready():
                batch, result = pending.popleft()
                for (index, source, messages), rendered in zip(batch, result.get()):
                    yield index, source, messages, rendered

            batch: list = []
            for record in records:
                batch.append(record)
                if len(batch) == RENDER_BATCH:
                    pending.append((batch, pool.apply_async(_render_batch, ([m for _, _, m in batch],))))
                    batch = []
                    if len(pending) >= 4 * workers:
                        yield from ready()
            if batch:
                pending.append((batch, pool.apply_async(_render_batch, ([m for _, _, m in batch],))))
            while pending:
                yield from ready()
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


# ---------------------------------------------------------------------------------------------
# The template


def load_template(value: str | None, tokenizer: Any, tokenizer_source: str) -> str:
    """--chat-template (a file, or the Jinja text itself), else the tokenizer's own template."""
    if value is not None:
        if "{{" in value or "{%" in value:
            return value
        path = Path(value)
        if not path.is_file():
            raise ChatError(f"--chat-template {value}: no such file (and not a Jinja template: no '{{{{' or '{{%')")
        return path.read_text(encoding="utf-8")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise ChatError(
            f"the tokenizer {tokenizer_source} has no chat template; pass --chat-template FILE "
            "(a Jinja template such as a model's chat_template.jinja)"
        )
    return template


# ---------------------------------------------------------------------------------------------
# Rendering with the loss mask


class ChatRenderer:
    """messages -> (token ids, mask with 1 on the assistant's tokens) with one template."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ChatError(
                f"chat data needs a fast (Rust) tokenizer for character offsets; got {type(tokenizer).__name__}"
            )
        self.tokenizer, self.template = tokenizer, template
        self.eos_id = tokenizer.eos_token_id

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # noqa: BLE001 - jinja errors and the template's own raise_exception
            raise BadConversation("chat_template_error", f"{type(e).__name__}: {e}") from None

    def assistant_spans(self, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
        """Character ranges of `text` (the whole conversation rendered) that the assistant wrote."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] not in ROLES_TRAINED:
                continue
            try:
                before = self.render(messages[:i], generation_prompt=True) if i else ""
            except BadConversation:  # some templates refuse an empty or odd prefix: the answer starts later
                before = ""
            through = text if i == len(messages) - 1 else self.render(messages[: i + 1], generation_prompt=False)
            start = len(os.path.commonprefix([before, text]))
            end = len(os.path.commonprefix([through, text]))
            if end <= start:
                raise BadConversation(
                    "chat_template_not_incremental",
                    f"the template renders the start of the conversation differently once turn {i} "
                    "follows; cannot locate the assistant's tokens",
                )
            spans.append((start, end))
        return spans

    def __call__(self, messages: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        text = self.render(messages, generation_prompt=False)
        spans = self.assistant_spans(messages, text)
        # Special tokens written by the template (<|im_start|>, bos) are matched as such, as
        # apply_chat_template(tokenize=True) does; add_special_tokens=False: the template adds its own.
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for start, end in spans:
            mask[(offsets[:, 0] < end) & (offsets[:, 1] > start)] = 1
        if len(ids) == 0 or ids[-1] != self.eos_id:
            # Conversations end with eos, as documents do in plain text: trained on when the
            # assistant had the last word, so the model learns to stop.
            mask = np.append(mask, mask[-1] if len(mask) else 0).astype(np.uint8)
            ids = np.append(ids, self.eos_id)
        return ids, mask


def tokenizer_training_texts(conversations: Iterator[list[dict[str, str]]]) -> Iterator[str]:
    """What --vocab-size trains a tokenizer on for chat data: every message's content."""
    for messages in conversations:
        for m in messages:
            yield m["content"]
