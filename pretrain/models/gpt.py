"""GPT-style causal LMs (transformers GPT-2 or Llama): build, loss, evaluate."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from data_pipelines.text.packed import IGNORE_INDEX
from pretrain.models.packed_attention import causal_lm_inputs
from pretrain.models.spec import EvalRequest, ModelFamily, RunData, StreamRequest, no_external_parameters
from pretrain.run.config import ModelConfig, Recipe
from pretrain.runtime.checkpoint import hf_load, remote_code_trusted
from pretrain.runtime.flops import total_flops


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def hf_config(
    cfg: ModelConfig, tokenizer_vocab: int, eos_token_id: int | None = None, bos_token_id: int | None = None
) -> PretrainedConfig:
    """The transformers config for a model built from the recipe's sizes; bos is the tokenizer's own
    (Llama-style tokenizers start every text with it, and prepared documents do too), else eos."""
    bos = bos_token_id if bos_token_id is not None else eos_token_id
    vocab = cfg.vocab_size or round_up(tokenizer_vocab, cfg.pad_vocab_multiple)
    if cfg.arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_positions=cfg.max_position_embeddings,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.intermediate_size,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            tie_word_embeddings=cfg.tie_word_embeddings,
            use_cache=False,
            bos_token_id=bos,
            eos_token_id=eos_token_id,
        )
    inter = cfg.intermediate_size or round_up(int(8 * cfg.hidden_size / 3), 256)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=inter,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_cache=False,
        bos_token_id=bos,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def model_config(cfg: ModelConfig, tokenizer) -> PretrainedConfig:
    if cfg.init_from:
        return hf_load(AutoConfig.from_pretrained, cfg.init_from, cfg.trust_remote_code)
    return hf_config(cfg, len(tokenizer), tokenizer.eos_token_id, getattr(tokenizer, "bos_token_id", None))


def open_data(path):
    from data_pipelines.loader import TextShards

    return TextShards(path)


def tokenizer_dir(recipe: Recipe, data):
    return Path(data.root) / data.manifest["tokenizer"]["path"]  # an absolute path for data.sources


def check(recipe: Recipe, data, config: PretrainedConfig, tokenizer) -> list[str]:
    problems = []
    if getattr(config, "model_type", None) == "clip":
        return [f"model.init_from: {recipe.model.init_from} holds a CLIP model; use family clip"]
    if config.vocab_size < len(tokenizer):
        problems.append(
            f"model.vocab_size: {config.vocab_size} is smaller than the tokenizer's vocabulary ({len(tokenizer)})"
        )
    max_pos = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0)
    if max_pos < data.seq_len:
        problems.append(f"model.max_position_embeddings: {max_pos} is shorter than the data's seq_len {data.seq_len}")
    return problems


def hidden_size(config: PretrainedConfig) -> int:
    return getattr(config, "hidden_size", None) or config.n_embd


def tokens_per_sample(data, config: PretrainedConfig) -> int:
    return data.seq_len


def save_hf_assets(model: torch.nn.Module, tokenizer, out) -> None:
    """The tokenizer (limited to the model's positions) and a generation config that stops at eos."""
    if tokenizer is None:
        return
    from pretrain.models.hf_assets import save_tokenizer

    config = model.config
    positions = getattr(config, "n_positions", None) or config.max_position_embeddings
    save_tokenizer(tokenizer, out, positions)
    gen = model.generation_config
    # pipeline("text-generation") then generates at most up to the position table and refuses a
    # longer prompt with a ValueError naming max_length, where it would index past the table
    # (IndexError in the embedding); pipelines do not truncate prompts by default.
    gen.max_length = positions
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen.save_pretrained(out)


def train_flops_per_sample(config: PretrainedConfig, data) -> float:
    """Forward and backward FLOPs of one sequence: 6·N·s + 12·L·s·h·s (`pretrain.runtime.flops`)."""
    s = data.seq_len
    return total_flops(
        count_params(config),
        s,
        attention=True,
        num_layers=config.num_hidden_layers,
        seq_len=s,
        hidden_size=hidden_size(config),
    )


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    return model


to_hf = hf_model


def from_pretrained(path) -> torch.nn.Module:
    return hf_load(AutoModelForCausalLM.from_pretrained, path, dtype=torch.float32)


def build_model(cfg: ModelConfig, config: PretrainedConfig) -> torch.nn.Module:
    """A causal LM from its transformers config, or from a local Hugging Face directory (init_from)."""
    # Import the model's modules (and torch._dynamo, which they pull in) before a ZeRO-3 zero.Init
    # patches tensor construction: importing dynamo inside that context fails.
    import torch._dynamo  # noqa: F401

    if not cfg.trust_remote_code:
        AutoModelForCausalLM._model_mapping[type(config)]
    kwargs = dict(
        dtype=torch.float32, trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation
    )
    if cfg.init_from:
        model = hf_load(AutoModelForCausalLM.from_pretrained, cfg.init_from, **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.config.use_cache = False
    return model


def model_from_config(config: PretrainedConfig, cfg: ModelConfig | None = None) -> torch.nn.Module:
    trust = cfg.trust_remote_code if cfg is not None else remote_code_trusted()
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust)


def count_params(config: PretrainedConfig) -> int:
    """Parameters of the model a config describes, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote_code_trusted())
    return sum(p.numel() for p in model.parameters())


# Embedding tables by the name transformers gives them: GPT-2, Llama, CLIP's towers.
EMBEDDING_TABLES = frozenset({"wte", "wpe", "embed_tokens", "token_embedding", "position_embedding", "class_embedding"})


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """The weight-decay rule of every family: no decay for biases and norm gains (every parameter of
    fewer than 2 dimensions), token and position embedding tables, and CLIP's logit scale (GPT-2 /
    OpenCLIP practice); every other matrix is decayed (attention and MLP weights, an untied LM head,
    a ViT's patch projection, a classifier head). GPT-2's LM head is tied to ``wte`` and follows it.
    A ZeRO-3 parameter built partitioned is judged by its full shape, not its empty local one."""
    shape = getattr(param, "ds_shape", param.shape)
    parts = name.split(".")
    return len(shape) < 2 or "logit_scale" in parts or any(part in EMBEDDING_TABLES for part in parts)


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token cross-entropy, shape (batch, seq), 0 where the label is -100 (chat data: not an
    assistant token). Computed in fp32 whatever the model's dtype. Packed conversations
    (`segment_ids`) attend within their own conversation only."""
    logits = model(**causal_lm_inputs(model, batch)).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none").view_as(
        batch["labels"]
    )


