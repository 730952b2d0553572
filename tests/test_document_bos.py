"""Prepared text starts every document with the tokenizer's bos where the tokenizer adds one (Llama,
Mistral, Gemma: what generation, pipelines and evaluation harnesses prepend), the manifest records it,
and a model built for that data says that bos (issue 23 item 4). GPT-2 style tokenizers add none."""

from __future__ import annotations

import io
import json

import numpy as np
import webdataset as wds

from data_pipelines.text.prepare import main as prepare_main
from data_pipelines.text.tokenizer import document_bos


def _llama_style_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def test_every_document_starts_with_the_tokenizers_bos(stdlib_files, tmp_path):
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files[:20]]
    tok = _llama_style_tokenizer(texts)
    tok.save_pretrained(tmp_path / "tok")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert document_bos(tok) == bos
    out = tmp_path / "data"
    argv = [*map(str, stdlib_files[:20]), "--output", str(out), "--tokenizer", str(tmp_path / "tok")]
    assert prepare_main([*argv, "--seq-len", "64", "--val-fraction", "0.1", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["document_bos"] == bos
    windows = []
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            windows += [np.load(io.BytesIO(s["tokens.npy"])) for s in wds.WebDataset(str(out / shard))]
    stream = np.concatenate(windows)
    after_eos = stream[1:][stream[:-1] == eos]
    assert len(after_eos) > 10 and (after_eos == bos).mean() > 0.9  # window edges aside, bos follows every eos
    assert (stream == bos).sum() >= (stream == eos).sum() - len(windows)

    from pretrain.models.gpt import model_config
    from pretrain.run.config import ModelConfig

    config = model_config(ModelConfig(arch="llama", hidden_size=32, num_layers=1, num_heads=2), tok)
    assert config.bos_token_id == bos and config.eos_token_id == eos, "the export says the real bos"


def test_a_gpt2_style_tokenizer_adds_no_bos(prepared_stdlib):
    from transformers import AutoTokenizer

    manifest = json.loads((prepared_stdlib / "manifest.json").read_text())
    assert manifest["document_bos"] is None
    assert document_bos(AutoTokenizer.from_pretrained(prepared_stdlib / "tokenizer")) is None
