"""Get a tokenizer (load a local one, or train a byte-level BPE) and encode documents with it.

Every code path encodes with the copy saved in the output directory, in this process or in
worker processes, so what the trainer later loads is exactly what produced the shards.
"""

from __future__ import annotations

import os
from collections import deque
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence, TypeVar

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


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a local Hugging Face tokenizer directory; it must define an eos token."""
    from transformers import AutoTokenizer

    directory = Path(path)
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory not found: {directory}")
    try:
        # local_files_only: a typo must not turn into a download attempt of a hub repo id.
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TokenizerError(f"cannot load a tokenizer from {directory}: {exc}") from None
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise TokenizerError(
            f"tokenizer at {directory} has no eos token; documents are separated by it when packing"
        )
    return tokenizer


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, show_progress: bool = False
) -> PreTrainedTokenizerBase:
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
        list(texts),
        add_special_tokens=False,
        split_special_tokens=True,
        return_attention_mask=False,
        verbose=False,
    )["input_ids"]
    return [np.asarray(ids, dtype=np.int64) for ids in encoded]


# ---------------------------------------------------------------------------------------------
# Parallel encoding. Module-level state and functions so that any start method can use them.

_worker_tokenizer: PreTrainedTokenizerBase | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _encode_batch(batch: tuple[list[T], list[str]]) -> tuple[list[T], list[np.ndarray]]:
    tags, texts = batch
    assert _worker_tokenizer is not None, "worker was not initialised"
    return tags, encode_texts(_worker_tokenizer, texts)


def encode_batches(
    batches: Iterable[tuple[list[T], list[str]]],
    tokenizer_dir: str | os.PathLike[str],
    workers: int = 1,
) -> Iterator[tuple[list[T], list[np.ndarray]]]:
    """Encode (tags, texts) batches in order, in `workers` processes; tags pass through.

    Results come back in input order whatever `workers` is, so the output is identical.
    At most 4 batches per worker are in flight: Pool.imap would read the whole input
    iterator ahead into memory, which a large corpus cannot afford.
    """
    if workers <= 1:
        tokenizer = load_tokenizer(tokenizer_dir)
        for tags, texts in batches:
            yield tags, encode_texts(tokenizer, texts)
        return

    import multiprocessing

    # The parent may have used the Rust thread pool (training); forked children must not.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)) as pool:
            pending: deque[AsyncResult] = deque()
            for batch in batches:
                pending.append(pool.apply_async(_encode_batch, (batch,)))
                if len(pending) >= 4 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