def loss_items(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tokens a batch trains: every label, or the assistant tokens of chat data."""
    return (batch["labels"] != IGNORE_INDEX).sum()


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed token losses (the trainer divides by the optimizer step's ``loss_items``)."""
    return token_losses(model, batch).sum()


def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    losses = token_losses(model, batch)
    if "segment_ids" not in batch:  # plain text: every label counts
        return losses.mean()
    # the mean over trained (assistant) tokens; a micro-batch without any gives 0 and no gradient
    return losses.sum() / (batch["labels"] != IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def evaluate_sums(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(sum of token losses, token count, sequences) over weighted batches, as a float64 tensor,
    so ranks can all-reduce it and get the exact split loss."""
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        w = batch.pop("weight", torch.ones(batch["input_ids"].shape[0]))
        batch = {k: v.to(device) for k, v in batch.items()}
        per_seq = token_losses(model, batch).double().sum(dim=1).cpu()
        counted = (batch["labels"] != IGNORE_INDEX).sum(dim=1).double().cpu()
        sums[0] += (per_seq * w.double()).sum()
        sums[1] += (counted * w.double()).sum()
        sums[2] += w.double().sum()
    return sums


def train_stream(run: RunData, req: StreamRequest):
    from data_pipelines.loader import train_loader

    d = req.data
    return train_loader(
        run.data,
        d.train_split,
        req.micro_batch_size,
        req.rank,
        req.world,
        seed=req.seed,
        shuffle_buffer=d.shuffle_buffer,
        resampled=d.resampled,
        num_workers=d.num_workers,
        trace=req.sample_ids,
    )


def evaluate(model, run: RunData, req: EvalRequest) -> dict:
    """Loss and perplexity over the split (or a fixed subset of max_samples windows spread over it);
    collective over ranks, which must run as many batches (`check_batch_counts`)."""
    from data_pipelines.eval_split import check_batch_counts
    from data_pipelines.loader import eval_batches

    ran = [0]

    def counted(batches):
        for batch in batches:
            ran[0] += 1
            yield batch

    batches = eval_batches(run.data, req.split, req.batch_size, req.rank, req.world, req.max_samples)
    sums = evaluate_sums(model, counted(batches), req.device)
    if req.world > 1:
        import torch.distributed as dist

        check_batch_counts(ran[0], f"eval {req.split} on rank {req.rank}", req.group)
        sums = sums.to(req.device)  # NCCL reduces device tensors only
        dist.all_reduce(sums, group=req.group)
    return metrics_from_sums(sums.cpu())


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    loss_value = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
    return {
        "loss": loss_value,
        "perplexity": math.exp(min(loss_value, 50.0)),
        "tokens": int(sums[1]),
        "samples": int(sums[2]),
    }


FAMILY = ModelFamily(
    name="gpt",
    unit="tokens",
    freeze_aliases={},
    open_data=open_data,
    tokenizer_dir=tokenizer_dir,
    model_config=model_config,
    check=check,
    count_params=count_params,
    hidden_size=hidden_size,
    tokens_per_sample=tokens_per_sample,
    train_flops_per_sample=train_flops_per_sample,
    build_model=build_model,
    model_from_config=model_from_config,
    from_pretrained=from_pretrained,
    hf_model=hf_model,
    to_hf=to_hf,
    save_hf_assets=save_hf_assets,
    no_decay=no_decay,
    register_external_parameters=no_external_parameters,
    train_stream=train_stream,
    loss=loss,
    loss_items=loss_items,
    loss_sum=loss_sum,
    evaluate=evaluate,
)
