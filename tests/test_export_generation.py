"""An exported GPT in transformers.pipeline("text-generation") as a user calls it: a prompt longer
than the position table is refused with a clear error (or cut with the pipeline's own option),
never an IndexError inside the embedding; a chat export answers messages with its template."""

from __future__ import annotations

import pytest
import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny GPT-2 of 32 positions written the way pretrain-export writes it (save_hf_assets)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from data_pipelines.text.tokenizer import train_bpe_tokenizer
    from pretrain.models import gpt as gpt_family

    tok = train_bpe_tokenizer([f"What is {a} plus {b}? It is {a + b}." for a in range(30) for b in range(30)], 300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=32,
            n_embd=32,
            n_layer=1,
            n_head=2,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).eval()
    out = tmp_path_factory.mktemp("export") / "gpt"
    model.save_pretrained(out)
    gpt_family.save_hf_assets(model, tok, out)
    return out


def test_a_prompt_longer_than_the_positions_is_refused_clearly_or_cut_when_asked(export):
    from transformers import pipeline

    generate = pipeline("text-generation", model=str(export), device="cpu")
    assert generate.model.generation_config.max_length == 32 == generate.tokenizer.model_max_length
    short = generate("What is 3 plus 4?", do_sample=False)[0]["generated_text"]
    assert len(generate.tokenizer(short)["input_ids"]) <= 32, "generation stops at the position table"
    long = "What is 3 plus 4? " * 20
    with pytest.raises(ValueError, match="max_length"):
        generate(long, do_sample=False)
    # The pipeline's own way to cut a long prompt, keeping its end and room for the new tokens.
    cut = generate(long, max_new_tokens=4, handle_long_generation="hole", do_sample=False)[0]["generated_text"]
    assert cut.startswith(long)


def test_a_chat_export_answers_messages_through_its_template(export):
    from transformers import pipeline

    generate = pipeline("text-generation", model=str(export), device="cpu")
    reply = generate([{"role": "user", "content": "What is 3 plus 4?"}], max_new_tokens=3, do_sample=False)
    conversation = reply[0]["generated_text"]
    assert [m["role"] for m in conversation] == ["user", "assistant"]
