"""Get a tokenizer (load a local one, or train a byte-level BPE) and encode documents with it.

Every code path encodes with the copy saved in the output directory, in this process or in
worker processes, so what the trainer later loads is exactly what produced the shards.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

END_OF_TEXT = "<|endoftext|>"
# 256 byte symbols plus the end-of-text token: a byte-level BPE cannot be smaller.
MIN_VOCAB_SIZE = 257
UINT16_LIMIT = 2**16

T = TypeVar("T")


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded, trained or used; the message names the path."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary of this size."""
    return np.dtype(np.uint16) if vocab_size <= UINT16_LIMIT else np.dtype(np.uint32)


def load_tokenizer(path: str | os.PathLike[str], trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a local Hugging Face tokenizer directory; it must define an eos token. A directory whose
    tokenizer is its own Python code (auto_map) is refused unless ``trust_remote_code``: the
    argument is always passed, so transformers never asks y/N on stdin (a piped 'y' would run it)."""
    directory = Path(path)
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory not found: {directory}")
    try:
        # local_files_only: a typo must not turn into a download attempt of a hub repo id.
        tokenizer = _tokenizer_class(directory).from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not trust_remote_code and "trust_remote_code" in str(exc):
            raise TokenizerError(
                f"{directory}: loading this tokenizer would run Python code shipped in the directory (auto_map "
                "in tokenizer_config.json); refused. Only a command with --trust-remote-code runs such code "
                "(pretrain-train); the data commands never do"
            ) from None
        raise TokenizerError(f"cannot load a tokenizer from {directory}: {exc}") from None
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise TokenizerError(f"tokenizer at {directory} has no eos token; documents are separated by it when packing")
    return tokenizer


# The class names under which transformers saves a plain fast tokenizer (ours included): 4.x
# and 5.x respectively. AutoTokenizer would resolve either to PreTrainedTokenizerFast.
_PLAIN_FAST_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})


def _tokenizer_class(directory: Path) -> Any:
    """PreTrainedTokenizerFast for a directory whose tokenizer_config.json names a plain fast
    tokenizer, else AutoTokenizer. The result is the same class either way; the difference is
    that AutoTokenizer imports transformers' model-configuration code and with it torch, ~1 s
    of every data command that never uses torch."""
    try:
        with open(directory / "tokenizer_config.json", encoding="utf-8") as f:
            name = json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        name = None  # AutoTokenizer reports a missing or broken config itself
    if name in _PLAIN_FAST_CLASSES and (directory / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> PreTrainedTokenizerBase:
    """Train a GPT-2 style byte-level BPE with `<|endoftext|>` at id 0, streaming `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        # Seed all 256 byte symbols so any input, even unseen in training, stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike[str]) -> Path:
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(target))
    return target


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text, without special tokens (the packer adds eos itself).

    split_special_tokens: a literal "<|endoftext|>" inside a document is encoded as plain
    text, so document boundaries exist only where the packer puts them.
    """
    if not texts:
        return []
    encoded = tokenizer(
        list(texts), add_special_tokens=False, split_special_tokens=True, return_attention_mask=False, verbose=False
    )["input_ids"]
    return [np.asarray(ids, dtype=np.int64) for ids in encoded]


# The methods between a Hugging Face fast tokenizer's __call__ and its Rust backend (transformers
# 4 and 5). A class that overrides none of them encodes exactly as its backend does.
_CALL_PATH = (
    "__call__",
    "_call_one",
    "encode_plus",
    "batch_encode_plus",
    "_encode_plus",
    "_batch_encode_plus",
    "set_truncation_and_padding",
    "_convert_encoding",
)


def _plain_backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The Rust backend of a fast tokenizer whose class changes nothing on the way to it, else None."""
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    cls = type(tokenizer)
    if any(getattr(cls, name, None) is not getattr(PreTrainedTokenizerFast, name, None) for name in _CALL_PATH):
        return None
    return tokenizer.backend_tokenizer


class TextEncoder:
    """texts -> (all their token ids in one array, each text's length): the ids of `encode_texts`,
    concatenated.

    For a plain fast tokenizer it calls the Rust backend directly, on a private copy set up as
    the Hugging Face call above sets it (no truncation, no padding, special tokens matched as
    plain text), with `encode_batch_fast` where the installed `tokenizers` has it: the same ids
    without computing character offsets (~30% less time than `encode_batch` here). Any other
    tokenizer goes through `encode_texts`. Picklable, so a worker process can be handed one.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        backend = _plain_backend(tokenizer)
        self._tokenizer = tokenizer if backend is None else None
        self._backend: Any = None
        if backend is not None:
            self._use_backend(backend.to_str())

    def _use_backend(self, serialized: str) -> None:
        from tokenizers import Tokenizer

        self._backend = Tokenizer.from_str(serialized)
        self._backend.no_truncation()
        self._backend.no_padding()
        self._backend.encode_special_tokens = True
        self._encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)

    def __getstate__(self) -> dict[str, Any]:
        # The backend pickles as JSON, which leaves out encode_special_tokens: set up again on arrival.
        return {"tokenizer": self._tokenizer, "backend": None if self._backend is None else self._backend.to_str()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._tokenizer, self._backend = state["tokenizer"], None
        if state["backend"] is not None:
            self._use_backend(state["backend"])

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._backend is None:
            assert self._tokenizer is not None
            per_text: list[Any] = encode_texts(self._tokenizer, texts)
            dtype: type = np.int64
        else:
            per_text = [e.ids for e in self._encode(list(texts), add_special_tokens=False)] if texts else []
            dtype = np.uint32  # the backend's ids are u32: half the bytes back from a worker
        lengths = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
        flat = np.fromiter(itertools.chain.from_iterable(per_text), dtype=dtype, count=int(lengths.sum()))
        return flat, lengths


# ---------------------------------------------------------------------------------------------
# Parallel encoding. Module-level state and functions so that any start method can use them.

_worker_encoder: TextEncoder | None = None


def _init_worker(encoder: TextEncoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_batch(batch: tuple[T, Sequence[str]]) -> tuple[T, np.ndarray, np.ndarray]:
    tag, texts = batch
    assert _worker_encoder is not None, "worker was not initialised"
    return (tag, *_worker_encoder(texts))


def encode_batches(
    batches: Iterable[tuple[T, Sequence[str]]],
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str],
    workers: int = 1,
    on_start: Callable[[], Any] | None = None,
) -> Iterator[tuple[T, np.ndarray, np.ndarray]]:
    """Encode (tag, texts) batches in order, in `workers` processes: yield (tag, ids, lengths)
    per batch, ids being the batch's token ids end to end and lengths each text's count.

    `tokenizer`: a loaded tokenizer, or the directory to load it from. Worker processes get
    it from this process (inherited under fork, pickled otherwise), never load it again.
    Results come back in input order whatever `workers` is, so the output is identical;
    a bounded window of batches is in flight (`ordered_map`), never the whole input.
    `on_start` is called once the worker processes exist (with workers > 1 only).
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    encoder = TextEncoder(tokenizer)
    if workers <= 1:
        for tag, texts in batches:
            yield (tag, *encoder(texts))
        return

    from data_pipelines.workers import ordered_map

    # The parent may have used the Rust thread pool (training); forked children must not.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tasks = ((None, batch, sum(map(len, batch[1]))) for batch in batches)
        for _, result in ordered_map(
            _encode_batch, tasks, workers, initializer=_init_worker, initargs=(encoder,), on_start=on_start
        ):
            yield result
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def document_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The bos id this tokenizer starts an encoded text with (Llama, Mistral, Gemma: what generation,
    pipelines and evaluation harnesses prepend), put before every document; None for tokenizers that
    add none (GPT-2's byte-level BPE: documents are separated by eos alone)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos == tokenizer.eos_token_id:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None
