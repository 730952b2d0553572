"""Ulysses sequence parallelism (DeepSpeed's Arctic Long Sequence Training, ALST), configured by
the DeepSpeed JSON's ``"sequence_parallel_size": N``, the key DeepSpeed reads.

Each sequence of a micro-batch is cut into N consecutive chunks, one per rank of an SP group; the
embeddings, MLPs and the loss run on the chunk, and inside attention two all-to-alls swap the
chunking from sequence to heads (`deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF`,
installed in place of the model's sdpa/flash kernel by ``register_with_transformers``). Activations
per rank fall by N, for sequences that do not fit one rank.

What the toolkit adds around DeepSpeed's pieces:

- ``check`` (the feature `UlyssesSequenceParallel`'s rules): the layouts that cannot run, refused
  before any rank starts (architecture, ZeRO
  stage, TP together with SP, heads / KV heads / sequence length that N does not divide, eager attention);
- ``SequenceParallel.shard`` instead of DeepSpeed's ``UlyssesSPDataLoaderAdapter``: the toolkit's
  loader already splits the data by the data-parallel rank only (`pretrain.parallel.layout`), so every rank
  of an SP group holds the same micro-batch and cuts its own chunk locally. The adapter would
  all-gather a different batch from each SP rank and hand them out one per step, which makes the
  stream's position depend on N; this keeps "one micro-batch per DP rank per micro-step" as in a
  run without SP (and its checkpoints and resume). Labels arrive already shifted (the loader
  yields ``labels = tokens[1:]``), so cutting them with the inputs is ALST's pre-split shift.
- ``SequenceParallel.loss``: the mean token loss of the whole sequence from the chunks: each rank
  sums its chunk's token losses; a differentiable sum over the SP group adds the sums, and the
  summed token counts divide them (ALST's valid-token-weighted reduction). Every rank of the group
  returns the same loss, which is what the trainer logs. Under ZeRO-3 the gradients then equal
  those of the whole sequences without SP (DeepSpeed averages over all SP x DP ranks, which undoes
  the sum's backward handing each chunk the gradient of every rank).
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F

from pretrain.parallel.layout import ParallelLayout
from pretrain.run.feature import EngineParts, Feature, RunContext

SUPPORTED_ARCHS = ("llama", "gpt2")


def check(
    arch: str,
    layout: ParallelLayout,
    zero_stage: int,
    num_heads: int | None,
    num_kv_heads: int | None,
    seq_len: int | None,
    attn_implementation: str,
    source: str,
    packed: bool = False,
) -> list[str]:
    """Why this SP layout cannot run, as "file: key: reason" lines ([] when it can, or SP is off)."""
    sp = layout.sp
    if sp == 1:
        return []
    key = f"{source}: sequence_parallel_size"
    problems = []
    if arch not in SUPPORTED_ARCHS:
        problems.append(
            f"{key}: {sp} asks for Ulysses sequence parallelism, which this toolkit runs for the "
            f"{' and '.join(SUPPORTED_ARCHS)} architectures only (model.arch is {arch!r})"
        )
    if zero_stage != 3:
        # Measured with DeepSpeed 0.19.8: under ZeRO 0/1/2 the gradients of an SP=2 run come out
        # twice those of the same batch without SP (ZeRO-3's match); ALST is built on ZeRO-3.
        problems.append(
            f"{key}: {sp} needs zero_optimization.stage 3 (got {zero_stage}); DeepSpeed's Ulysses "
            "gradient averaging is right only under ZeRO-3"
        )
    if layout.tp > 1:
        problems.append(
            f"{key}: {sp} together with tensor_parallel.autotp_size {layout.tp} is not supported "
            "(DeepSpeed's Ulysses groups and AutoTP's groups do not combine); use one of them"
        )
    if num_heads is not None and num_heads % sp:
        problems.append(
            f"{key}: {sp} does not divide model.num_heads {num_heads}: each SP rank attends with "
            "num_heads / sequence_parallel_size heads"
        )
    if num_kv_heads is not None and num_kv_heads % sp and sp % num_kv_heads:
        problems.append(
            f"{key}: {sp} and model.num_kv_heads {num_kv_heads}: one must divide the other "
            "(the KV heads are split across the SP ranks, or replicated to them)"
        )
    if seq_len is not None and seq_len % sp:
        problems.append(
            f"{key}: {sp} does not divide the data's seq_len {seq_len}: each SP rank holds "
            "seq_len / sequence_parallel_size tokens of every sequence"
        )
    if attn_implementation == "eager":
        problems.append(
            f"{key}: {sp} cannot run with model.attn_implementation eager (it needs a full attention "
            "mask, which Ulysses drops); use sdpa or flash_attention_2"
        )
    if packed and attn_implementation != "flash_attention_2":
        # Ulysses drops dense masks, so sdpa would let packed conversations attend to each other;
        # flash-attention finds them from the position_ids, which the chunks carry whole.
        problems.append(
            f"{key}: {sp} with chat data is refused with {attn_implementation}: packed conversations "
            "(chat data) needs model.attn_implementation flash_attention_2 (Ulysses drops the "
            f"block-diagonal mask that {attn_implementation} needs)"
        )
    return problems


def _attention_config(model: torch.nn.Module):
    """What ``register_with_transformers`` reads from the model: its config, with GPT-2's missing
    ``num_key_value_heads`` filled in (GPT-2 is multi-head: as many KV heads as heads). A copy, so
    the model's own config (saved with checkpoints and exports) is untouched."""
    config = copy.deepcopy(model.config)
    if getattr(config, "num_key_value_heads", None) is None:
        config.num_key_value_heads = config.num_attention_heads
    return types.SimpleNamespace(config=config)


