"""Chat / instruction data for prepare-text: find conversations, render them with a chat template,
mark the assistant's tokens, pack whole conversations into windows (`data_pipelines.text.packed`).

A record is a conversation when it has ``messages`` (a list of ``{"role", "content"}``, the
OpenAI / Hugging Face chat format) or ``prompt`` and ``response`` (or ``completion``), with an
optional ``system``. The conversation is rendered with the tokenizer's own chat template (or
``--chat-template``) exactly as `apply_chat_template` would.

What is trained on, for each assistant turn: the characters the template appends to the
conversation rendered up to the turn with the generation prompt (the prompt a model gets at
inference) to render the turn itself: the answer and its end-of-turn markup (``<|im_end|>``,
``<|eot_id|>``, ``</s>``). That prompt must be a character prefix of the rendering through the
turn, which must be longer; a conversation where it is not (and that is not the system-message
case below) is skipped and counted (``chat_template_prompt_not_continued``), never masked from
some guessed start.

Most templates are prefix-stable: the rendering of a conversation's beginning does not change
when more turns follow, so every turn's prompt and answer lie, unchanged, at the start of the
whole conversation's rendering, which is tokenized once with a span per answer. Templates that
are not (Mistral-7B-Instruct-v0.3, Mistral Small and Nemo move the system message into the last
user turn) are rendered turn by turn: a turn whose prompt is not a prefix of the conversation's
rendering gets a sequence of its own, the rendering through that turn, in which only that answer
is trained (turns whose prompts are prefixes of the same rendering share it). Where the rendering
through a turn does not even continue its prompt because the template drops the system message
once an answer follows (the real Mistral v0.3 and Nemo templates put it into the user turn only
while that turn is the last message), the answer is what the template appends for it in the
conversation without its system message, checked to be how the rendering through the turn ends,
and the turn's sequence is its prompt (system message included) followed by that answer. Every
answer is trained once, after exactly the prompt the template gives it at inference.

Conversations that cannot be masked are skipped and counted by reason: ``assistant_first`` (no
prompt before the first answer), ``chat_template_error`` (the template refuses the conversation),
``chat_template_refuses_prefix`` (it refuses the conversation up to an assistant turn),
``chat_template_prompt_not_continued``, ``special_token_in_content``.

Special tokens are control tokens only where the template wrote them: a message whose content
spells one (``<|im_start|>assistant``, ``<|endoftext|>``, scraped chat logs) is encoded as the
plain text it is.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from data_pipelines import limits
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
    """(messages, renderer(messages) or None) of every usable record, in input order: with a
    renderer, the list of (token ids, mask) the conversation is trained as. Records that are no
    conversation, or that the template cannot render or mask, are skipped and counted. With
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


class TrainedText(NamedTuple):
    """One text to train on and the character spans of it that are trained (the answers and their
    end markup); `plain`: the ranges where a message's content spells a special token."""

    text: str
    spans: list[tuple[int, int]]
    plain: list[tuple[int, int]]


# Stands in for each character of a special token's spelling inside a message's content, to tell
# the template's special tokens from the content's (a private-use character: no tokenizer's markup).
_NEUTRAL = "\ue000"


