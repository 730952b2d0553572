"""Run under 2 ranks (torchrun): a tiny GPT-2 or Llama with `pretrain.parallel.sequence_parallel` at SP=2
against the same model without SP on the same batch, no engine in between. Rank 0 prints one
JSON line: both losses and the largest gradient difference relative to the largest gradient.

The full gradient is the sum over the SP ranks of their gradients divided by the SP size: each
rank back-propagates the same total loss, whose all-gather hands every rank its chunk's share
once per rank (DeepSpeed's ZeRO-3 averaging over all ranks undoes exactly that factor).
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist


def main(arch: str) -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from pretrain.parallel.layout import ParallelLayout
    from pretrain.parallel.sequence_parallel import SequenceParallel

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=96,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
        )
    else:
        config = LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            use_cache=False,
        )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    reference = copy.deepcopy(model)
    tokens = torch.randint(0, 96, (2, 33))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    sp = SequenceParallel(model, ParallelLayout(world=world, rank=rank, sp=world), micro_batch_size=2, seq_len=32)
    loss = sp.loss(model, batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    dist.all_reduce(grads)
    grads /= world

    # SP's kernel replaced sdpa for this process; in eval mode it hands over to the original
    reference.eval()
    ref_loss = torch.nn.functional.cross_entropy(
        reference(**{"input_ids": batch["input_ids"]}).logits.flatten(0, 1), batch["labels"].flatten()
    )
    ref_loss.backward()
    ref_grads = torch.cat([p.grad.flatten() for p in reference.parameters()])
    if rank == 0:
        print(
            json.dumps(
                {
                    "arch": arch,
                    "loss": loss.item(),
                    "reference": ref_loss.item(),
                    "grad_diff": ((grads - ref_grads).abs().max() / ref_grads.abs().max()).item(),
                }
            ),
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[-1])
