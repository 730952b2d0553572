"""Chat / instruction data: prepare-text renders conversations with a chat template and stores
assistant-only loss masks; packed conversations neither see each other nor share positions; a
real training run computes its loss on the assistant's tokens only."""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.text.packed import IGNORE_INDEX, ConversationPacker, packed_batch, positions_in_segments
from data_pipelines.text.prepare import main as prepare_main
from tests.launch import REPO, metrics
from tests.launch import world_of_one as launch_world_of_one

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ASSISTANT_TURN = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)", re.S)


def _conversation(r: random.Random, i: int) -> dict:
    a, b = r.randint(0, 60), r.randint(0, 60)
    if i % 3 == 0:
        return {"prompt": f"Add {a} and {b}.", "response": f"The sum is {a + b}."}
    messages = [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
    ]
    if i % 3 == 2:
        messages += [
            {"role": "user", "content": f"And {b} plus {b}?"},
            {"role": "assistant", "content": f"{b} plus {b} is {2 * b}."},
        ]
    return {"messages": messages}


def _write_chat(path: Path, n: int, seed: int = 0) -> Path:
    r = random.Random(seed)
    path.write_text("".join(json.dumps(_conversation(r, i)) + "\n" for i in range(n)))
    return path


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE trained here, with ChatML's markers as special tokens and a chat template."""
    from data_pipelines.text.tokenizer import train_bpe_tokenizer

    r = random.Random(1)
    texts = [json.dumps(_conversation(r, i)) for i in range(300)]
    tok = train_bpe_tokenizer(texts, 400)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("tok") / "chat-tokenizer"
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, chat_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("chat")
    out = root / "data"
    argv = [
        str(_write_chat(root / "chat.jsonl", 600)),
        "--output",
        str(out),
        "--tokenizer",
        str(chat_tokenizer),
        "--seq-len",
        "96",
        "--val-fraction",
        "0.1",
        "--test-fraction",
        "0.0",
        "--samples-per-shard",
        "64",
        "--no-progress",
    ]
    assert prepare_main(argv) == 0
    return out


def _samples(shard: Path) -> list[dict[str, np.ndarray]]:
    by_key: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, name, _ = member.name.split(".")
            by_key.setdefault(key, {})[name] = np.load(io.BytesIO(tar.extractfile(member).read()))
    return list(by_key.values())


def test_prepare_detects_chat_renders_with_the_template_and_masks_assistant_tokens(chat_data):
    from transformers import AutoTokenizer

    manifest = json.loads((chat_data / "manifest.json").read_text())
    assert manifest["format"] == "chat" and manifest["chat"]["template"] == "tokenizer"
    train = manifest["splits"]["train"]
    assert train["documents"] + manifest["splits"]["val"]["documents"] == 600
    assert train["truncated_conversations"] == 0 and manifest["skipped"]["total"] == 0
    tok = AutoTokenizer.from_pretrained(chat_data / "tokenizer")
    assert tok.chat_template == CHATML, "the template travels with the dataset's tokenizer"
    samples = _samples(chat_data / train["shards"][0])
    assert sum(int(s["mask"].sum()) for s in samples) > 0
    for s in samples[:20]:
        tokens, mask, segments = s["tokens"], s["mask"], s["segments"]
        assert tokens.shape == mask.shape == segments.shape == (97,)
        assert (np.diff(segments.astype(int)) >= 0).all()
        text = tok.decode(tokens)
        # What is trained on is exactly each assistant turn (its end-of-turn marker included) and
        # the eos that closes a conversation the assistant ended.
        expected = "".join(m.group(1) for m in ASSISTANT_TURN.finditer(text))
        trained = tok.decode(tokens[mask == 1])
        assert trained.replace(tok.eos_token, "") == expected
        assert trained.count(tok.eos_token) == len(set(segments[mask == 1].tolist()))


def test_rendering_in_worker_processes_writes_the_same_shards(chat_data, chat_tokenizer, tmp_path):
    out = tmp_path / "w2"
    argv = [
        str(chat_data.parent / "chat.jsonl"),
        "--output",
        str(out),
        "--tokenizer",
        str(chat_tokenizer),
        "--seq-len",
        "96",
        "--val-fraction",
        "0.1",
        "--test-fraction",
        "0.0",
        "--samples-per-shard",
        "64",
        "--workers",
        "2",
        "--no-progress",
    ]
    assert prepare_main(argv) == 0
    shards = sorted(p.relative_to(chat_data) for p in chat_data.glob("*/shard-*.tar"))
    assert shards and shards == sorted(p.relative_to(out) for p in out.glob("*/shard-*.tar"))
    for shard in shards:
        assert (out / shard).read_bytes() == (chat_data / shard).read_bytes(), shard