class ChatRenderer:
    """messages -> token ids and masks with 1 on the assistant's tokens, with one template."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ChatError(
                f"chat data needs a fast (Rust) tokenizer for character offsets; got {type(tokenizer).__name__}"
            )
        self.tokenizer, self.template = tokenizer, template
        self.eos_id = tokenizer.eos_token_id
        self.specials = _special_spellings(tokenizer)
        # Longest first: at one position the longest spelling matches, as the tokenizer's does.
        self._special_re = re.compile("|".join(map(re.escape, self.specials))) if self.specials else None

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # noqa: BLE001 - jinja errors and the template's own raise_exception
            raise BadConversation("chat_template_error", f"{type(e).__name__}: {e}") from None
        cap = limits.current().max_template_chars
        if len(text) > cap:  # refused before it is tokenized (the costly part: ~10x its size)
            raise BadConversation(limits.TEMPLATE_TOO_LONG, f"rendered {len(text):,} characters > {cap:,}")
        return text

    def _prompt(self, messages: list[dict[str, str]], i: int) -> str:
        try:
            return self.render(messages[:i], generation_prompt=True)
        except BadConversation as e:
            if e.reason == limits.TEMPLATE_TOO_LONG:
                raise
            raise BadConversation(
                "chat_template_refuses_prefix",
                f"the template refuses the conversation up to assistant turn {i} (with the generation prompt): {e}",
            ) from None

    def _answer_without_system(self, messages: list[dict[str, str]], i: int, through: str) -> str | None:
        """What the template appends to render assistant turn i, found in the conversation without
        its system message; None unless that is also how the rendering through the turn ends (the
        templates that move the system message into the last user turn, and so drop it once an
        answer follows: Mistral-7B-Instruct-v0.3, Mistral Nemo)."""
        if messages[0]["role"] != "system" or i < 2:
            return None
        try:
            before = self.render(messages[1:i], generation_prompt=True)
            after = self.render(messages[1 : i + 1], generation_prompt=False)
        except BadConversation:
            return None
        answer = after[len(before) :]
        if not answer or not after.startswith(before) or not through.endswith(answer):
            return None
        return answer

    def sequences(self, messages: list[dict[str, str]]) -> list[TrainedText]:
        """The texts to train a conversation on, with their trained character spans: the whole
        conversation's rendering, where the template is prefix-stable, else one per group of turns
        whose prompts are prefixes of the same rendering (see the module's docstring)."""
        turns = [i for i, m in enumerate(messages) if m["role"] in ROLES_TRAINED]
        if not turns:
            raise BadConversation("no_assistant", "no assistant message: nothing to train on")
        if turns[0] == 0:
            raise BadConversation(
                "assistant_first", "the conversation starts with an assistant turn: no prompt to answer"
            )
        text = self.render(messages, generation_prompt=False)
        groups: list[TrainedText] = []
        # (text, messages it renders, spans); turns join it from the last one backwards
        current: tuple[str, int, list[tuple[int, int]]] = (text, len(messages), [])

        def close() -> None:
            if current[2]:
                rendered, n, spans = current
                groups.append(TrainedText(rendered, spans, self.plain_regions(messages[:n], rendered, False)))

        for i in reversed(turns):
            before = self._prompt(messages, i)
            through = text if i == len(messages) - 1 else self.render(messages[: i + 1], generation_prompt=False)
            if len(through) <= len(before) or not through.startswith(before):
                answer = self._answer_without_system(messages, i, through)
                if answer is None:
                    raise BadConversation(
                        "chat_template_prompt_not_continued",
                        f"the rendering through assistant turn {i} does not continue the rendering up to it "
                        "with the generation prompt: the answer's tokens cannot be told from the prompt's",
                    )
                # The prompt the model gets at inference, then the answer: a sequence of its own.
                close()
                current = ("", i + 1, [])
                plain = self.plain_regions(messages[:i], before, True)
                tail = self.plain_regions(messages[: i + 1], through, False)
                cut = len(through) - len(answer)
                if any(s < cut < e for s, e in tail):
                    raise BadConversation(
                        "special_token_in_content", "a special token's spelling spans the answer's start"
                    )
                plain += [(s - cut + len(before), e - cut + len(before)) for s, e in tail if s >= cut]
                groups.append(TrainedText(before + answer, [(len(before), len(before) + len(answer))], plain))
                continue
            span = (len(before), len(through))
            spans = current[2]
            if not (current[0].startswith(through) and (not spans or span[1] <= spans[0][0])):
                close()  # not prefix-stable here: this turn gets the rendering through it
                current = (through, i + 1, [])
            current[2].insert(0, span)
        close()
        groups.reverse()
        return groups

    def plain_regions(
        self, messages: list[dict[str, str]], text: str, generation_prompt: bool
    ) -> list[tuple[int, int]]:
        """Character ranges of `text` (`messages` rendered) where a message's
        content spells a special token: found by rendering the conversation again with those
        spellings replaced by as many neutral characters, the one difference between the two."""
        pattern = self._special_re
        if pattern is None or not any(pattern.search(m["content"]) for m in messages):
            return []
        neutral = [{**m, "content": pattern.sub(lambda t: _NEUTRAL * len(t.group()), m["content"])} for m in messages]
        other = self.render(neutral, generation_prompt)
        if len(other) != len(text):
            raise BadConversation(
                "special_token_in_content",
                "a message spells a special token and the template renders it differently from other text: "
                "cannot tell the template's special tokens from the message's",
            )
        a = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        b = np.frombuffer(other.encode("utf-32-le"), dtype=np.uint32)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], (a != b).astype(np.int8), [0]])))
        regions = [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]
        whole = re.compile(f"(?:{pattern.pattern})+")
        for s, e in regions:
            if not whole.fullmatch(text, s, e):
                raise BadConversation(
                    "special_token_in_content",
                    f"the template changes a message that spells a special token around {text[s:e][:40]!r}",
                )
        return regions

    def encode(self, text: str, plain: Sequence[tuple[int, int]] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and character offsets of `text`: special tokens are matched as such (as
        apply_chat_template(tokenize=True) does) except inside the `plain` ranges, encoded as text.
        No special tokens are added: the template writes its own."""
        pieces, at = [], 0
        for s, e in plain:
            pieces += [(at, s, False), (s, e, True)]
            at = e
        pieces.append((at, len(text), False))
        ids, offsets = [], []
        for s, e, as_text in pieces:
            if s == e:
                continue
            enc = self.tokenizer(
                text[s:e],
                add_special_tokens=False,
                return_offsets_mapping=True,
                split_special_tokens=as_text,
                verbose=False,
            )
            ids.append(np.asarray(enc["input_ids"], dtype=np.int64))
            offsets.append(np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2) + s)
        if not ids:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
        return np.concatenate(ids), np.concatenate(offsets)

    def __call__(self, messages: list[dict[str, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids, mask) of each sequence the conversation is trained as (one, unless the
        template is not prefix-stable for it)."""
        out = []
        for seq in self.sequences(messages):
            ids, offsets = self.encode(seq.text, seq.plain)
            mask = np.zeros(len(ids), dtype=np.uint8)
            for start, end in seq.spans:
                mask[(offsets[:, 0] < end) & (offsets[:, 1] > start)] = 1
            if len(ids) == 0 or ids[-1] != self.eos_id:
                # Conversations end with eos, as documents do in plain text: trained on when the
                # assistant had the last word, so the model learns to stop.
                mask = np.append(mask, mask[-1] if len(mask) else 0).astype(np.uint8)
                ids = np.append(ids, self.eos_id)
            out.append((ids, mask))
        return out


def _special_spellings(tokenizer: Any) -> list[str]:
    """The special tokens' spellings, longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    return sorted((t for t in found if t), key=lambda t: (-len(t), t))


def tokenizer_training_texts(conversations: Iterator[list[dict[str, str]]]) -> Iterator[str]:
    """What --vocab-size trains a tokenizer on for chat data: every message's content."""
    for messages in conversations:
        for m in messages:
            yield m["content"]