def _heads_unmerged(implementation: str) -> None:
    """DeepSpeed's Ulysses kernel returns (batch, seq, hidden) with the heads merged, where
    transformers' kernels return (batch, seq, heads, head_dim). Llama reshapes either; GPT-2 merges
    the last two dimensions itself and would fold the sequence into the features. Give back the
    4-D shape (a view; a no-op in evaluation, where the original kernel runs)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ulysses = ALL_ATTENTION_FUNCTIONS[implementation]

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        out, weights = ulysses(module, query, key, value, attention_mask, *args, **kwargs)
        return out.reshape(*out.shape[:2], -1, query.shape[-1]), weights

    ALL_ATTENTION_FUNCTIONS[implementation] = attention


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradients too: every rank back-propagates
    the same total loss, so each chunk's sum receives the gradient of every rank (ALST's
    differentiable all-gather, without torch's deprecated torch.distributed.nn wrappers)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SequenceParallel:
    """One rank's view of its SP group (collective to build: every rank constructs it, before
    ``deepspeed.initialize``, which gets ``mpu``)."""

    def __init__(self, model: torch.nn.Module, layout: ParallelLayout, micro_batch_size: int, seq_len: int):
        import torch.distributed as dist
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        self.size, self.seq_len = layout.sp, seq_len
        self.mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=_attention_config(model),
            core_attn_implementation=model.config._attn_implementation,
            sequence_parallel_size=layout.sp,
            micro_batch_size=micro_batch_size,
            seq_length=seq_len,
            seq_length_is_variable=False,
            # Evaluation feeds whole sequences to every rank (each SP rank of a group computes the
            # same result), so attention must not split them again.
            disable_in_eval=True,
        )
        _heads_unmerged(model.config._attn_implementation)
        self.group = self.mpu.get_sequence_parallel_group()
        self.rank = self.mpu.get_sequence_parallel_rank()
        assert self.rank == layout.sp_rank, "DeepSpeed's SP groups differ from the layout's"
        # The ranks holding the same chunk position in every SP group: where model replicas meet
        # (DeepSpeed's own data-parallel group under SP is the whole world, SP ranks included).
        self.dp_group = None
        for sp_rank in range(layout.sp):
            ranks = [d * layout.sp + sp_rank for d in range(layout.dp)]
            group = dist.new_group(ranks)
            if sp_rank == self.rank:
                self.dp_group = group

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's chunk of every sequence, with the positions the chunk has in the whole one
        (the batch's own, restarting at each packed conversation, where it has them)."""
        ids, labels = batch["input_ids"], batch["labels"]
        if ids.shape[1] != self.seq_len:
            raise ValueError(
                f"a micro-batch of sequences of {ids.shape[1]} tokens; sequence parallelism was set up "
                f"for {self.seq_len}"
            )
        chunk = self.seq_len // self.size
        part = slice(self.rank * chunk, (self.rank + 1) * chunk)
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(self.seq_len, device=ids.device).expand(ids.shape[0], -1)
        return {"input_ids": ids[:, part], "labels": labels[:, part], "position_ids": positions[:, part]}

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed token cross-entropy of the whole sequences (ignore index -100), identical on every
        rank of the group and differentiable through every chunk: the trainer divides it by the
        step's trained tokens, which it counts from the whole sequences' labels."""
        part = self.shard(batch)
        logits = model(input_ids=part["input_ids"], position_ids=part["position_ids"]).logits
        labels = part["labels"]
        total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
        return _SumOverGroup.apply(total, self.group)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean token cross-entropy of the whole sequences: ``loss_sum`` over the trained tokens."""
        return self.loss_sum(model, batch) / (batch["labels"] != -100).sum().clamp(min=1)


class UlyssesSequenceParallel(Feature):
    """The run feature: its rules before any rank starts, its groups and loss for the engine."""

    name = "sequence parallelism"

    def problems(self, ctx: RunContext) -> list[str]:
        if ctx.deepspeed is None:
            return []
        return check(
            ctx.arch,
            ctx.layout,
            ctx.zero_stage,
            ctx.num_heads,
            ctx.num_kv_heads,
            ctx.seq_len,
            ctx.recipe.model.attn_implementation,
            ctx.source,
            packed=ctx.chat,
        )

    def engine(self, model: torch.nn.Module, ctx: RunContext) -> EngineParts | None:
        if ctx.layout.sp == 1:
            return None
        # replaces the model's attention kernel and makes its groups before the engine exists
        sp = SequenceParallel(model, ctx.layout, ctx.deepspeed["train_micro_batch_size_per_gpu"], ctx.seq_len)
        # DeepSpeed's data-parallel group under Ulysses holds the SP ranks too: replicas meet in sp.dp_group
        return EngineParts(mpu=sp.mpu, loss_sum=sp.loss_sum, dp_group=lambda: sp.dp_group, sequence_parallel=sp)

    def started(self, engine, ctx: RunContext) -> list[str]:
        if ctx.layout.sp == 1:
            return []
        return [
            f"{ctx.layout.describe()}; Ulysses sequence parallelism: each rank holds "
            f"{ctx.seq_len // ctx.layout.sp} of the {ctx.seq_len} tokens of every sequence"
        ]