def test_prompt_response_records_and_a_template_given_on_the_command_line(tmp_path, chat_tokenizer):
    from transformers import AutoTokenizer

    src = tmp_path / "pr.jsonl"
    src.write_text(
        "".join(
            json.dumps({"prompt": f"Say {i}.", "response": f"{i}.", "system": "Be brief."}) + "\n" for i in range(20)
        )
        + "not json\n"
        + json.dumps({"messages": [{"role": "user"}]})
        + "\n"
    )
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    out = tmp_path / "out"
    assert (
        prepare_main(
            [
                str(src),
                "--output",
                str(out),
                "--tokenizer",
                str(chat_tokenizer),
                "--chat-template",
                str(template),
                "--seq-len",
                "64",
                "--val-fraction",
                "0",
                "--test-fraction",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["chat"]["template"] == "--chat-template" and manifest["splits"]["train"]["documents"] == 20
    assert manifest["skipped"]["by_reason"] == {"bad_messages": 1, "invalid_json": 1}
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    first = _samples(out / manifest["splits"]["train"]["shards"][0])[0]
    seg0 = first["segments"] == 0
    assert tok.decode(first["tokens"][seg0]) == f"[system] Be brief.\n[user] Say 0.\n[assistant] 0.\n{tok.eos_token}"
    # " 0" is one token: one that overlaps the answer is trained on, so no part of the answer is lost
    assert tok.decode(first["tokens"][seg0 & (first["mask"] == 1)]) == f" 0.\n{tok.eos_token}"


def test_a_tokenizer_trained_on_chat_data_takes_the_template_given_inline(tmp_path, capsys):
    from transformers import AutoTokenizer

    src = _write_chat(tmp_path / "c.jsonl", 60)
    out = tmp_path / "out"
    common = [str(src), "--output", str(out), "--vocab-size", "300", "--seq-len", "128", "--no-progress"]
    assert prepare_main(common) == 2
    assert "a tokenizer trained with --vocab-size has no chat template; pass --chat-template" in capsys.readouterr().err
    assert prepare_main([*common, "--chat-template", CHATML]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["trained"] and manifest["splits"]["train"]["trained_tokens"] > 0
    assert AutoTokenizer.from_pretrained(out / "tokenizer").chat_template == CHATML


def test_no_chat_template_is_refused_naming_the_tokenizer_and_mixed_inputs_are_refused(
    tmp_path, chat_tokenizer, capsys
):
    from transformers import AutoTokenizer

    bare = tmp_path / "bare-tokenizer"
    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    tok.chat_template = None
    tok.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    src = _write_chat(tmp_path / "c.jsonl", 10)
    out = tmp_path / "out"
    assert prepare_main([str(src), "--output", str(out), "--tokenizer", str(bare), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"the tokenizer {bare} has no chat template; pass --chat-template" in err
    assert not out.exists(), "refused before the output directory is made"
    plain = tmp_path / "plain.txt"
    plain.write_text("just some text\n")
    assert (
        prepare_main([str(src), str(plain), "--output", str(out), "--tokenizer", str(chat_tokenizer), "--no-progress"])
        == 2
    )
    assert "mix chat records" in capsys.readouterr().err
    # --format text reads the same records as plain documents (their "text" field)
    assert (
        prepare_main(
            [str(src), "--output", str(out), "--tokenizer", str(chat_tokenizer), "--format", "text", "--no-progress"]
        )
        == 2
    )
    assert "text field 'text' is missing" in capsys.readouterr().err


def test_packer_keeps_conversations_whole_pads_and_counts_truncation():
    p = ConversationPacker(seq_len=9, pad_id=0)  # windows of 10
    ones = lambda n: np.ones(n, dtype=np.uint8)  # noqa: E731
    assert p.add(np.arange(1, 5), ones(4)) == []
    assert p.add(np.arange(5, 10), ones(5)) == []
    ((tokens, mask, segments),) = p.add(np.arange(10, 13), ones(3))  # does not fit: the window closes
    assert tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0] and mask.tolist() == [1] * 9 + [0]
    assert segments.tolist() == [0] * 4 + [1] * 5 + [2], "padding is a segment of its own"
    ((tokens, _, _),) = p.add(np.arange(100, 115), ones(15))  # closes [10, 11, 12]; itself cut to 10
    assert tokens.tolist() == [10, 11, 12] + [0] * 7
    ((tokens, _, segments),) = p.finish()
    assert tokens.tolist() == list(range(100, 110)) and segments.tolist() == [0] * 10
    assert (p.documents, p.windows, p.truncated, p.truncated_tokens, p.padding_tokens) == (4, 3, 1, 5, 8)


def test_packed_batch_labels_only_assistant_tokens_of_the_same_conversation_and_restarts_positions():
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 0]])
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 1, 0]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2]])
    batch = packed_batch(torch.stack([tokens, mask, segments], dim=1))
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[2, 3, -100, -100, 6, 7, 8, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    assert positions_in_segments(torch.tensor([[0, 1, 1, 2]])).tolist() == [[0, 0, 1, 0]]


def _tiny_model(arch: str, impl: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    else:
        config = LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()


@pytest.mark.parametrize("arch,impl", [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager")])
def test_a_token_sees_only_its_own_conversation_in_a_pack(arch, impl):
    from pretrain.models.packed_attention import causal_lm_inputs

    model = _tiny_model(arch, impl)
    g = torch.Generator().manual_seed(0)
    segments = torch.tensor([0] * 7 + [1] * 9 + [2] * 5)
    tokens = torch.randint(0, 50, (21,), generator=g)
    other = tokens.clone()
    other[:7] = torch.randint(0, 50, (7,), generator=g)  # a different first conversation
    windows = torch.stack([torch.stack([t, torch.ones_like(t), segments]) for t in (tokens, other)])
    batch = packed_batch(windows)
    with torch.no_grad():
        logits = model(**causal_lm_inputs(model, batch)).logits
        alone = model(input_ids=batch["input_ids"][:1, 7:16]).logits
        unmasked = model(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(logits[0, :7], logits[1, :7]), "the changed conversation itself changes"
    torch.testing.assert_close(logits[0, 7:], logits[1, 7:], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[0, 7:16], alone[0], rtol=0, atol=1e-5)  # as if it were alone: positions reset
    assert not torch.allclose(unmasked[0, 7:], unmasked[1, 7:], atol=1e-3), "without the mask they would leak"
    if impl == "sdpa":
        # What flash-attention and flex get instead of a dense mask: transformers 5.x finds the
        # conversations from the restarting position_ids alone, with the same result (without a KV
        # cache only, as in training: build_model sets use_cache False).
        with torch.no_grad():
            by_positions = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
        torch.testing.assert_close(by_positions, logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ loader and training


def test_loader_labels_count_equals_the_assistant_tokens(chat_data):
    from data_pipelines.loader import TextShards, eval_batches, train_loader

    data = TextShards(chat_data)
    assert data.chat
    split = data.manifest["splits"]["val"]
    batches = list(eval_batches(data, "val", 8))
    counted = sum(int(((b["labels"] != IGNORE_INDEX) & (b.pop("weight")[:, None] > 0)).sum()) for b in batches)
    assert counted == split["trained_tokens"], "every trained token is a label once (windows start a conversation)"
    batch = next(train_loader(data, "train", 4, 0, 1, seed=0))
    assert set(batch) >= {"input_ids", "labels", "position_ids", "segment_ids"}
    assert batch["labels"].shape == batch["position_ids"].shape == (4, 96)


@pytest.fixture
def world_of_one():
    with launch_world_of_one():
        yield


def test_sft_trains_on_assistant_tokens_only_and_held_out_loss_falls(chat_data, tmp_path, world_of_one, monkeypatch):
    from transformers import AutoTokenizer

    from pretrain.models import gpt
    from pretrain.models.packed_attention import causal_lm_inputs
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    recipe = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    recipe["model"].update(hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=128)
    recipe["training"].update(micro_batch_size=8, warmup_steps=5, lr=3e-3)
    recipe["eval"] = {"every": 0, "max_samples": 64}
    (tmp_path / "sft.json").write_text(json.dumps(recipe))
    args = build_parser().parse_args(
        [
            "--config",
            str(tmp_path / "sft.json"),
            "--data",
            str(chat_data),
            "--output-dir",
            str(tmp_path / "run"),
            "--max-steps",
            "40",
            "--checkpoint-every",
            "0",
            "--no-progress",
        ]
    )
    resolved, inputs, run_dir = prepare(args)
    trainer = Trainer(resolved, inputs, run_dir, args.resume, progress=False)
    trainer.setup()

    seen: list[dict] = []
    token_losses = gpt.token_losses

    def recording(model, batch):
        if model.training:
            seen.append({k: v.detach().clone() for k, v in batch.items()})
        return token_losses(model, batch)

    monkeypatch.setattr(gpt, "token_losses", recording)
    before = trainer.evaluate()["loss"]
    trainer.fit()
    after = metrics(tmp_path / "run")[1][-1]["loss"]
    print(f"held-out loss before {before:.3f}, after {after:.3f}")
    assert after < 0.6 * before, (before, after)

    # The batches the trainer trained on: labels on the assistant's tokens only...
    tok = AutoTokenizer.from_pretrained(chat_data / "tokenizer")
    batch = seen[0]
    labels = batch["labels"]
    for row in range(labels.shape[0]):
        prompts = tok.decode(batch["input_ids"][row])
        trained = tok.decode(labels[row][labels[row] != IGNORE_INDEX])
        window = prompts + tok.decode(labels[row, -1:].clamp(min=0))  # the last token, where it is a label
        expected = "".join(m.group(1) for m in ASSISTANT_TURN.finditer(window))
        assert trained.replace(tok.eos_token, "") == expected
    # ...and the loss is their mean: the other positions contribute nothing.
    assert causal_lm_inputs(trainer.engine, batch)["attention_mask"].shape == (8, 1, 96, 96), "block-diagonal"
    with torch.no_grad():
        per_token = gpt.token_losses(trainer.engine, batch)
        assert torch.all(per_token[labels == IGNORE_INDEX] == 0)
        expected_loss = per_token.sum() / (labels != IGNORE_INDEX).sum()
        assert float(gpt.loss(trainer.engine, batch)) == pytest.approx(float(expected_loss), rel=1e-6)


def test_sequence_parallelism_with_chat_data_is_refused_before_any_rank_starts(
    chat_data, tmp_path, capsys, monkeypatch
):
    import os

    from pretrain.train import main

    monkeypatch.setattr(os, "environ", dict(os.environ))
    os.environ.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    recipe = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    recipe["model"] = {
        "arch": "llama",
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
    }
    recipe["training"]["micro_batch_size"] = 2
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    ds = {**json.loads((REPO / "ds_configs/zero3_fp32.json").read_text()), "sequence_parallel_size": 2}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    assert (
        main(
            [
                "--config",
                str(tmp_path / "recipe.json"),
                "--deepspeed_config",
                str(tmp_path / "ds.json"),
                "--data",
                str(chat_data),
                "--output-dir",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "sequence_parallel_size: 2 with chat data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("impl", ["sdpa", "flash_attention_2"])
def test_sequence_parallelism_with_chat_data_has_one_rule_for_each_attention_kernel(
    impl, chat_data, tmp_path, capsys, monkeypatch
):
    """The real entry point and the feature's own check give one answer: refused with sdpa (Ulysses drops
    the block mask), allowed with flash-attention (which this CPU lacks, and says so: nothing else)."""
    import os

    from pretrain.parallel.layout import ParallelLayout
    from pretrain.parallel.sequence_parallel import check
    from pretrain.train import main

    monkeypatch.setattr(os, "environ", dict(os.environ))
    os.environ.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    recipe = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    recipe["model"] = {
        "arch": "llama",
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
        "attn_implementation": impl,
    }
    recipe["training"]["micro_batch_size"] = 2
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    ds = {**json.loads((REPO / "ds_configs/zero3_fp32.json").read_text()), "sequence_parallel_size": 2}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    rc = main(
        [
            "--config",
            str(tmp_path / "recipe.json"),
            "--deepspeed_config",
            str(tmp_path / "ds.json"),
            "--data",
            str(chat_data),
            "--output-dir",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    rule = check("llama", ParallelLayout(world=2, sp=2), 3, 4, 4, 96, impl, "ds.json", packed=True)
    assert bool(rule) == (impl == "sdpa")
    assert ("sequence_parallel_size: 2 with chat data" in err) == bool(rule), err
    if impl == "flash_attention_2" and not torch.cuda.is_available():
        assert rc == 2 and "flash_attention_2 needs a CUDA GPU" in err and "1 problem(s)" in err, err
    assert not (tmp_path / "out").exists()
